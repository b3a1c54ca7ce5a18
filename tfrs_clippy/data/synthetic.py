"""Synthetic multitask ranking data at the scale of real tables, generated as a stream.

Every example is a function of (seed, position in the stream): the stream is cut into chunks of `CHUNK_SIZE`
examples, and chunk `c` draws its randomness from stateless ops keyed on (seed, c). So the data is identical on
every run and machine, any slice of the stream can be generated without the examples before it, and only one chunk
is in memory at a time: 10M examples cost the memory of 4,096.

The hidden teacher:
- Each categorical feature has ids 1..V-1 (id 0, the OOV bucket, never occurs) drawn from a Zipf law with exponent
  `zipf_exponent`: P(id = k) is proportional to k ** -s, so id 1 is the most popular. The 1,024 most popular ids
  are drawn exactly, the rest by rounding a continuous power law (`ids.ZipfSampler`): O(1) memory per example.
- Each id has a teacher embedding, a row of a fixed random table of `TEACHER_BUCKETS` rows picked by a
  multiplicative hash of the id (`ids.hash_bucket`): a 1e7-id vocabulary does not need a 1e7-row table, and head
  ids get distinct rows.
- The numeric feature is standard normal. The teacher's hidden layer is relu of a fixed random projection of the
  concatenated teacher embeddings and numeric values, centred; each task reads it with its own linear head.
- Distribution shift: each task head rotates in the plane of two fixed random directions, by `drift` radians per
  million examples. What the labels mean changes slowly over time, the paper's root cause of instability.
- Tasks are correlated: every head direction mixes a direction shared by all tasks with one of its own.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import tensorflow as tf

from tfrs_clippy.data import ids as ids_module
from tfrs_clippy.data import tables
from tfrs_clippy.data.arguments import is_int, is_number, require
from tfrs_clippy.data.pipeline import ChunkedExamples, examples_from_chunks
from tfrs_clippy.data.spec import DatasetSpec, FeatureSpec, TaskSpec, with_training_label_means

NAME = "synthetic"
CHUNK_SIZE = 4096
"""Examples generated per random draw. Part of the data's definition: changing it changes the data."""

TEACHER_BUCKETS = 1 << 16
TEACHER_DIM = 8
TEACHER_HIDDEN = 32
TASK_CORRELATION = 0.5
"""Share of each head direction's variance that all tasks have in common."""

BINARY_LOGIT_SCALE = 2.0
BINARY_LOGIT_BIAS = -1.0
"""A binary label is Bernoulli(sigmoid(2 * score - 1)) with score ~ N(0, 1): a positive rate near 30%."""

REGRESSION_NOISE = 0.5

LABEL_MEAN_EXAMPLES = 4 * CHUNK_SIZE
"""The spec's `label_mean`s come from the first 16,384 training examples (or all, if fewer): four chunks."""

_RELU_MEAN = 1.0 / math.sqrt(2.0 * math.pi)
"""E[relu(z)] for z ~ N(0, 1)."""


class _Teacher:
    """The fixed random parameters of the hidden teacher, all derived from the seed."""

    def __init__(self, seed: int, num_categorical: int, numeric_dim: int, num_tasks: int) -> None:
        keys = tf.random.experimental.stateless_split(tf.constant([seed, 0], tf.int64), num=num_categorical + 3)
        self.tables = [
            tf.random.stateless_normal([TEACHER_BUCKETS, TEACHER_DIM], seed=keys[f]) for f in range(num_categorical)
        ]
        input_dim = num_categorical * TEACHER_DIM + numeric_dim
        self.projection = tf.random.stateless_normal(
            [input_dim, TEACHER_HIDDEN], seed=keys[num_categorical], stddev=1.0 / math.sqrt(input_dim)
        )
        # A unit-variance pre-activation z gives relu(z) mean 1/sqrt(2 pi) and variance 1/2 - 1/(2 pi); the hidden
        # layer is centred and heads get variance 1 / (HIDDEN * that), so every task's score is near N(0, 1).
        head_std = 1.0 / math.sqrt(TEACHER_HIDDEN * (0.5 - 0.5 / math.pi))
        shared = tf.random.stateless_normal([2, TEACHER_HIDDEN, 1], seed=keys[num_categorical + 1], stddev=head_std)
        own = tf.random.stateless_normal(
            [2, TEACHER_HIDDEN, num_tasks], seed=keys[num_categorical + 2], stddev=head_std
        )
        # heads[0] is each task's direction at position 0; heads[1] the direction it rotates towards.
        self.heads = math.sqrt(TASK_CORRELATION) * shared + math.sqrt(1.0 - TASK_CORRELATION) * own

    def scores(self, ids: Sequence[tf.Tensor], numeric: tf.Tensor, angle: tf.Tensor) -> tf.Tensor:
        """[batch, num_tasks] float32 scores of a chunk; `angle` [batch] is each example's head rotation."""
        embeddings = [tf.gather(table, ids_module.hash_bucket(f_ids, TEACHER_BUCKETS))
                      for table, f_ids in zip(self.tables, ids)]
        hidden = tf.nn.relu(tf.concat(embeddings + [numeric], axis=1) @ self.projection) - _RELU_MEAN
        start, end = hidden @ self.heads[0], hidden @ self.heads[1]
        return tf.cos(angle)[:, None] * start + tf.sin(angle)[:, None] * end


