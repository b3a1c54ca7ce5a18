"""MovieLens-100K as a three-task ranking dataset, split by time.

The files come from the `recbole==1.2.1` package (`recbole/dataset_example/ml-100k/`), read in place without
importing recbole (it needs torch). Each of the 100,000 ratings is one impression.
"""

from __future__ import annotations

import pathlib
from typing import Callable, NamedTuple

import numpy as np

from tfrs_clippy.data import tables
from tfrs_clippy.data.pipeline import ChunkedExamples
from tfrs_clippy.data.spec import DatasetSpec, FeatureSpec, TaskSpec, with_training_label_means

NAME = "movielens_100k"
PACKAGE = "recbole"
REQUIREMENT = "recbole==1.2.1"
PACKAGE_DATA_DIR = "dataset_example/ml-100k"

TRAIN_FRACTION = 0.8
"""The oldest 80% of the ratings, in timestamp order, train; the newest 20% test."""

ZIP_PREFIX_LENGTH = 3
"""The first three characters of a US zip code name its sectional centre, a region of a few hundred thousand people."""

AGE_BUCKETS = ((0, "under_18"), (18, "18-24"), (25, "25-34"), (35, "35-44"), (45, "45-49"), (50, "50-55"), (56, "56+"))
"""(lowest age, bucket token) pairs, the age groups MovieLens-1M publishes."""

SECONDS_PER_HOUR = 3600
SECONDS_PER_DAY = 86400
EPOCH_WEEKDAY = 3
"""1970-01-01, timestamp 0, was a Thursday: weekday 3 with Monday = 0."""

TASKS = (
    TaskSpec(name="rating", kind="regression"),
    TaskSpec(name="like", kind="binary"),
    TaskSpec(name="love", kind="binary"),
)

_CATEGORICAL_FEATURES = ("user_id", "item_id", "age_bucket", "gender", "occupation", "zip_prefix", "hour", "weekday")


def _age_bucket(age: str) -> str:
    """The age-group token of an age in years; an age that is not a number is OOV."""
    if not age.isdigit():
        return tables.OOV_TOKEN
    return [token for lowest, token in AGE_BUCKETS if int(age) >= lowest][-1]


def _release_years(tokens: list[str]) -> np.ndarray:
    """Release years as float64, NaN where the file has no year (recbole's file writes 'unkonwn' and 'V')."""
    return np.array([float(token) if token.isdigit() else np.nan for token in tokens])


class _Tables(NamedTuple):
    """The three files as read: {column: [string per row]}, and the ratings file's path for parse errors."""

    ratings: dict[str, list[str]]
    users: dict[str, list[str]]
    items: dict[str, list[str]]
    inter_path: pathlib.Path


class _Ratings(NamedTuple):
    """The ratings, one entry per rating, sorted by timestamp."""

    rating: np.ndarray
    timestamp: np.ndarray
    user_ids: list[str]
    item_ids: list[str]


class _ItemColumns(NamedTuple):
    """The item table joined onto the ratings: per rating its movie's genres and release year (NaN: none)."""

    genres: list[list[str]]
    release_year: np.ndarray
    max_genres: int


def movielens_100k(data_dir: str | pathlib.Path | None = None) -> tables.Splits:
    """MovieLens-100K ratings as `(features, labels)` examples, in timestamp order, split by time.

    The ratings are sorted by timestamp (stably, so ties keep file order); the oldest 80% are `train` and the
    newest 20% `test`. There is no validation split.

    Features, one row per rating: `user_id`, `item_id`, `age_bucket` (the MovieLens-1M age groups), `gender`,
    `occupation`, `zip_prefix` (first three characters of the zip code), `hour` and `weekday` of the rating's UTC
    timestamp (all categorical), `genres` (multi-hot, up to 6 per movie) and `release_year` (numeric; the two
    movies without a year get the training mean).

    Vocabularies are built from the TRAIN split only: an id or token that first appears in the test split (a new
    user, a new movie) maps to the out-of-vocabulary bucket, id 0, as it would for a model trained in time order.

    Tasks: `rating` (regression, 1..5), `like` (rating >= 4, binary), `love` (rating == 5, binary); each
    `TaskSpec.label_mean` is the mean of its training labels (a binary task's positive rate).

    Args:
        data_dir: Folder with `ml-100k.inter`, `ml-100k.user` and `ml-100k.item`; defaults to the copy inside
            the installed recbole package.

    Returns:
        The splits, their spec, sizes and vocabularies.

    Raises:
        MissingDataPackageError: `data_dir` is not given and recbole is not installed.
        FileNotFoundError: A file is missing.
        DataError: A file is empty, lacks a column, or has a rating or timestamp that is not a number.
    """
    files = _read_tables(_data_folder(data_dir))
    ratings = _ratings_in_time_order(files.ratings, files.inter_path)
    tokens = _categorical_tokens(ratings, files.users)
    item_columns = _item_columns(files.items, ratings.item_ids)
    num_train = int(round(TRAIN_FRACTION * len(ratings.rating)))
    vocabularies = _train_vocabularies(tokens, item_columns.genres, num_train)
    year_spec, release_year = _release_year_feature(item_columns.release_year, num_train)
    labels = _labels(ratings.rating)
    spec = _dataset_spec(vocabularies, item_columns.max_genres, year_spec, labels, num_train)
    features = _feature_columns(tokens, item_columns, release_year, vocabularies)
    return _time_splits(features, labels, spec, num_train, vocabularies)


