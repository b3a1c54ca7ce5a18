"""Small hand-made specs and in-memory batches for the model tests (they do not depend on the data loaders)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest

from tfrs_clippy.data.spec import DatasetSpec, FeatureSpec, TaskSpec

Batch = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]

@pytest.fixture
def tiny_spec() -> DatasetSpec:
    """Every feature kind, a shared table, and one task of each kind; input width 4 + 4 + 4 + 2 = 14."""
    return DatasetSpec(
        features=(
            FeatureSpec("user", "categorical", vocabulary_size=10, embedding_dim=4),
            FeatureSpec("item", "categorical", vocabulary_size=20, embedding_dim=4, table="items"),
            FeatureSpec("history", "multi_hot", vocabulary_size=20, embedding_dim=4, table="items", max_length=3),
            FeatureSpec("age", "numeric", dim=2, mean=1.0, std=2.0),
        ),
        tasks=(TaskSpec("click", "binary"), TaskSpec("rating", "regression", weight=0.5)),
    )


@pytest.fixture
def make_batch() -> Callable[..., Batch]:
    """make_batch(spec, size, seed) -> (features, labels): random features, labels learnable from the user id."""

    def make(spec: DatasetSpec, size: int = 64, seed: int = 0) -> Batch:
        rng = np.random.default_rng(seed)
        features: dict[str, np.ndarray] = {}
        for feature in spec.features:
            if feature.kind == "categorical":
                features[feature.name] = rng.integers(0, feature.vocabulary_size, size)
            elif feature.kind == "multi_hot":
                ids = rng.integers(0, feature.vocabulary_size, (size, feature.max_length))
                # Pad a random tail of each row with -1, as the data convention does.
                lengths = rng.integers(0, feature.max_length + 1, size)
                ids[np.arange(feature.max_length)[np.newaxis, :] >= lengths[:, np.newaxis]] = -1
                features[feature.name] = ids
            else:
                features[feature.name] = rng.normal(feature.mean, feature.std, (size, feature.dim)).astype(np.float32)
        signal = features[spec.features[0].name] % 2
        labels = {}
        for task in spec.tasks:
            if task.kind == "binary":
                labels[task.label_key] = np.where(rng.random(size) < 0.8, signal, 1 - signal).astype(np.float32)
            else:
                labels[task.label_key] = (signal + rng.normal(0.0, 0.3, size)).astype(np.float32)
        return features, labels

    return make
