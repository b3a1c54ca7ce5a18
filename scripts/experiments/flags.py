"""Parsing and checking the scripts' flag values: argparse types and the checks of comma-separated choices.

The argparse types raise `argparse.ArgumentTypeError` naming the flag and the text given, which argparse prints as
"argument --flag: ..." before exiting; `check_choices` raises a ValueError naming the flag.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable, Optional, Sequence


def comma_list(text: str) -> list[str]:
    """"a,b" -> ["a", "b"]."""
    return [item.strip() for item in text.split(",") if item.strip()]


def check_choices(flag: str, values: Sequence[str], choices: Sequence[str]) -> None:
    """Raises a ValueError naming `flag` if `values` is empty or holds a value not in `choices`."""
    unknown = [value for value in values if value not in choices]
    if unknown or not values:
        raise ValueError(f"{flag} must be among {sorted(choices)}, got {list(values)}")


def positive_int(flag: str) -> Callable[[str], int]:
    """The argparse type of `flag`: an integer >= 1."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer >= 1, got {text!r}")
        return value
    return parse


def positive_float(flag: str) -> Callable[[str], float]:
    """The argparse type of `flag`: a number > 0 (not NaN)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{flag} must be a number > 0, got {text!r}")
        return value
    return parse


def int_list(flag: str, length: Optional[int] = None) -> Callable[[str], tuple[int, ...]]:
    """The argparse type of `flag`: comma-separated integers >= 1 (exactly `length` of them if given)."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(part) for part in text.split(","))
        except ValueError:
            values = ()
        if not values or min(values) < 1 or (length is not None and len(values) != length):
            shape = f"{length} " if length else ""
            raise argparse.ArgumentTypeError(f"{flag} must be {shape}comma-separated integers >= 1, got {text!r}")
        return values
    return parse


def non_negative_int(flag: str) -> Callable[[str], int]:
    """The argparse type of `flag`: an integer >= 0."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 0:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer >= 0, got {text!r}")
        return value
    return parse


def json_object(flag: str) -> Callable[[str], dict[str, Any]]:
    """The argparse type of `flag`: a JSON object."""
    def parse(text: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise argparse.ArgumentTypeError(f"{flag} must be a JSON object, got {text!r}: {error}") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{flag} must be a JSON object, got {text!r}")
        return value
    return parse
