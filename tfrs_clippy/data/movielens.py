"""MovieLens-100K as a three-task ranking dataset, split by time.

The files come from the `recbole==1.2.1` package (`recbole/dataset_example/ml-100k/`), read in place without
importing recbole (it needs torch). Each of the 100,000 ratings is one impression.
"""

from __future__ import annotations

import pathlib

import numpy as np

from tfrs_clippy.data import tables
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
    folder = (
        pathlib.Path(data_dir)
        if data_dir is not None
        else tables.package_data_dir(NAME, PACKAGE, REQUIREMENT, PACKAGE_DATA_DIR)
    )
    inter_path, user_path, item_path = (folder / f"ml-100k.{suffix}" for suffix in ("inter", "user", "item"))
    ratings = tables.read_table(NAME, inter_path, ("user_id", "item_id", "rating", "timestamp"))
    users = tables.read_table(NAME, user_path, ("user_id", "age", "gender", "occupation", "zip_code"))
    items = tables.read_table(NAME, item_path, ("item_id", "release_year", "class"))

    rating = tables.parse_floats(NAME, inter_path, "rating", ratings["rating"])
    timestamp = tables.parse_floats(NAME, inter_path, "timestamp", ratings["timestamp"]).astype(np.int64)
    order = np.argsort(timestamp, kind="stable")
    timestamp, rating = timestamp[order], rating[order]
    user_ids = [ratings["user_id"][row] for row in order]
    item_ids = [ratings["item_id"][row] for row in order]

    # Join the user and item tables; a rating whose user or movie is not in them gets OOV tokens and no year.
    user_row = {user: row for row, user in enumerate(users["user_id"])}
    item_row = {item: row for row, item in enumerate(items["item_id"])}

    def user_column(transform, column: str) -> list[str]:
        values = users[column]
        return [transform(values[user_row[u]]) if u in user_row else tables.OOV_TOKEN for u in user_ids]

    tokens = {
        "user_id": user_ids,
        "item_id": item_ids,
        "age_bucket": user_column(_age_bucket, "age"),
        "gender": user_column(str, "gender"),
        "occupation": user_column(str, "occupation"),
        "zip_prefix": user_column(lambda zip_code: zip_code[:ZIP_PREFIX_LENGTH], "zip_code"),
        "hour": [str(h) for h in (timestamp // SECONDS_PER_HOUR) % 24],
        "weekday": [str(d) for d in (timestamp // SECONDS_PER_DAY + EPOCH_WEEKDAY) % 7],
    }
    item_genres = [genres.split() for genres in items["class"]]
    genres = [item_genres[item_row[i]] if i in item_row else [tables.OOV_TOKEN] for i in item_ids]
    item_years = _release_years(items["release_year"])
    release_year = np.array([item_years[item_row[i]] if i in item_row else np.nan for i in item_ids])

    num_train = int(round(TRAIN_FRACTION * len(order)))
    vocabularies = {name: tables.build_vocabulary(values[:num_train]) for name, values in tokens.items()}
    vocabularies["genres"] = tables.build_vocabulary(g for row in genres[:num_train] for g in row)
    max_genres = max(len(row) for row in item_genres)

    train_years = release_year[:num_train]
    year_spec = tables.numeric_spec("release_year", train_years[~np.isnan(train_years)])
    release_year = np.where(np.isnan(release_year), year_spec.mean, release_year)
    labels = {"rating": rating, "like": (rating >= 4).astype(np.float32), "love": (rating == 5).astype(np.float32)}

    spec = DatasetSpec(
        features=tuple(tables.categorical_spec(name, vocabularies[name]) for name in _CATEGORICAL_FEATURES)
        + (
            FeatureSpec(
                name="genres",
                kind="multi_hot",
                vocabulary_size=len(vocabularies["genres"]),
                embedding_dim=tables.default_embedding_dim(len(vocabularies["genres"])),
                max_length=max_genres,
            ),
            year_spec,
        ),
        tasks=with_training_label_means(TASKS, {name: column[:num_train] for name, column in labels.items()}),
    )
    features = {name: tables.lookup(vocabularies[name], values) for name, values in tokens.items()}
    features["genres"] = tables.lookup_multi_hot(vocabularies["genres"], genres, max_genres)
    features["release_year"] = release_year

    def split(rows: slice):
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
        sizes={"train": num_train, "test": len(order) - num_train},
        vocabularies=vocabularies,
    )
