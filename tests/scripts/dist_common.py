"""A small embedding + dense model trained with a custom loop under any `tf.distribute` strategy.

Shared by the optimizer-level strategy scripts (`dist_mirrored.py`, `dist_multi_worker.py`). Both runtimes: the
model is built from Keras layers of this process's runtime and trained with `GradientTape`, so Keras 2 and Keras 3
take the same code path (the optimizer's `apply_gradients` in a replica context, which all-reduces the gradients).

Every replica reads `GLOBAL_BATCH / replicas` consecutive rows of each global batch (replica r the r-th slice), so
one device reading whole global batches sees the same examples per step, and the loss is averaged over the global
batch on both: the step is the same function of the same data.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import tensorflow as tf

import tfrs_clippy
from tfrs_clippy.keras_runtime import LEGACY_KERAS, keras

VOCABULARY, EMBEDDING_DIM, IDS_PER_EXAMPLE, NUMERIC_DIM = 6, 4, 2, 3
GLOBAL_BATCH, STEPS = 16, 20
# Hyper-parameters at which every method actually scales its updates in the first steps (else the test is vacuous).
METHOD_OPTIONS = {
    "naive": {},
    "gc": {"threshold": 1e-2},
    "agc": {"threshold": 1e-3},
    "lamb": {"trust_scale": 1e-2},
    "clippy": {"variable_relative_threshold": 0.5, "absolute_threshold": 1e-2},
    # Adam's steps are ~lr per coordinate: at lr 0.3 the paper's thresholds clip; lazy rows keep the table sparse.
    "clippy_adam": {"sparse_updates": "lazy"},
}
LEARNING_RATE = 0.3
CASES = ("clippy_sparse", "clippy_dense", "gc_sparse", "agc_sparse", "lamb_sparse", "naive_sparse",
         "clippy_adam_sparse", "clippy_adam_dense")
"""<method>_<sparse|dense>: whether the table's gradient stays sparse (IndexedSlices) or is densified.

