"""Datasets, feature specs and input pipelines."""

from tfrs_clippy.data.spec import DatasetSpec, FeatureSpec, TaskSpec

__all__ = ["DatasetSpec", "FeatureSpec", "TaskSpec"]