def _data_folder(data_dir: str | pathlib.Path | None) -> pathlib.Path:
    """`data_dir`, or the copy of the files inside the installed recbole package (read without importing it)."""
    if data_dir is not None:
        return pathlib.Path(data_dir)
    return tables.package_data_dir(NAME, PACKAGE, REQUIREMENT, PACKAGE_DATA_DIR)


def _read_tables(folder: pathlib.Path) -> _Tables:
    """The three files' columns, each checked for the columns the loader uses.

    All three are read before any value is parsed, so a missing or malformed file is reported first.
    """
    inter_path, user_path, item_path = (folder / f"ml-100k.{suffix}" for suffix in ("inter", "user", "item"))
    return _Tables(
        ratings=tables.read_table(NAME, inter_path, ("user_id", "item_id", "rating", "timestamp")),
        users=tables.read_table(NAME, user_path, ("user_id", "age", "gender", "occupation", "zip_code")),
        items=tables.read_table(NAME, item_path, ("item_id", "release_year", "class")),
        inter_path=inter_path,
    )


def _ratings_in_time_order(ratings: dict[str, list[str]], inter_path: pathlib.Path) -> _Ratings:
    """The ratings table parsed and sorted by timestamp, stably (ties keep file order).

    Time order is what makes the split a split by time: the first rows train, the last ones test.
    """
    rating = tables.parse_floats(NAME, inter_path, "rating", ratings["rating"])
    timestamp = tables.parse_floats(NAME, inter_path, "timestamp", ratings["timestamp"]).astype(np.int64)
    order = np.argsort(timestamp, kind="stable")
    return _Ratings(
        rating=rating[order],
        timestamp=timestamp[order],
        user_ids=[ratings["user_id"][row] for row in order],
        item_ids=[ratings["item_id"][row] for row in order],
    )


def _user_tokens(users: dict[str, list[str]], user_ids: list[str]) -> dict[str, list[str]]:
    """The user table joined onto the ratings: each rating's user's age bucket, gender, occupation and zip prefix.

    A rating whose user the table does not have gets OOV tokens rather than an error: the ratings stay usable.
    """
    user_row = {user: row for row, user in enumerate(users["user_id"])}

    def user_column(transform: Callable[[str], str], column: str) -> list[str]:
        values = users[column]
        return [transform(values[user_row[u]]) if u in user_row else tables.OOV_TOKEN for u in user_ids]

    return {
        "age_bucket": user_column(_age_bucket, "age"),
        "gender": user_column(str, "gender"),
        "occupation": user_column(str, "occupation"),
        "zip_prefix": user_column(lambda zip_code: zip_code[:ZIP_PREFIX_LENGTH], "zip_code"),
    }


