"""make_pipeline: batching, exact order at window 0, shuffling bounded by the window, seeds, epochs, fast path;
ChunkedExamples, the fast path's type."""

import numpy as np
import pytest
import tensorflow as tf

from tfrs_clippy import data
from tfrs_clippy.data import pipeline

NUM_EXAMPLES = 1000


def positions_dataset(num_examples: int = NUM_EXAMPLES, chunk_size: int = 0) -> "pipeline.ChunkedExamples":
    """Examples whose feature is their time position, as a loader of this package builds them (chunks of
    `chunk_size` examples, the last one shorter; 0: one chunk)."""
    positions = np.arange(num_examples, dtype=np.int64)
    columns = ({"position": positions}, {"label": positions.astype(np.float32) % 2})
    if chunk_size:
        chunks = tf.data.Dataset.from_tensor_slices(columns).batch(chunk_size)
    else:
        chunks = tf.data.Dataset.from_tensors(columns)
    return pipeline.examples_from_chunks(chunks, num_examples)


def positions(batches: tf.data.Dataset) -> list[np.ndarray]:
    return [features["position"].numpy() for features, _ in batches]


def test_window_zero_keeps_exact_time_order_in_batches():
    batches = positions(data.make_pipeline(positions_dataset(), batch_size=128))
    assert [len(batch) for batch in batches] == [128] * 7 + [104]
    np.testing.assert_array_equal(np.concatenate(batches), np.arange(NUM_EXAMPLES))
    dropped = positions(data.make_pipeline(positions_dataset(), batch_size=128, drop_remainder=True))
    assert [len(batch) for batch in dropped] == [128] * 7


