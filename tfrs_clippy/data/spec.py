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
from typing import Any, Mapping

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
    """

    name: str
    kind: str
    label: str | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("TaskSpec: `name` must be a non-empty string, got %r." % (self.name,))
        if self.kind not in TASK_KINDS:
            raise ValueError(f"TaskSpec {self.name!r}: `kind` must be one of {TASK_KINDS}, got {self.kind!r}.")
        if not self.weight >= 0:
            raise ValueError(f"TaskSpec {self.name!r}: `weight` must be >= 0, got {self.weight}.")

    @property
    def label_key(self) -> str:
        """The key of this task's label."""
        return self.label or self.name


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