def _require(valid: bool, argument: str, requirement: str, value: object) -> None:
    require(NAME, valid, argument, requirement, value)


def synthetic(
    num_train: int = 1_000_000,
    num_test: int = 100_000,
    vocabulary_sizes: Sequence[int] = (1_000, 10_000, 100_000, 1_000_000, 10_000_000),
    zipf_exponent: float = 1.1,
    numeric_dim: int = 8,
    task_kinds: Sequence[str] = ("binary", "binary", "regression"),
    drift: float = 1.0,
    embedding_dim: int = 16,
    seed: int = 0,
) -> tables.Splits:
    """A streamed synthetic ranking dataset: Zipf ids, numeric features, K tasks from a drifting hidden teacher.

    `train` is the first `num_train` examples of the stream and `test` the next `num_test`: the test data lies in
    the future of the training data, so it has drifted further. There is no validation split.

    Features: `categorical_<i>` for each vocabulary size (vocabulary_size counts the OOV id 0, so ids are
    1..size-1) and one numeric feature `numeric` of width `numeric_dim`, standard normal by construction (the spec
    says mean 0, std 1). Tasks: `binary_<j>` and `regression_<j>`, numbered within each kind, in `task_kinds` order.

    Each task's `label_mean` is the mean label of the first `LABEL_MEAN_EXAMPLES` (16,384) training examples, or
    of all of them if there are fewer (None for a binary task whose labels there are all equal): reading the whole
    stream would cost a pass over up to millions of examples, while four chunks give the prior to about +-0.01 and
    take a fraction of a second. With drift it is the prior at the start of the stream, where training starts.

    Args:
        num_train: Examples in the training split.
        num_test: Examples in the test split, which follows the training split in the stream.
        vocabulary_sizes: One categorical feature per entry, with this `vocabulary_size` (>= 2).
        zipf_exponent: The exponent s of P(id = k) ~ k ** -s (> 0).
        numeric_dim: Width of the numeric feature (>= 1).
        task_kinds: "binary" or "regression" per task.
        drift: Radians the teacher's task heads rotate per million examples (finite; negative turns the other
            way); 0 gives a stationary stream.
        embedding_dim: The spec's embedding width for every categorical feature (>= 1; the model's, not the
            teacher's).
        seed: An int64; everything is a function of the seed: same seed, same data.

    Returns:
        The splits, whose datasets generate examples as they are read.

    Raises:
        ValueError: An argument of the wrong type or out of range, named with its value.
    """
    _require(is_int(num_train) and num_train >= 1, "num_train", "an int >= 1", num_train)
    _require(is_int(num_test) and num_test >= 0, "num_test", "an int >= 0", num_test)
    _require(len(vocabulary_sizes) >= 1, "vocabulary_sizes", "a non-empty sequence", vocabulary_sizes)
    for size in vocabulary_sizes:
        _require(is_int(size) and 2 <= size < 1 << 31, "vocabulary_sizes", "ints in [2, 2**31)", size)
    _require(is_number(zipf_exponent) and zipf_exponent > 0, "zipf_exponent", "a finite number > 0", zipf_exponent)
    _require(is_int(numeric_dim) and numeric_dim >= 1, "numeric_dim", "an int >= 1", numeric_dim)
    _require(len(task_kinds) >= 1, "task_kinds", "a non-empty sequence", task_kinds)
    for kind in task_kinds:
        _require(kind in ("binary", "regression"), "task_kinds", "'binary' or 'regression' per task", kind)
    _require(is_number(drift), "drift", "a finite number (radians per million examples)", drift)
    _require(is_int(embedding_dim) and embedding_dim >= 1, "embedding_dim", "an int >= 1", embedding_dim)
    _require(is_int(seed) and -(1 << 63) <= seed < 1 << 63, "seed", "an int64", seed)
    tasks, counts = [], {"binary": 0, "regression": 0}
    for kind in task_kinds:
        tasks.append(TaskSpec(name=f"{kind}_{counts[kind]}", kind=kind))
        counts[kind] += 1
    spec = DatasetSpec(
        features=tuple(
            FeatureSpec(name=f"categorical_{i}", kind="categorical", vocabulary_size=size, embedding_dim=embedding_dim)
            for i, size in enumerate(vocabulary_sizes)
        )
        + (FeatureSpec(name="numeric", kind="numeric", dim=numeric_dim, mean=0.0, std=1.0),),
        tasks=tuple(tasks),
    )
    teacher = _Teacher(seed, len(vocabulary_sizes), numeric_dim, len(tasks))
    samplers = [ids_module.ZipfSampler(size, zipf_exponent) for size in vocabulary_sizes]
    is_binary = tf.constant([task.kind == "binary" for task in tasks])

    def chunk(chunk_index: tf.Tensor) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
        key = tf.random.experimental.stateless_fold_in(tf.constant([seed, 1], tf.int64), chunk_index)
        id_key, numeric_key, click_key, noise_key = tf.unstack(tf.random.experimental.stateless_split(key, num=4))
        uniforms = tf.random.stateless_uniform([CHUNK_SIZE, len(vocabulary_sizes)], seed=id_key, dtype=tf.float64)
        ids = [sample(uniforms[:, f]) for f, sample in enumerate(samplers)]
        numeric = tf.random.stateless_normal([CHUNK_SIZE, numeric_dim], seed=numeric_key)
        position = chunk_index * CHUNK_SIZE + tf.range(CHUNK_SIZE, dtype=tf.int64)
        angle = tf.cast(position, tf.float32) * (drift / 1e6)
        scores = teacher.scores(ids, numeric, angle)
        label_uniform = tf.random.stateless_uniform([CHUNK_SIZE, len(tasks)], seed=click_key)
        label_noise = tf.random.stateless_normal([CHUNK_SIZE, len(tasks)], seed=noise_key)
        clicked = tf.cast(label_uniform < tf.sigmoid(BINARY_LOGIT_SCALE * scores + BINARY_LOGIT_BIAS), tf.float32)
        labels = tf.where(is_binary, clicked, scores + REGRESSION_NOISE * label_noise)
        features = {f"categorical_{i}": f_ids for i, f_ids in enumerate(ids)}
        features["numeric"] = numeric
        return features, {task.label_key: labels[:, t] for t, task in enumerate(tasks)}

    prior_examples = min(num_train, LABEL_MEAN_EXAMPLES)
    if tf.executing_eagerly():
        prior_chunks = [chunk(tf.constant(c, tf.int64))[1] for c in range(-(-prior_examples // CHUNK_SIZE))]
        prior_labels = {
            key: np.concatenate([labels[key].numpy() for labels in prior_chunks])[:prior_examples]
            for key in prior_chunks[0]
        }
        prior_tasks = with_training_label_means(spec.tasks, prior_labels)
    else:
        # Called while a function is traced (a per-worker dataset_fn under ParameterServerStrategy): the chunks
        # are symbolic here, so an eager call generates the same first examples (the data is a function of the
        # seed and the position) and reads their means.
        with tf.init_scope():
            prior_tasks = synthetic(
                prior_examples, 0, vocabulary_sizes, zipf_exponent, numeric_dim, task_kinds, drift, embedding_dim, seed
            ).spec.tasks
    spec = dataclasses.replace(spec, tasks=prior_tasks)

    def stream(start: int, stop: int) -> ChunkedExamples:
        """Examples [start, stop) of the stream, generated chunk by chunk; the end chunks are cut to the range."""

        def chunk_in_range(chunk_index: tf.Tensor) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
            offset = chunk_index * CHUNK_SIZE
            rows = slice(tf.maximum(start - offset, 0), tf.minimum(stop - offset, CHUNK_SIZE))
            return tf.nest.map_structure(lambda column: column[rows], chunk(chunk_index))

        chunks = tf.data.Dataset.range(start // CHUNK_SIZE, -(-stop // CHUNK_SIZE)).map(
            chunk_in_range, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
        return examples_from_chunks(chunks, stop - start)

    return tables.Splits(
        name=NAME,
        spec=spec,
        train=stream(0, num_train),
        test=stream(num_train, num_train + num_test),
        validation=None,
        sizes={"train": num_train, "test": num_test},
    )
