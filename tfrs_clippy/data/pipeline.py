"""Input pipelines that keep time order: batching, shuffling only inside a time window, epochs, prefetch.

Speed: `tf.data` pays per example and per tensor when it batches single examples, which with 40 features caps
an input pipeline near 20-40k examples/s. So the loaders of this package build their splits from *chunks*,
blocks of consecutive examples in columns, and return them as `ChunkedExamples`; `make_pipeline` re-cuts those
chunks into batches (`Dataset.rebatch`, a slice per tensor), an order of magnitude faster. `ChunkedExamples` is
its own type, not a `tf.data.Dataset`, so that no dataset operation can drop the chunks unnoticed: what it offers
keeps them (`take`), and `examples()` is the explicit way out to a per-example dataset. `make_pipeline` batches any
other (unbatched) `tf.data.Dataset` example by example once and then runs the same code, with the same result.
"""

from __future__ import annotations

import numbers
from typing import Any, Union

import tensorflow as tf

Example = tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]


def _chunk_size(chunk: Example) -> tf.Tensor:
    """The number of examples in a chunk (every tensor of it has them along its first axis), as int64."""
    return tf.shape(tf.nest.flatten(chunk)[0], out_type=tf.int64)[0]


class ChunkedExamples:
    """Unbatched `(features, labels)` examples in time order, kept as the chunks they come in.

    What `make_pipeline` batches fast. It is deliberately not a `tf.data.Dataset`: any dataset operation on the
    examples (`map`, `filter`, ...) returns a plain per-example dataset, and the pipeline would then batch one
    example at a time without a word. Asking for such an operation raises an AttributeError that points to
    `examples()`, the per-example `tf.data.Dataset`, for when that is really wanted.

    Attributes:
        chunks: Batched `(features, labels)` elements in time order (blocks of consecutive examples, any sizes).
        num_examples: The total number of examples in `chunks`.
    """

    def __init__(self, chunks: tf.data.Dataset, num_examples: int) -> None:
        if not isinstance(chunks, tf.data.Dataset):
            raise TypeError(f"ChunkedExamples: `chunks` must be a tf.data.Dataset, got {type(chunks).__name__}.")
        if isinstance(num_examples, bool) or not isinstance(num_examples, numbers.Integral) or num_examples < 0:
            raise ValueError(f"ChunkedExamples: `num_examples` must be an int >= 0, got {num_examples!r}.")
        self.chunks = chunks
        self.num_examples = int(num_examples)

    @property
    def element_spec(self) -> Any:
        """The structure of one example, as `tf.data.Dataset.element_spec` gives it."""
        return self.chunks.unbatch().element_spec

    def cardinality(self) -> tf.Tensor:
        """The number of examples as an int64 scalar tensor, as `tf.data.Dataset.cardinality()` returns it."""
        return tf.constant(self.num_examples, tf.int64)

    def __len__(self) -> int:
        return self.num_examples

    def take(self, count: int) -> "ChunkedExamples":
        """The first `count` examples (all of them if there are fewer), still in chunks.

        The chunks are cut where `count` falls, not unbatched, and none after it is read.

        Raises:
            ValueError: `count` is not an int >= 0.
        """
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise ValueError(f"ChunkedExamples.take: `count` must be an int >= 0, got {count!r}.")
        count = min(int(count), self.num_examples)
        if count == self.num_examples:
            return self

        def cut(seen: tf.Tensor, chunk: Example) -> tuple[tf.Tensor, tuple[tf.Tensor, Example]]:
            size = _chunk_size(chunk)
            keep = tf.clip_by_value(count - seen, 0, size)
            return seen + size, (seen, tf.nest.map_structure(lambda column: column[:keep], chunk))

        chunks = (
            self.chunks.scan(tf.constant(0, tf.int64), cut)
            .take_while(lambda seen, chunk: seen < count)  # stop at the first chunk after the cut
            .map(lambda seen, chunk: chunk)
        )
        return ChunkedExamples(chunks, count)

    def examples(self) -> tf.data.Dataset:
        """The examples one by one, as a `tf.data.Dataset` of known cardinality: leaves the fast path.

        For dataset operations `ChunkedExamples` does not offer; `make_pipeline` batches the result example by
        example, an order of magnitude slower than it batches `ChunkedExamples`.
        """
        return self.chunks.unbatch().apply(tf.data.experimental.assert_cardinality(self.num_examples))

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes the class lacks: say why a tf.data.Dataset method is missing.
        if not name.startswith("_") and hasattr(tf.data.Dataset, name):
            raise AttributeError(
                f"ChunkedExamples has no `{name}`: a tf.data.Dataset operation would drop the chunks that "
                "make_pipeline batches fast. Call `.examples()` for the per-example tf.data.Dataset (make_pipeline "
                "then batches it one example at a time), or `make_pipeline` first and work on its batches."
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"ChunkedExamples(num_examples={self.num_examples}, element_spec={self.element_spec})"


Examples = Union[ChunkedExamples, tf.data.Dataset]
"""What `make_pipeline` batches: `ChunkedExamples` (fast), or any unbatched `tf.data.Dataset` (per example)."""


def examples_from_chunks(chunks: tf.data.Dataset, num_examples: int) -> ChunkedExamples:
    """The examples of `chunks`, a dataset of blocks of consecutive examples (any block sizes), kept in chunks.

    Args:
        chunks: Batched `(features, labels)` elements in time order.
        num_examples: The total number of examples, which becomes the examples' cardinality.
    """
    return ChunkedExamples(chunks, num_examples)


def _shuffle_within_windows(chunks: tf.data.Dataset, window: int, seed: int, epoch: tf.Tensor) -> tf.data.Dataset:
    """Permutes each block of `window` consecutive examples, with a permutation keyed on (seed, epoch, block).

    Unlike `Dataset.shuffle(buffer)`, where an example can wait in the buffer for arbitrarily long, an example here
    never moves across a block boundary: it stays fewer than `window` positions from where time put it.
    """

    def permute(block_index: tf.Tensor, block: Example) -> Example:
        key = tf.random.experimental.stateless_fold_in(tf.stack([tf.constant(seed, tf.int64), epoch]), block_index)
        order = tf.argsort(tf.random.stateless_uniform([_chunk_size(block)], seed=key))
        return tf.nest.map_structure(lambda column: tf.gather(column, order), block)

    return chunks.rebatch(window).enumerate().map(permute, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def make_pipeline(
    dataset: Examples,
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
        dataset: `(features, labels)` examples in time order: `ChunkedExamples` such as `splits.train`, batched by
            re-cutting its chunks, or any unbatched `tf.data.Dataset`, batched example by example (slower, the
            same batches).
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
        TypeError: `dataset` is neither `ChunkedExamples` nor a `tf.data.Dataset`.
    """
    if batch_size < 1:
        raise ValueError(f"make_pipeline: batch_size must be >= 1, got {batch_size}.")
    if shuffle_window < 0:
        raise ValueError(f"make_pipeline: shuffle_window must be >= 0 (0 keeps time order), got {shuffle_window}.")
    if epochs < 1:
        raise ValueError(f"make_pipeline: epochs must be >= 1, got {epochs}.")
    if isinstance(dataset, ChunkedExamples):
        chunks = dataset.chunks
    elif isinstance(dataset, tf.data.Dataset):
        chunks = dataset.batch(batch_size)  # the per-example cost chunks avoid, paid once
    else:
        raise TypeError(
            f"make_pipeline: dataset must be ChunkedExamples or an unbatched tf.data.Dataset, got "
            f"{type(dataset).__name__}."
        )

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
