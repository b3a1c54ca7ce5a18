"""The tensor conventions of tfrs_clippy/data/spec.py, checked on every dataset, and spec serialization.

`assert_follows_spec` is shared: the dataset test modules import it and run it on the datasets they load.
"""

import numpy as np
import pytest
import tensorflow as tf

from tfrs_clippy import data


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
