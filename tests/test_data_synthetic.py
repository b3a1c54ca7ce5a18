"""The synthetic stream: Zipf exponent, determinism, streaming slices, drift and argument checks."""

import math
import re

import numpy as np
import pytest
import tensorflow as tf
from test_data_spec import columns

from tfrs_clippy import data
from tfrs_clippy.data.synthetic import CHUNK_SIZE


def fitted_zipf_exponent(ids: np.ndarray, top_ranks: int = 100) -> float:
    """Minus the slope of log(frequency) against log(rank), over the `top_ranks` most frequent ids."""
    frequencies = np.sort(np.bincount(ids))[::-1][:top_ranks]
    ranks = np.arange(1, top_ranks + 1)
    return -np.polyfit(np.log(ranks), np.log(frequencies), 1)[0]


@pytest.mark.parametrize("exponent", [0.8, 1.1, 1.5])
def test_ids_follow_zipf_law_with_the_requested_exponent(exponent):
    splits = data.synthetic(num_train=200_000, num_test=0, vocabulary_sizes=(10_000_000,), zipf_exponent=exponent)
    ids = columns(splits.train)[0]["categorical_0"]
    assert fitted_zipf_exponent(ids) == pytest.approx(exponent, abs=0.05)
    # Id k is the k-th most popular: id 1 is drawn about 2 ** s times as often as id 2.
    counts = np.bincount(ids, minlength=3)
    assert counts[0] == 0
    assert counts[1] / counts[2] == pytest.approx(2**exponent, rel=0.05)


def test_fit_tells_exponents_apart():
    """The Zipf test can fail: a sample with exponent 1.5 does not fit 1.1."""
    splits = data.synthetic(num_train=50_000, num_test=0, vocabulary_sizes=(1_000,), zipf_exponent=1.5)
    assert abs(fitted_zipf_exponent(columns(splits.train)[0]["categorical_0"]) - 1.1) > 0.2


def test_vocabularies_from_1e3_to_1e7_keep_ids_in_range():
    splits = data.synthetic(num_train=20_000, num_test=0)
    features, _ = columns(splits.train)
    for index, size in enumerate((1_000, 10_000, 100_000, 1_000_000, 10_000_000)):
        feature = splits.spec.feature(f"categorical_{index}")
        assert feature.vocabulary_size == size
        ids = features[feature.name]
        assert ids.min() >= 1 and ids.max() < size
    # The tail is reached: with s = 1.1 a 1e7 vocabulary yields ids above 1e6 in 20k draws.
    assert features["categorical_4"].max() > 1_000_000
    assert [task.name for task in splits.spec.tasks] == ["binary_0", "binary_1", "regression_0"]


def test_same_seed_same_data_different_seed_different_data():
    def draw(seed):
        splits = data.synthetic(num_train=10_000, num_test=1_000, seed=seed)
        return columns(splits.train), columns(splits.test)

    first, again, other = draw(seed=3), draw(seed=3), draw(seed=4)
    for name, column in first[0][0].items():
        np.testing.assert_array_equal(column, again[0][0][name])
        assert not np.array_equal(column, other[0][0][name]), name
    for name, column in first[1][1].items():
        np.testing.assert_array_equal(column, again[1][1][name])
        assert not np.array_equal(column, other[1][1][name]), name


def test_splits_are_consecutive_slices_of_one_stream():
    whole = columns(data.synthetic(num_train=10_000, num_test=0).train)
    cut = data.synthetic(num_train=6_001, num_test=3_999)
    train, test = columns(cut.train), columns(cut.test)
    assert cut.sizes == {"train": 6_001, "test": 3_999}
    for part in (0, 1):
        for name, column in whole[part].items():
            np.testing.assert_array_equal(np.concatenate([train[part][name], test[part][name]]), column)


def _chunk_pipeline(chunks: tf.data.Dataset) -> tuple[list, tuple]:
    """The dataset ops of `chunks` (its serialized graph) and the (start, stop, step) of its RangeDataset."""
    graph = tf.compat.v1.GraphDef.FromString(tf.raw_ops.DatasetToGraphV2(input_dataset=chunks._variant_tensor).numpy())
    nodes = {node.name: node for node in graph.node}
    ops = [node.op for node in graph.node if "Dataset" in node.op]
    (range_node,) = [node for node in graph.node if node.op == "RangeDataset"]
    bounds = tuple(int(tf.make_ndarray(nodes[name].attr["value"].tensor)) for name in range_node.input[:3])
    return ops, bounds