def _categorical_tokens(ratings: _Ratings, users: dict[str, list[str]]) -> dict[str, list[str]]:
    """The categorical features' tokens, one per rating, in `_CATEGORICAL_FEATURES` order.

    The ids as they are, the user's demographics (`_user_tokens`), and the hour and weekday of the UTC timestamp.
    """
    timestamp = ratings.timestamp
    return {
        "user_id": ratings.user_ids,
        "item_id": ratings.item_ids,
        **_user_tokens(users, ratings.user_ids),
        "hour": [str(h) for h in (timestamp // SECONDS_PER_HOUR) % 24],
        "weekday": [str(d) for d in (timestamp // SECONDS_PER_DAY + EPOCH_WEEKDAY) % 7],
    }


def _item_columns(items: dict[str, list[str]], item_ids: list[str]) -> _ItemColumns:
    """The item table joined onto the ratings; a movie it does not have gets the OOV genre and no year.

    `max_genres` is over the item table (not the ratings), so the multi-hot width does not depend on the split.
    """
    item_row = {item: row for row, item in enumerate(items["item_id"])}
    item_genres = [genres.split() for genres in items["class"]]
    genres = [item_genres[item_row[i]] if i in item_row else [tables.OOV_TOKEN] for i in item_ids]
    item_years = _release_years(items["release_year"])
    release_year = np.array([item_years[item_row[i]] if i in item_row else np.nan for i in item_ids])
    return _ItemColumns(genres=genres, release_year=release_year, max_genres=max(len(row) for row in item_genres))


def _train_vocabularies(
    tokens: dict[str, list[str]], genres: list[list[str]], num_train: int
) -> dict[str, tuple[str, ...]]:
    """Each categorical feature's vocabulary, and the genres', from the first `num_train` (training) ratings.

    Built from the training split only, so that a token first seen in the test split is OOV, as it would be for a
    model trained in time order.
    """
    vocabularies = {name: tables.build_vocabulary(values[:num_train]) for name, values in tokens.items()}
    vocabularies["genres"] = tables.build_vocabulary(g for row in genres[:num_train] for g in row)
    return vocabularies


def _release_year_feature(release_year: np.ndarray, num_train: int) -> tuple[FeatureSpec, np.ndarray]:
    """The release year's spec (from the training ratings' known years) and the years, NaN filled by their mean.

    The training mean, so that the few movies without a year look like an average one and no test value leaks.
    """
    train_years = release_year[:num_train]
    year_spec = tables.numeric_spec("release_year", train_years[~np.isnan(train_years)])
    return year_spec, np.where(np.isnan(release_year), year_spec.mean, release_year)


def _feature_columns(
    tokens: dict[str, list[str]],
    item_columns: _ItemColumns,
    release_year: np.ndarray,
    vocabularies: dict[str, tuple[str, ...]],
) -> dict[str, np.ndarray]:
    """The feature columns, one row per rating: the categorical ids, the genres' padded multi-hot ids, the year.

    Ids come from the training vocabularies (0 for a token they lack).
    """
    features = {name: tables.lookup(vocabularies[name], values) for name, values in tokens.items()}
    features["genres"] = tables.lookup_multi_hot(vocabularies["genres"], item_columns.genres, item_columns.max_genres)
    features["release_year"] = release_year
    return features


def _labels(rating: np.ndarray) -> dict[str, np.ndarray]:
    """The three tasks' labels: the rating itself, and whether it is at least 4 (`like`) or 5 (`love`)."""
    return {"rating": rating, "like": (rating >= 4).astype(np.float32), "love": (rating == 5).astype(np.float32)}


def _dataset_spec(
    vocabularies: dict[str, tuple[str, ...]],
    max_genres: int,
    year_spec: FeatureSpec,
    labels: dict[str, np.ndarray],
    num_train: int,
) -> DatasetSpec:
    """The features (categorical, then `genres` and `release_year`) and the tasks with their training label means."""
    genres = FeatureSpec(
        name="genres",
        kind="multi_hot",
        vocabulary_size=len(vocabularies["genres"]),
        embedding_dim=tables.default_embedding_dim(len(vocabularies["genres"])),
        max_length=max_genres,
    )
    return DatasetSpec(
        features=tuple(tables.categorical_spec(name, vocabularies[name]) for name in _CATEGORICAL_FEATURES)
        + (genres, year_spec),
        tasks=with_training_label_means(TASKS, {name: column[:num_train] for name, column in labels.items()}),
    )


def _time_splits(
    features: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    spec: DatasetSpec,
    num_train: int,
    vocabularies: dict[str, tuple[str, ...]],
) -> tables.Splits:
    """The first `num_train` rows (the oldest ratings) as `train`, the rest as `test`; no validation split."""
    num_ratings = len(next(iter(labels.values())))

    def split(rows: slice) -> ChunkedExamples:
        return tables.tensor_dataset(
            {name: column[rows] for name, column in features.items()},
            {name: column[rows] for name, column in labels.items()},
            spec,
        )

    return tables.Splits(
        name=NAME,
        spec=spec,
        train=split(slice(0, num_train)),
        test=split(slice(num_train, None)),
        validation=None,
        sizes={"train": num_train, "test": num_ratings - num_train},
        vocabularies=vocabularies,
    )
