"""How the optimizers name and match model variables: one name per variable, one matching rule."""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence


def variable_name(variable: Any) -> str:
    """The name a variable is matched by (`exclude_from_clipping`, embedding patterns): Keras 3's path, else name."""
    return str(getattr(variable, "path", None) or variable.name)


def matches_any(patterns: Sequence[str], name: str) -> bool:
    """Whether a regular expression of `patterns` is found in `name` (`re.search`): the project's one matching rule."""
    return any(re.search(pattern, name) for pattern in patterns)


def check_patterns(argument: str, patterns: Optional[Sequence[str]]) -> list[str]:
    """`patterns` as a list of valid regular expressions, or a ValueError naming `argument` and the bad value."""
    if isinstance(patterns, str):
        raise ValueError(
            f"`{argument}` must be a list of regular expressions, got the string {patterns!r}; wrap it in a list."
        )
    patterns = list(patterns or [])
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"`{argument}` has an invalid pattern {pattern!r}: {error}.") from None
    return patterns
