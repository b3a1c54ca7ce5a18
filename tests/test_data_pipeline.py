"""make_pipeline: batching, exact order at window 0, shuffling bounded by the window, seeds, epochs, fast path."""

import numpy as np
import pytest
import tensorflow as tf

from tfrs_clippy import data
from tfrs_clippy.data import pipeline

NUM_EXAMPLES = 1000


def positions_dataset(num_examples: int = NUM_EXAMPLES) -> tf.data.Dataset:
    """Examples whose feature is their time position, as a loader of this package builds them (one chunk)."""
    positions = np.arange(num_examples, dtype=np.int64)
    chunk = tf.data.Dataset.from_tensors(({"position": positions}, {"label": positions.astype(np.float32) % 2}))
    return pipeline.examples_from_chunks(chunk, num_examples)


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
    """A dataset the pipeline does not know (here: mapped) is batched per example, with the same result."""
    fast = positions_dataset()
    generic = fast.map(lambda features, labels: (features, labels))
    assert pipeline._CHUNKS.get(generic) is None
    arguments = dict(batch_size=64, shuffle_window=shuffle_window, epochs=epochs, seed=5)
    fast_batches = positions(data.make_pipeline(fast, **arguments))
    generic_batches = positions(data.make_pipeline(generic, **arguments))
    assert len(fast_batches) == len(generic_batches)
    for fast_batch, generic_batch in zip(fast_batches, generic_batches):
        np.testing.assert_array_equal(fast_batch, generic_batch)


def test_synthetic_stream_batches_across_its_chunks():
    splits = data.synthetic(num_train=10_000, num_test=0, vocabulary_sizes=(1_000,))
    batches = list(data.make_pipeline(splits.train, batch_size=512, drop_remainder=True))
    assert len(batches) == 10_000 // 512
    assert all(batch[0]["categorical_0"].shape == (512,) for batch in batches)
    one_by_one = np.concatenate([features["categorical_0"].numpy() for features, _ in splits.train.batch(512)])
    np.testing.assert_array_equal(np.concatenate([b[0]["categorical_0"].numpy() for b in batches]), one_by_one[:9728])


@pytest.mark.parametrize(
    "arguments, message",
    [({"batch_size": 0}, "batch_size"), ({"shuffle_window": -1}, "shuffle_window"), ({"epochs": 0}, "epochs")],
)
def test_bad_arguments_raise(arguments, message):
    with pytest.raises(ValueError, match=message):
        data.make_pipeline(positions_dataset(), **{"batch_size": 32, **arguments})
