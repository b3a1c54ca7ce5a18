"""One feature-spec type that describes every dataset's features and tasks; the models take it as input.

Conventions every loader follows, so that a model needs nothing but the spec:
- `categorical`: an int64 scalar id in [0, vocabulary_size); id 0 is the out-of-vocabulary bucket.
- `multi_hot`: an int64 vector of length `max_length`, ids as for categorical, padded with -1.
- `numeric`: a float32 vector of length `dim` (a scalar feature has dim 1 and shape [1]); `mean` and `std`
  are the training split's statistics, which the model uses to normalize.
- labels: one float32 scalar per task, keyed by the task's `label`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

import numpy as np

from tfrs_clippy.data.arguments import is_number

FEATURE_KINDS = ("categorical", "multi_hot", "numeric")
TASK_KINDS = ("binary", "regression")


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """One input feature.

    Attributes:
        name: The key of the feature in the features dictionary.
        kind: "categorical", "multi_hot" or "numeric".
        vocabulary_size: Number of ids, the OOV bucket (id 0) included; categorical and multi_hot only.
        embedding_dim: Width of the embedding; categorical and multi_hot only.
        table: Name of the embedding table; features naming the same table share it. Defaults to `name`.
        max_length: Padded length of a multi_hot feature.
        dim: Width of a numeric feature.
        mean: Training mean of a numeric feature.
        std: Training standard deviation of a numeric feature (> 0).
    """

    name: str
    kind: str
    vocabulary_size: int = 0
    embedding_dim: int = 0
    table: str | None = None
    max_length: int = 1
    dim: int = 1
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("FeatureSpec: `name` must be a non-empty string, got %r." % (self.name,))
        if self.kind not in FEATURE_KINDS:
            raise ValueError(f"FeatureSpec {self.name!r}: `kind` must be one of {FEATURE_KINDS}, got {self.kind!r}.")
        if self.kind == "numeric":
            if self.dim < 1:
                raise ValueError(f"FeatureSpec {self.name!r}: `dim` must be >= 1, got {self.dim}.")
            if not self.std > 0:
                raise ValueError(f"FeatureSpec {self.name!r}: `std` must be > 0, got {self.std}.")
            return
        if self.vocabulary_size < 2:
            raise ValueError(
                f"FeatureSpec {self.name!r}: `vocabulary_size` must be >= 2 (OOV bucket included), "
                f"got {self.vocabulary_size}."
            )
        if self.embedding_dim < 1:
            raise ValueError(f"FeatureSpec {self.name!r}: `embedding_dim` must be >= 1, got {self.embedding_dim}.")
        if self.kind == "multi_hot" and self.max_length < 1:
            raise ValueError(f"FeatureSpec {self.name!r}: `max_length` must be >= 1, got {self.max_length}.")

    @property
    def table_name(self) -> str:
        """The embedding table this feature looks up."""
        return self.table or self.name


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task (one tower, one loss).

    Attributes:
        name: Task name; the key of its prediction and of its metrics.
        kind: "binary" (sigmoid cross-entropy, AUC) or "regression" (MSE, RMSE).
        label: Key of the label in the labels dictionary. Defaults to `name`.
        weight: Weight of the task's loss in the total loss.
        label_mean: The training split's mean label over its labeled examples (for a binary task, the positive
            rate; strictly inside (0, 1)), or None when unknown. Models may start their output at this prior.
    """

    name: str
    kind: str
    label: str | None = None
    weight: float = 1.0
    label_mean: float | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("TaskSpec: `name` must be a non-empty string, got %r." % (self.name,))
        if self.kind not in TASK_KINDS:
            raise ValueError(f"TaskSpec {self.name!r}: `kind` must be one of {TASK_KINDS}, got {self.kind!r}.")
        if not self.weight >= 0:
            raise ValueError(f"TaskSpec {self.name!r}: `weight` must be >= 0, got {self.weight}.")
        if self.label_mean is not None:
            mean = self.label_mean
            if not is_number(mean):
                raise ValueError(f"TaskSpec {self.name!r}: `label_mean` must be None or a finite number, got {mean!r}.")
            # A positive rate of 0 or 1 has no finite log-odds, so it cannot be a binary output's prior.
            if self.kind == "binary" and not 0 < mean < 1:
                raise ValueError(
                    f"TaskSpec {self.name!r}: `label_mean` of a binary task must be strictly inside (0, 1), "
                    f"got {mean!r}."
                )
            # A plain float, so that the spec serializes to JSON and compares equal after a round trip.
            object.__setattr__(self, "label_mean", float(mean))

    @property
    def label_key(self) -> str:
        """The key of this task's label."""
        return self.label or self.name


def training_label_mean(kind: str, labels: np.ndarray) -> float | None:
    """The `TaskSpec.label_mean` of training labels `labels`: their mean, NaN labels (unlabeled) left out.

    The labels are cast to float32 first, as the datasets serve them, and averaged in float64.

    Args:
        kind: The task's kind, "binary" or "regression".
        labels: The training split's labels of the task.

    Returns:
        The mean; None when no label is known, or for a binary task whose labels are all 0 or all 1 (its prior
        would be an infinite logit).
    """
    values = np.asarray(labels, dtype=np.float32).astype(np.float64)
    if not np.any(~np.isnan(values)):
        return None
    mean = float(np.nanmean(values))
    if kind == "binary" and not 0 < mean < 1:
        return None
    return mean


def with_training_label_means(
    tasks: Sequence[TaskSpec], train_labels: Mapping[str, np.ndarray]
) -> tuple[TaskSpec, ...]:
    """`tasks` with `label_mean` set from the training labels (keyed by `label_key`); see `training_label_mean`."""
    return tuple(
        dataclasses.replace(task, label_mean=training_label_mean(task.kind, train_labels[task.label_key]))
        for task in tasks
    )


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """The features and tasks of a dataset."""

    features: tuple[FeatureSpec, ...]
    tasks: tuple[TaskSpec, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        for kind, names in (("feature", [f.name for f in self.features]), ("task", [t.name for t in self.tasks])):
            duplicated = sorted({n for n in names if names.count(n) > 1})
            if duplicated:
                raise ValueError(f"DatasetSpec: duplicated {kind} names {duplicated}.")
        if not self.tasks:
            raise ValueError("DatasetSpec: `tasks` must name at least one task, got none.")
        tables: dict[str, FeatureSpec] = {}
        for feature in self.features:
            if feature.kind == "numeric":
                continue
            first = tables.setdefault(feature.table_name, feature)
            if (first.vocabulary_size, first.embedding_dim) != (feature.vocabulary_size, feature.embedding_dim):
                raise ValueError(
                    f"DatasetSpec: features {first.name!r} and {feature.name!r} share table "
                    f"{feature.table_name!r} but differ in vocabulary_size or embedding_dim."
                )

    def feature(self, name: str) -> FeatureSpec:
        """The feature called `name`."""
        for feature in self.features:
            if feature.name == name:
                return feature
        raise KeyError(f"DatasetSpec has no feature {name!r}; features: {[f.name for f in self.features]}.")

    def task(self, name: str) -> TaskSpec:
        """The task called `name`."""
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"DatasetSpec has no task {name!r}; tasks: {[t.name for t in self.tasks]}.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": [dataclasses.asdict(f) for f in self.features],
            "tasks": [dataclasses.asdict(t) for t in self.tasks],
        }

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "DatasetSpec":
        return cls(
            features=tuple(FeatureSpec(**f) for f in config["features"]),
            tasks=tuple(TaskSpec(**t) for t in config["tasks"]),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "DatasetSpec":
        return cls.from_dict(json.loads(text))