def test_ten_million_examples_stream_without_generating_what_is_skipped():
    """The test split after 10M training examples generates only the one chunk it lies in, counted rather than
    timed: its pipeline is a map over the chunk ids [2441, 2442) and nothing that drops elements (a map runs once
    per id, so one chunk of 4,096 examples is generated; generating the stream from 0 and skipping would need
    ids from 0 and a skip), and reading it yields that one chunk, cut to the 10 examples."""
    splits = data.synthetic(num_train=10_000_000, num_test=10)
    assert splits.train.cardinality().numpy() == 10_000_000
    assert splits.train.chunks.cardinality().numpy() == -(-10_000_000 // CHUNK_SIZE) == 2_442
    for split, chunk_ids in ((splits.train, (0, 2_442, 1)), (splits.test, (2_441, 2_442, 1))):
        ops, bounds = _chunk_pipeline(split.chunks)
        assert set(ops) <= {"RangeDataset", "MapDataset", "ParallelMapDataset", "ParallelMapDatasetV2"}, ops
        assert bounds == chunk_ids
    assert [len(labels["binary_0"]) for _, labels in splits.test.chunks] == [10]
    far = columns(splits.test)
    shifted = columns(data.synthetic(num_train=10_000_000 - 5, num_test=15).test)
    for name, column in far[0].items():
        np.testing.assert_array_equal(shifted[0][name][5:], column)


def test_labels_have_sensible_rates_and_drift_changes_them_over_time():
    def labels(drift):
        splits = data.synthetic(num_train=300_000, num_test=0, vocabulary_sizes=(1_000, 100_000), drift=drift)
        return columns(splits.train)

    (features, still), (same_features, drifting) = labels(drift=0.0), labels(drift=5.0)
    for name, column in features.items():
        np.testing.assert_array_equal(column, same_features[name])  # drift moves the teacher, not the features
    for name in ("binary_0", "binary_1"):
        assert 0.15 < still[name].mean() < 0.5
    assert 0.5 < still["regression_0"].std() < 2.0
    # At the start of the stream the two teachers agree; 300k examples later the heads have rotated by 1.5 rad.
    start, end = slice(0, 20_000), slice(-20_000, None)
    regression_gap = np.abs(drifting["regression_0"] - still["regression_0"])
    assert regression_gap[start].mean() < 0.1
    assert regression_gap[end].mean() > 0.5
    assert np.mean(drifting["binary_0"][end] != still["binary_0"][end]) > 0.1


def test_label_means_come_from_the_first_16384_training_examples():
    splits = data.synthetic(num_train=20_000, num_test=0, vocabulary_sizes=(1_000,))
    _, labels = columns(splits.train)
    for task in splits.spec.tasks:
        first = labels[task.label_key][:16_384].astype(np.float64)
        assert task.label_mean == pytest.approx(np.nanmean(first), abs=1e-12), task.name
        assert task.label_mean != np.nanmean(labels[task.label_key].astype(np.float64)), task.name
    # A training split shorter than that: all of it (5,000 examples, two chunks, the second one cut).
    short = data.synthetic(num_train=5_000, num_test=100, vocabulary_sizes=(1_000,))
    _, short_labels = columns(short.train)
    for task in short.spec.tasks:
        assert task.label_mean == pytest.approx(np.nanmean(short_labels[task.label_key].astype(np.float64)), abs=1e-12)


def test_label_means_are_the_same_when_the_stream_is_built_while_a_function_is_traced():
    """A per-worker dataset_fn (ParameterServerStrategy) calls synthetic() while tracing, where tensors are symbolic."""
    arguments = {"num_train": 5_000, "num_test": 0, "vocabulary_sizes": (1_000,), "seed": 7}
    traced = {}

    @tf.function
    def build():
        traced["spec"] = data.synthetic(**arguments).spec
        return tf.constant(0)

    build()
    assert traced["spec"] == data.synthetic(**arguments).spec
    assert all(task.label_mean is not None for task in traced["spec"].tasks)


@pytest.mark.parametrize(
    "argument, value, bad",
    [
        ("num_train", 0, 0),
        ("num_train", 2.5, 2.5),
        ("num_test", -1, -1),
        ("vocabulary_sizes", (), ()),
        ("vocabulary_sizes", (1_000, 1), 1),
        ("vocabulary_sizes", (1 << 31,), 1 << 31),
        ("zipf_exponent", 0.0, 0.0),
        ("zipf_exponent", math.nan, math.nan),
        ("numeric_dim", 0, 0),
        ("task_kinds", (), ()),
        ("task_kinds", ("binary", "ranking"), "ranking"),
        ("drift", math.nan, math.nan),
        ("drift", math.inf, math.inf),
        ("embedding_dim", 0, 0),
        ("embedding_dim", 8.0, 8.0),
        ("seed", 1 << 63, 1 << 63),
        ("seed", "0", "0"),
    ],
)
def test_bad_arguments_raise_naming_the_argument_and_the_value(argument, value, bad):
    message = re.escape(f"synthetic: `{argument}` must be ") + ".*" + re.escape(f"got {bad!r}.")
    with pytest.raises(ValueError, match=message):
        data.synthetic(**{argument: value})
