"""Input pipelines that keep time order: batching, shuffling only inside a time window, epochs, prefetch.

Speed: `tf.data` pays per example and per tensor when it batches single examples, which with 40 features caps
an input pipeline near 20-40k examples/s. So the loaders of this package build their datasets from *chunks*,
blocks of consecutive examples in columns, and register them with `examples_from_chunks`; `make_pipeline` re-cuts
those chunks into batches (`Dataset.rebatch`, a slice per tensor), an order of magnitude faster. Any other dataset
is batched example by example once and then goes through the same code, with the same result.
"""

from __future__ import annotations

import weakref

import tensorflow as tf

Example = tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]

_CHUNKS: "weakref.WeakKeyDictionary[tf.data.Dataset, tf.data.Dataset]" = weakref.WeakKeyDictionary()
"""Unbatched datasets made by `examples_from_chunks`, mapped to the chunks they unbatch."""


def examples_from_chunks(chunks: tf.data.Dataset, num_examples: int) -> tf.data.Dataset:
    """The unbatched examples of `chunks`, a dataset of blocks of consecutive examples (any block sizes).

    `make_pipeline` recognizes the returned dataset and batches it by re-cutting `chunks`.

    Args:
        chunks: Batched `(features, labels)` elements in time order.
        num_examples: The total number of examples, which becomes the dataset's cardinality.
    """
    examples = chunks.unbatch().apply(tf.data.experimental.assert_cardinality(num_examples))
    _CHUNKS[examples] = chunks
    return examples


def _shuffle_within_windows(chunks: tf.data.Dataset, window: int, seed: int, epoch: tf.Tensor) -> tf.data.Dataset:
    """Permutes each block of `window` consecutive examples, with a permutation keyed on (seed, epoch, block).

    Unlike `Dataset.shuffle(buffer)`, where an example can wait in the buffer for arbitrarily long, an example here
    never moves across a block boundary: it stays fewer than `window` positions from where time put it.
    """

    def permute(block_index: tf.Tensor, block: Example) -> Example:
        key = tf.random.experimental.stateless_fold_in(tf.stack([tf.constant(seed, tf.int64), epoch]), block_index)
        size = tf.shape(tf.nest.flatten(block)[0], out_type=tf.int64)[0]
        order = tf.argsort(tf.random.stateless_uniform([size], seed=key))
        return tf.nest.map_structure(lambda column: tf.gather(column, order), block)

    return chunks.rebatch(window).enumerate().map(permute, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def make_pipeline(
    dataset: tf.data.Dataset,
    batch_size: int,
    shuffle_window: int = 0,
    seed: int = 0,
    epochs: int = 1,
    drop_remainder: bool = False,
    prefetch: bool = True,
) -> tf.data.Dataset:
    """Batches of a time-ordered dataset, shuffled only within time windows, for one or several epochs.

    The paper trains one pass over the data in time order ("sequential training", `epochs=1, shuffle_window=0`).
    A moving window relaxes that: consecutive blocks of `shuffle_window` examples are each shuffled, so that an
    example moves fewer than `shuffle_window` positions, never across the block boundaries. The shuffle is a
    function of (seed, epoch, block): the same arguments give the same batches, and each epoch a new order.

    Args:
        dataset: Unbatched `(features, labels)` examples in time order, e.g. `splits.train`.
        batch_size: Examples per batch (>= 1).
        shuffle_window: Size of the blocks shuffled; 0 or 1 keeps the exact order.
        seed: Seed of the shuffle.
        epochs: Passes over the data (>= 1), one after the other; each keeps the time order up to the window.
        drop_remainder: Drop the final batch if it is smaller than `batch_size`, for fixed batch shapes. The
            epochs are batched as one stream, so a batch can span two epochs and only the final one can be short.
        prefetch: Prepare batches in the background while the model trains.

    Returns:
        The batched dataset.

    Raises:
        ValueError: `batch_size`, `shuffle_window` or `epochs` is out of range.
    """
    if batch_size < 1:
        raise ValueError(f"make_pipeline: batch_size must be >= 1, got {batch_size}.")
    if shuffle_window < 0:
        raise ValueError(f"make_pipeline: shuffle_window must be >= 0 (0 keeps time order), got {shuffle_window}.")
    if epochs < 1:
        raise ValueError(f"make_pipeline: epochs must be >= 1, got {epochs}.")
    chunks = _CHUNKS.get(dataset)
    if chunks is None:
        chunks = dataset.batch(batch_size)

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        if shuffle_window <= 1:
            return chunks
        return _shuffle_within_windows(chunks, shuffle_window, seed, epoch)

    if epochs == 1:
        all_chunks = one_epoch(tf.constant(0, tf.int64))
    else:
        all_chunks = tf.data.Dataset.range(epochs).flat_map(one_epoch)
    batches = all_chunks.rebatch(batch_size, drop_remainder=drop_remainder)
    options = tf.data.Options()
    options.deterministic = True
    batches = batches.with_options(options)
    return batches.prefetch(tf.data.AUTOTUNE) if prefetch else batches
