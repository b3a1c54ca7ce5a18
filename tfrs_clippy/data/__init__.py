"""Datasets, feature specs and input pipelines.

Every dataset function returns `Splits`: `ChunkedExamples` of `(features, labels)` dictionaries in time order, and
the `DatasetSpec` that describes them; `make_pipeline` batches them for training.
"""

from tfrs_clippy.data.census import census_income
from tfrs_clippy.data.movielens import movielens_100k
from tfrs_clippy.data.pipeline import ChunkedExamples, make_pipeline
from tfrs_clippy.data.shock import shock_stream
from tfrs_clippy.data.spec import DatasetSpec, FeatureSpec, TaskSpec
from tfrs_clippy.data.synthetic import synthetic
from tfrs_clippy.data.tables import OOV_TOKEN, DataError, MissingDataPackageError, Splits

__all__ = [
    "ChunkedExamples",
    "DataError",
    "DatasetSpec",
    "FeatureSpec",
    "MissingDataPackageError",
    "OOV_TOKEN",
    "Splits",
    "TaskSpec",
    "census_income",
    "make_pipeline",
    "movielens_100k",
    "shock_stream",
    "synthetic",
]