@pytest.mark.parametrize("window", [10, 64, 1000])
def test_shuffle_moves_examples_only_within_their_window(window):
    order = np.concatenate(positions(data.make_pipeline(positions_dataset(), batch_size=100, shuffle_window=window)))
    assert sorted(order) == list(range(NUM_EXAMPLES))  # a permutation: nothing lost or repeated
    np.testing.assert_array_equal(order // window, np.arange(NUM_EXAMPLES) // window)  # each stays in its block
    assert np.abs(order - np.arange(NUM_EXAMPLES)).max() < window
    assert np.mean(order != np.arange(NUM_EXAMPLES)) > 0.8  # and it did shuffle


def test_shuffle_is_a_function_of_the_seed():
    def order(seed):
        batches = data.make_pipeline(positions_dataset(), batch_size=100, shuffle_window=50, seed=seed)
        return np.concatenate(positions(batches))

    np.testing.assert_array_equal(order(seed=7), order(seed=7))
    assert not np.array_equal(order(seed=7), order(seed=8))


def test_labels_stay_with_their_features():
    for features, labels in data.make_pipeline(positions_dataset(), batch_size=64, shuffle_window=100):
        np.testing.assert_array_equal(labels["label"].numpy(), features["position"].numpy() % 2)


def test_epochs_repeat_the_data_with_a_new_shuffle_each():
    batches = data.make_pipeline(positions_dataset(), batch_size=100, shuffle_window=20, epochs=3, seed=1)
    order = np.concatenate(positions(batches))
    assert len(order) == 3 * NUM_EXAMPLES
    epochs = order.reshape(3, NUM_EXAMPLES)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(NUM_EXAMPLES))
        np.testing.assert_array_equal(epoch // 20, np.arange(NUM_EXAMPLES) // 20)
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    sequential = np.concatenate(positions(data.make_pipeline(positions_dataset(), batch_size=100, epochs=2)))
    np.testing.assert_array_equal(sequential, np.tile(np.arange(NUM_EXAMPLES), 2))


@pytest.mark.parametrize("shuffle_window, epochs", [(0, 1), (37, 2)])
def test_any_dataset_gives_the_same_batches_as_the_fast_path(shuffle_window, epochs):
    """A plain per-example dataset (here: mapped) is batched per example, with the same result."""
    fast = positions_dataset()
    generic = fast.examples().map(lambda features, labels: (features, labels))
    assert isinstance(generic, tf.data.Dataset) and not isinstance(generic, pipeline.ChunkedExamples)
    arguments = dict(batch_size=64, shuffle_window=shuffle_window, epochs=epochs, seed=5)
    fast_batches = positions(data.make_pipeline(fast, **arguments))
    generic_batches = positions(data.make_pipeline(generic, **arguments))
    assert len(fast_batches) == len(generic_batches)
    for fast_batch, generic_batch in zip(fast_batches, generic_batches, strict=True):
        np.testing.assert_array_equal(fast_batch, generic_batch)


def test_synthetic_stream_batches_across_its_chunks():
    splits = data.synthetic(num_train=10_000, num_test=0, vocabulary_sizes=(1_000,))
    batches = list(data.make_pipeline(splits.train, batch_size=512, drop_remainder=True))
    assert len(batches) == 10_000 // 512
    assert all(batch[0]["categorical_0"].shape == (512,) for batch in batches)
    one_by_one = np.concatenate(
        [features["categorical_0"].numpy() for features, _ in splits.train.examples().batch(512)]
    )
    np.testing.assert_array_equal(np.concatenate([b[0]["categorical_0"].numpy() for b in batches]), one_by_one[:9728])


@pytest.mark.parametrize(
    "arguments, message",
    [({"batch_size": 0}, "batch_size"), ({"shuffle_window": -1}, "shuffle_window"), ({"epochs": 0}, "epochs")],
)
def test_bad_arguments_raise(arguments, message):
    with pytest.raises(ValueError, match=message):
        data.make_pipeline(positions_dataset(), **{"batch_size": 32, **arguments})


# ChunkedExamples: the fast path as a type ----------------------------------------------------------------------


def test_take_stays_in_chunks_cut_where_the_count_falls():
    examples = positions_dataset(chunk_size=300)  # chunks of 300, 300, 300, 100
    taken = examples.take(700)
    assert isinstance(taken, pipeline.ChunkedExamples) and taken.num_examples == 700 and len(taken) == 700
    chunk_sizes = [len(features["position"]) for features, _ in taken.chunks]
    assert chunk_sizes == [300, 300, 100]  # cut inside the third chunk, the fourth never read
    batches = positions(data.make_pipeline(taken, batch_size=256))
    assert [len(batch) for batch in batches] == [256, 256, 188]
    np.testing.assert_array_equal(np.concatenate(batches), np.arange(700))
    # The same examples, in the same batches, as the per-example dataset's take.
    generic = positions(data.make_pipeline(examples.examples().take(700), batch_size=256))
    np.testing.assert_array_equal(np.concatenate(generic), np.arange(700))
    # Cut at a chunk boundary, past the end, at 0; and taken twice.
    assert [len(f["position"]) for f, _ in examples.take(600).chunks] == [300, 300]
    assert examples.take(5000) is examples
    assert list(examples.take(0).chunks) == [] and examples.take(0).num_examples == 0
    np.testing.assert_array_equal(np.concatenate(positions(data.make_pipeline(taken.take(350), 100))), np.arange(350))


def test_take_of_a_loaders_split_is_the_split_s_first_examples_in_chunks():
    # What `scripts/reproduce.py --eval-examples` does with the held-out split; chunks of 4096 examples here.
    splits = data.synthetic(num_train=8_192, num_test=10_000, vocabulary_sizes=(1_000,))
    taken = splits.test.take(5000)
    assert [len(labels["binary_0"]) for _, labels in taken.chunks] == [4096, 904]
    (features, _), = list(data.make_pipeline(taken, batch_size=8192))
    (expected, _), = list(splits.test.examples().take(5000).batch(8192))
    np.testing.assert_array_equal(features["categorical_0"].numpy(), expected["categorical_0"].numpy())


def test_dataset_operations_are_not_offered_but_examples_leaves_the_fast_path_explicitly():
    examples = positions_dataset(chunk_size=300)
    with pytest.raises(AttributeError, match=r"no `map`.*\.examples\(\)"):
        examples.map(lambda features, labels: (features, labels))
    with pytest.raises(AttributeError, match="no `batch`"):
        examples.batch(10)
    with pytest.raises(AttributeError, match="no attribute 'not_a_dataset_method'"):
        examples.not_a_dataset_method  # pylint: disable=pointless-statement
    per_example = examples.examples()
    assert isinstance(per_example, tf.data.Dataset)
    assert int(per_example.cardinality()) == NUM_EXAMPLES == int(examples.cardinality())
    assert examples.element_spec == per_example.element_spec
    assert examples.element_spec[0]["position"] == tf.TensorSpec((), tf.int64)


def test_chunked_examples_and_make_pipeline_check_their_arguments():
    with pytest.raises(ValueError, match=r"`count` must be an int >= 0, got -1"):
        positions_dataset().take(-1)
    with pytest.raises(ValueError, match=r"`num_examples` must be an int >= 0, got -3"):
        pipeline.ChunkedExamples(tf.data.Dataset.range(3).batch(2), -3)
    with pytest.raises(TypeError, match=r"`chunks` must be a tf.data.Dataset, got list"):
        pipeline.ChunkedExamples([1, 2], 2)
    with pytest.raises(TypeError, match=r"dataset must be ChunkedExamples or an unbatched tf.data.Dataset, got dict"):
        data.make_pipeline({"position": np.arange(3)}, batch_size=2)