"adagrad" (Keras's own Adagrad) is also a method here, the reference for the communication count."""


def examples(steps: int = STEPS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids [n, 2] from a 6-id vocabulary (so ids repeat within and across replicas), numeric [n, 3], target [n]."""
    rng = np.random.default_rng(0)
    n = steps * GLOBAL_BATCH
    ids = rng.integers(0, VOCABULARY, (n, IDS_PER_EXAMPLE)).astype(np.int32)
    numeric = rng.standard_normal((n, NUMERIC_DIM)).astype(np.float32)
    target = (np.sin(ids[:, 0]) + numeric @ np.array([1.0, -2.0, 0.5])).astype(np.float32)
    return ids, numeric, target


def build_model() -> keras.Model:
    """embedding(ids) averaged, concatenated with numeric -> Dense(4, relu) -> Dense(1); fixed initial weights."""
    keras.utils.set_random_seed(1)
    ids = keras.Input((IDS_PER_EXAMPLE,), dtype="int32")
    numeric = keras.Input((NUMERIC_DIM,))
    embedded = keras.layers.Embedding(VOCABULARY, EMBEDDING_DIM, name="embedding")(ids)
    pooled = keras.layers.GlobalAveragePooling1D()(embedded)
    hidden = keras.layers.Dense(4, activation="relu", name="hidden")(keras.layers.Concatenate()([pooled, numeric]))
    return keras.Model([ids, numeric], keras.layers.Dense(1, name="output")(hidden))


def build_optimizer(case: str) -> Any:
    """The case's optimizer, clipping embeddings too (so the sparse path is clipped), exporting its factors."""
    method = case.rsplit("_", 1)[0]
    if method == "adagrad":
        return keras.optimizers.Adagrad(LEARNING_RATE)
    return tfrs_clippy.build_optimizer(
        method, LEARNING_RATE, include_embeddings=True, export_clipping_factors=True, **METHOD_OPTIONS[method]
    )


def tf_variable(variable: Any) -> tf.Variable:
    """The TensorFlow variable behind a Keras 3 variable; TensorFlow variables (and Keras 2's) as they are."""
    return variable if LEGACY_KERAS or isinstance(variable, tf.Variable) else variable.value


def local_values(strategy: tf.distribute.Strategy, variable: Any) -> list[np.ndarray]:
    """The value of `variable` held by each replica of this process (one value for a non-mirrored variable)."""
    return [np.asarray(v) for v in strategy.experimental_local_results(tf_variable(variable))]


def slots(optimizer: Any, variable: Any) -> list:
    """The optimizer state of `variable`: Adagrad's accumulator, or Adam's two moments."""
    if isinstance(optimizer, tfrs_clippy.optimizers.ScaledAdam):
        return [optimizer.momentum(variable), optimizer.velocity(variable)]
    return [optimizer.accumulator(variable)]


def make_step(strategy: tf.distribute.Strategy, model: keras.Model, optimizer: Any, densify: bool) -> Callable:
    """A tf.function running one training step on every replica of `strategy`."""

    def replica_step(ids: tf.Tensor, numeric: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            prediction = tf.squeeze(model([ids, numeric], training=True), axis=1)
            loss = tf.nn.compute_average_loss(tf.square(prediction - target), global_batch_size=GLOBAL_BATCH)
        gradients = tape.gradient(loss, model.trainable_variables)
        if densify:
            gradients = [tf.convert_to_tensor(g) for g in gradients]
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    @tf.function
    def step(batch: tuple) -> tf.Tensor:
        return strategy.run(replica_step, args=batch)

    return step


def distributed_batches(strategy: tf.distribute.Strategy, steps: int = STEPS) -> Any:
    """The global batches, replica r of input pipeline p reading its slice (see the module docstring)."""
    data = tf.data.Dataset.from_tensor_slices(examples(steps))

    def per_pipeline(context: tf.distribute.InputContext) -> tf.data.Dataset:
        per_replica = context.get_per_replica_batch_size(GLOBAL_BATCH)
        return data.batch(per_replica).shard(context.num_input_pipelines, context.input_pipeline_id)

    return strategy.distribute_datasets_from_function(per_pipeline)


def set_up(case: str, strategy: tf.distribute.Strategy) -> tuple[keras.Model, Any, Callable]:
    """The model, the case's optimizer (slots built) and the step function, all made under `strategy`."""
    with strategy.scope():
        model = build_model()
        optimizer = build_optimizer(case)
        # Slots are created here, under the scope, not lazily inside the first replica step.
        optimizer.build(model.trainable_variables)
    return model, optimizer, make_step(strategy, model, optimizer, densify=case.endswith("_dense"))


def train(case: str, strategy: Optional[tf.distribute.Strategy] = None, steps: int = STEPS) -> dict[str, list]:
    """Trains the model `steps` steps under `strategy` (default: one device); returns weights, slots and factors.

    Every value is, per variable, a list over the replicas of this process, so equality across replicas can be
    checked.
    """
    strategy = strategy or tf.distribute.get_strategy()
    model, optimizer, step = set_up(case, strategy)
    for batch in distributed_batches(strategy, steps):
        step(batch)
    variables = model.trainable_variables
    return {
        "weights": [local_values(strategy, v) for v in variables],
        "slots": [local_values(strategy, slot) for v in variables for slot in slots(optimizer, v)],
        "clipping_factors": [local_values(strategy, f) for f in optimizer.clipping_factors],
    }


def collective_op_counts(case: str, strategy: tf.distribute.Strategy) -> dict[str, int]:
    """{op type: count} of the collective (cross-replica communication) ops in the graph of the case's step.

    Counts the ops of the step's graph and of every function it calls (the library), so communication inside
    nested functions (e.g. the optimizer's XLA-fused update) would be counted too.
    """
    _, _, step = set_up(case, strategy)
    batch = next(iter(distributed_batches(strategy, 1)))
    graph_def = step.get_concrete_function(batch).graph.as_graph_def()
    nodes = list(graph_def.node) + [node for f in graph_def.library.function for node in f.node_def]
    counts: dict[str, int] = {}
    for node in nodes:
        if "Collective" in node.op or "AllReduce" in node.op or "Nccl" in node.op:
            counts[node.op] = counts.get(node.op, 0) + 1
    return counts


def max_difference(first: list, second: list, relative: bool = False) -> float:
    """The largest absolute (or relative to `second`, floored at 1) difference between two lists of arrays."""
    differences = []
    for a, b in zip(first, second):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = np.maximum(np.abs(b), 1.0) if relative else 1.0
        differences.append(float(np.max(np.abs(a - b) / scale)))
    return max(differences)
