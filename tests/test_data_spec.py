"""The tensor conventions of tfrs_clippy/data/spec.py, checked on every dataset, and spec serialization.

`assert_follows_spec` is shared: the dataset test modules import it and run it on the datasets they load.
"""

import re

import numpy as np
import pytest
import tensorflow as tf

from tfrs_clippy import data
from tfrs_clippy.data.spec import training_label_mean


def columns(dataset: tf.data.Dataset):
    """A whole (small) unbatched dataset as one `(features, labels)` pair of numpy arrays."""
    return tf.nest.map_structure(lambda tensor: tensor.numpy(), next(iter(data.make_pipeline(dataset, 1 << 30))))


def assert_follows_spec(dataset: tf.data.Dataset, spec: data.DatasetSpec) -> None:
    """Keys, dtypes, shapes and id ranges of `dataset` are those the spec's conventions promise."""
    features_signature, labels_signature = dataset.element_spec
    assert sorted(features_signature) == sorted(f.name for f in spec.features)
    assert sorted(labels_signature) == sorted(t.label_key for t in spec.tasks)
    for task in spec.tasks:
        assert labels_signature[task.label_key].dtype == tf.float32
        assert labels_signature[task.label_key].shape == ()
    features, labels = columns(dataset.take(5000))
    for feature in spec.features:
        signature, values = features_signature[feature.name], features[feature.name]
        if feature.kind == "numeric":
            assert (signature.dtype, signature.shape) == (tf.float32, (feature.dim,)), feature.name
            assert np.all(np.isfinite(values)), feature.name
        elif feature.kind == "categorical":
            assert (signature.dtype, signature.shape) == (tf.int64, ()), feature.name
            assert values.min() >= 0 and values.max() < feature.vocabulary_size, feature.name
        else:
            assert (signature.dtype, signature.shape) == (tf.int64, (feature.max_length,)), feature.name
            assert values.min() >= data.tables.MULTI_HOT_PADDING and values.max() < feature.vocabulary_size
            # Padding only at the end: after the first -1 of a row, every entry is -1.
            padded = values == data.tables.MULTI_HOT_PADDING
            assert np.all(padded[:, 1:] >= padded[:, :-1]), feature.name
    for task in spec.tasks:
        if task.kind == "binary":
            assert set(np.unique(labels[task.label_key])) <= {0.0, 1.0}, task.name


def test_synthetic_follows_spec_and_round_trips_json():
    splits = data.synthetic(num_train=5000, num_test=100, vocabulary_sizes=(100, 10_000_000))
    assert_follows_spec(splits.train, splits.spec)
    assert data.DatasetSpec.from_json(splits.spec.to_json()) == splits.spec


def test_follows_spec_rejects_a_dataset_that_breaks_the_conventions():
    spec = data.DatasetSpec(
        features=(data.FeatureSpec(name="item", kind="categorical", vocabulary_size=3, embedding_dim=2),),
        tasks=(data.TaskSpec(name="click", kind="binary"),),
    )
    out_of_range = tf.data.Dataset.from_tensor_slices(
        ({"item": np.array([1, 3], np.int64)}, {"click": np.array([0, 1], np.float32)})
    )
    with pytest.raises(AssertionError):
        assert_follows_spec(out_of_range, spec)
    wrong_dtype = tf.data.Dataset.from_tensor_slices(
        ({"item": np.array([1, 2], np.int32)}, {"click": np.array([0, 1], np.float32)})
    )
    with pytest.raises(AssertionError):
        assert_follows_spec(wrong_dtype, spec)


def test_label_mean_is_validated_naming_the_task_the_field_and_the_value():
    assert data.TaskSpec("click", "binary", label_mean=0.25).label_mean == 0.25
    assert data.TaskSpec("rating", "regression", label_mean=-3).label_mean == -3.0
    for kind, bad in [
        ("binary", 0.0), ("binary", 1.0), ("binary", 1.5), ("binary", -0.1),
        ("regression", float("nan")), ("regression", float("inf")), ("regression", "3.5"), ("regression", True),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=r"TaskSpec 'task': `label_mean` .*got " + re.escape(repr(bad))):
            data.TaskSpec("task", kind, label_mean=bad)


def test_label_mean_round_trips_and_old_dicts_without_it_still_load():
    spec = data.DatasetSpec(
        features=(data.FeatureSpec(name="item", kind="categorical", vocabulary_size=3, embedding_dim=2),),
        # A numpy scalar, as a loader computes it, is stored as a float so that the spec serializes to JSON.
        tasks=(data.TaskSpec("click", "binary", label_mean=np.float32(0.25)), data.TaskSpec("rating", "regression")),
    )
    assert type(spec.task("click").label_mean) is float
    assert data.DatasetSpec.from_json(spec.to_json()) == spec
    assert data.DatasetSpec.from_dict(spec.to_dict()).task("click").label_mean == 0.25
    old = spec.to_dict()
    for task in old["tasks"]:
        del task["label_mean"]
    assert [task.label_mean for task in data.DatasetSpec.from_dict(old).tasks] == [None, None]


def test_training_label_mean_skips_nan_labels_and_degenerate_rates():
    assert training_label_mean("regression", np.array([1.0, np.nan, 4.0])) == 2.5
    assert training_label_mean("binary", np.array([1.0, 0.0, np.nan, 0.0, 0.0])) == 0.25
    assert training_label_mean("regression", np.array([np.nan, np.nan])) is None
    assert training_label_mean("binary", np.array([1.0, np.nan, 1.0])) is None  # log-odds would be infinite
    assert training_label_mean("binary", np.zeros(3)) is None
