"""The MultitaskBalancer in `fit`, in both Keras runtimes: logs, solve cadence, reductions, XLA, errors, config."""

import numpy as np
import pytest
import tensorflow as tf

import tfrs_clippy
from tfrs_clippy.keras_runtime import keras
from tfrs_clippy.multitask import BalancingConfig, MultitaskBalancer

from numpy_oracle import keras_adam_moments, keras_adam_update, nash_bargaining_weights

VOCABULARY = 50


class ToyRanker(keras.Model):
    """An embedding and a shared layer, one linear head per task; `task_of_head[i]` is the label task i fits."""

    def __init__(self, task_of_head, balancing=None, detached_task: bool = False):
        super().__init__()
        self.table = keras.layers.Embedding(VOCABULARY, 4)
        self.shared = keras.layers.Dense(8, activation="tanh")
        self.heads = [keras.layers.Dense(1) for _ in task_of_head]
        self.task_of_head = list(task_of_head)
        self.detached_task = detached_task
        names = [f"t{i}" for i in range(len(task_of_head))]
        self.balancer = None if balancing is None else MultitaskBalancer(names, balancing)
        self(tf.zeros([1], tf.int64))

    def call(self, ids, training=False):
        hidden = self.shared(self.table(ids))
        return [head(hidden)[:, 0] for head in self.heads]

    def task_losses(self, ids, labels):
        outputs = self(ids, training=True)
        losses = [tf.reduce_mean(tf.square(out - labels[:, task]))
                  for out, task in zip(outputs, self.task_of_head, strict=True)]
        if self.detached_task:  # the last task reads only its own head's bias
            losses[-1] = tf.reduce_mean(tf.square(self.heads[-1].bias - 1.0))
        return losses

    def train_step(self, data):
        ids, labels = data
        if self.balancer is None:
            with tf.GradientTape() as tape:
                loss = tf.add_n(self.task_losses(ids, labels))
            self.optimizer.apply_gradients(zip(tape.gradient(loss, self.trainable_variables), self.trainable_variables))
            return {"loss": loss}
        shared = self.table.trainable_variables + self.shared.trainable_variables
        specific = [variable for head in self.heads for variable in head.trainable_variables]
        return self.balancer.minimize(self.optimizer, lambda: self.task_losses(ids, labels), shared, specific)


def _data(num_batches: int = 12, batch: int = 32) -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCABULARY, num_batches * batch)
    labels = np.stack([np.sin(ids), np.cos(ids), (ids % 3) - 1.0], axis=1).astype(np.float32)
    return tf.data.Dataset.from_tensor_slices((ids, labels)).batch(batch)


class BatchLogs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.logs = []

    def on_train_batch_end(self, batch, logs=None):
        self.logs.append({key: float(value) for key, value in logs.items()})


def _fit(model, optimizer, jit_compile=False, epochs=1) -> list[dict]:
    model.compile(optimizer=optimizer, jit_compile=jit_compile)
    recorder = BatchLogs()
    model.fit(_data(), epochs=epochs, verbose=0, callbacks=[recorder])
    return recorder.logs


def test_pub_logs_weights_and_cosines_every_step_and_holds_alpha_between_solves():
    keras.utils.set_random_seed(0)
    model = ToyRanker([0, 1, 2], {"method": "pub", "solve_every": 4})
    logs = _fit(model, keras.optimizers.Adam(0.01))
    assert len(logs) == 12
    weights = np.array([[step[f"weight_t{i}"] for i in range(3)] for step in logs])
    np.testing.assert_allclose(weights.sum(axis=1), 3.0, rtol=1e-5)  # normalized: sum to K
    for step in logs:
        assert {"cosine_t0_t1", "cosine_t0_t2", "cosine_t1_t2", "loss"} <= set(step)
        assert all(-1.0 <= step[key] <= 1.0 for key in step if key.startswith("cosine"))
    changes = [i for i in range(1, 12) if not np.allclose(weights[i], weights[i - 1])]
    assert set(changes) <= {4, 8} and changes, f"alpha must change only when solved (steps 0, 4, 8): {changes}"


def test_nash_scaling_keeps_the_bargaining_solution():
    keras.utils.set_random_seed(0)
    model = ToyRanker([0, 1], {"method": "pub", "alpha_scaling": "nash", "solve_every": 1})
    logs = _fit(model, keras.optimizers.Adam(0.01))
    # K = 2: alpha_i = 1 / (|d_i| sqrt(1 + cos)) ~ 1 / |d_i|, with |d_i| ~ lr * sqrt(#parameters): far from 1.
    assert all(step["weight_t0"] > 5.0 and step["weight_t1"] > 5.0 for step in logs)


@pytest.mark.parametrize("method", ["pub", "nash_mtl"])
def test_identical_tasks_with_unit_weights_train_exactly_like_the_summed_loss(method):
    """Two identical tasks get alpha = (1, 1); Adagrad with the delayed accumulator is linear in g, so PUB (and
    Nash-MTL, whose optimizer sees g1 + g2) must reproduce the base optimizer on the summed loss exactly."""
    make = lambda: tfrs_clippy.Adagrad(0.1, accumulator_update="delayed")  # noqa: E731
    keras.utils.set_random_seed(0)
    balanced = ToyRanker([0, 0], {"method": method, "solve_every": 1})
    keras.utils.set_random_seed(0)
    plain = ToyRanker([0, 0])
    for model in (balanced, plain):
        model.heads[1].set_weights(model.heads[0].get_weights())
    logs = _fit(balanced, make())
    _fit(plain, make())
    np.testing.assert_allclose([logs[-1]["weight_t0"], logs[-1]["weight_t1"]], [1.0, 1.0], rtol=1e-5)
    for ours, reference in zip(balanced.trainable_variables, plain.trainable_variables, strict=True):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=1e-5, atol=1e-6)


def test_uncertainty_weighting_learns_log_variances():
    keras.utils.set_random_seed(0)
    model = ToyRanker([0, 1, 2], "uncertainty")
    logs = _fit(model, keras.optimizers.Adam(0.05), epochs=3)
    assert any(variable is model.balancer.log_variances for variable in model.trainable_variables)
    log_variances = np.asarray(model.balancer.log_variances)
    # The logged weights are those the last step used, one optimizer step before the final log-variances.
    np.testing.assert_allclose([logs[-1][f"weight_t{i}"] for i in range(3)], np.exp(-log_variances), rtol=0.1)
    assert np.all(np.abs(log_variances) > 0.05), log_variances


CLIPPY_OPTIMIZERS = {
    "clippy_adagrad": lambda: tfrs_clippy.ClippyAdagrad.from_paper(0.1),
    # lr 0.02: above ~1.4e-3, where the rule can fire (lambda_abs 1e-2).
    "clippy_adam": lambda: tfrs_clippy.ClippyAdam(0.02),
}


@pytest.mark.parametrize("clip", ["per_task", "combined"])
@pytest.mark.parametrize("optimizer", sorted(CLIPPY_OPTIMIZERS))
def test_pub_over_clippy_under_xla_matches_graph_mode(optimizer, clip):
    finals = []
    for jit_compile in (False, True):
        keras.utils.set_random_seed(0)
        model = ToyRanker([0, 1, 2], {"method": "pub", "solve_every": 2, "clip": clip})
        logs = _fit(model, CLIPPY_OPTIMIZERS[optimizer](), jit_compile=jit_compile)
        finals.append((logs[-1], [np.asarray(v) for v in model.trainable_variables]))
    (graph_logs, graph_weights), (xla_logs, xla_weights) = finals
    assert graph_logs.keys() == xla_logs.keys()
    for key in graph_logs:
        np.testing.assert_allclose(xla_logs[key], graph_logs[key], rtol=1e-3, atol=1e-5)
    for xla, graph in zip(xla_weights, graph_weights, strict=True):
        np.testing.assert_allclose(xla, graph, rtol=1e-3, atol=1e-5)


def test_a_task_without_a_path_to_the_shared_variables_is_an_error():
    model = ToyRanker([0, 1], "pub", detached_task=True)
    with pytest.raises(ValueError, match="task 't1' has no gradient path to the shared variables"):
        _fit(model, keras.optimizers.Adam(0.01))


def test_pub_refuses_an_optimizer_it_cannot_read():
    model = ToyRanker([0, 1], "pub")
    with pytest.raises(ValueError, match="needs Adam or an optimizer of tfrs_clippy"):
        _fit(model, keras.optimizers.SGD(0.01))


@pytest.mark.parametrize(
    "task_names, balancing, message",
    [
        (["only"], "pub", "at least 2 tasks"),
        (["a", "a"], "pub", "repeated names"),
        (["a", "b"], "mgda", "`method` must be one of"),
        (["a", "b"], {"method": "pub", "alpha_scaling": "sum"}, "`alpha_scaling` must be one of"),
        (["a", "b"], {"method": "pub", "solve_every": 0}, "`solve_every` must be an integer >= 1"),
        (["a", "b"], {"method": "pub", "ridge": -1.0}, "`ridge` must be a number >= 0"),
        (["a", "b"], {"method": "pub", "clip": "both"}, r"`clip` must be one of \(.*\), got 'both'"),
        (["a", "b"], {"methd": "pub"}, r"unknown options \['methd'\]"),
    ],
)
def test_invalid_options_are_clear_errors(task_names, balancing, message):
    with pytest.raises(ValueError, match=message):
        MultitaskBalancer(task_names, balancing)


def test_options_serialize():
    config = BalancingConfig(
        method="pub", alpha_scaling="nash", solve_every=3, max_solver_iterations=7, clip="combined"
    )
    assert config.to_dict()["clip"] == "combined"
    assert BalancingConfig.from_value(config.to_dict()) == config
    assert BalancingConfig.from_value("uncertainty") == BalancingConfig(method="uncertainty")
    balancer = MultitaskBalancer(["a", "b", "c"], config, name="balancer")
    restored = MultitaskBalancer.from_config(balancer.get_config())
    assert restored.balancing == config and restored.task_names == ["a", "b", "c"] and restored.name == "balancer"
    assert keras.layers.deserialize(keras.layers.serialize(balancer)).balancing == config


def _data_with_a_nan_label(step: int, num_batches: int = 12, batch: int = 32) -> tf.data.Dataset:
    """`_data`, with task 1's label NaN on one example of batch `step`."""
    ids, labels = next(iter(_data(num_batches, batch).unbatch().batch(num_batches * batch)))
    labels = labels.numpy()
    labels[step * batch, 1] = np.nan
    return tf.data.Dataset.from_tensor_slices((ids, labels)).batch(batch)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda: tfrs_clippy.ClippyAdagrad.from_paper(0.1, export_clipping_factors=True),
        lambda: tfrs_clippy.Adagrad(0.1),
        lambda: tfrs_clippy.ClippyAdam(0.02, export_clipping_factors=True),
    ],
    ids=["clippy", "adagrad", "clippy_adam"],
)
def test_pub_skips_and_counts_a_non_finite_gradient(make_optimizer):
    """Batch 4 (a solve step) has a NaN label of task 1: every variable task 1 reaches (the shared ones, its head)
    keeps its value and state and counts one skipped step; alpha is held, and training goes on."""
    keras.utils.set_random_seed(0)
    model = ToyRanker([0, 1], {"method": "pub", "solve_every": 2})
    optimizer = make_optimizer()
    model.compile(optimizer=optimizer)
    recorder = BatchLogs()
    model.fit(_data_with_a_nan_label(4), verbose=0, callbacks=[recorder])
    assert all(np.all(np.isfinite(np.asarray(variable))) for variable in model.trainable_variables)
    shared = model.table.trainable_variables + model.shared.trainable_variables
    counts = {id(v): int(optimizer.slots_of(v).nonfinite_steps) for v in model.trainable_variables}
    for variable in shared + model.heads[1].trainable_variables:
        assert counts[id(variable)] == 1, variable.name
    for variable in model.heads[0].trainable_variables:
        assert counts[id(variable)] == 0, variable.name
    assert all(np.isfinite(step[f"weight_t{i}"]) for step in recorder.logs for i in range(2))
    assert recorder.logs[5]["weight_t0"] == recorder.logs[3]["weight_t0"]  # held through the NaN solve step
    assert recorder.logs[6]["weight_t0"] != recorder.logs[5]["weight_t0"]  # and solved again after it


# PUB's weights against an independent NumPy/SciPy oracle -----------------------------------------------------------

NUM_TASKS, WIDTH, ROWS = 3, 6, 4


def _least_squares_tasks(seed: int = 0):
    """K least-squares tasks L_i(w) = |A_i w - b_i|^2 / 2 on one shared w, with column scales from 0.1 to 10 so that
    Adam's per-coordinate normalization changes the tasks' geometry: their updates are not their gradients."""
    rng = np.random.default_rng(seed)
    scales = np.array([0.1, 0.3, 1.0, 3.0, 10.0, 1.0])
    matrices = rng.normal(size=(NUM_TASKS, ROWS, WIDTH)) * scales
    targets = rng.normal(size=(NUM_TASKS, ROWS))
    return matrices.astype(np.float32), targets.astype(np.float32), rng.normal(size=WIDTH).astype(np.float32)


class _SharedWeights(keras.layers.Layer):
    def __init__(self, initial):
        super().__init__()
        self.w = self.add_weight(name="w", shape=initial.shape, initializer="zeros", trainable=True)
        self.w.assign(initial)


def _balanced_adam_steps(method, alpha_scaling, steps, learning_rate=0.05):
    """The balancer's logged weights and final w over `steps` steps of Keras's Adam (solve_every = 1)."""
    matrices, targets, initial = _least_squares_tasks()
    shared = _SharedWeights(initial)
    balancer = MultitaskBalancer([f"t{i}" for i in range(NUM_TASKS)],
                                 {"method": method, "alpha_scaling": alpha_scaling, "solve_every": 1})
    optimizer = keras.optimizers.Adam(learning_rate)

    def task_losses():
        w = tf.convert_to_tensor(shared.w)
        return [0.5 * tf.reduce_sum(tf.square(tf.linalg.matvec(matrices[i], w) - targets[i]))
                for i in range(NUM_TASKS)]

    step = tf.function(lambda: balancer.minimize(optimizer, task_losses, [shared.w], []))
    weights = []
    for _ in range(steps):
        logs = step()
        weights.append([float(logs[f"weight_t{i}"]) for i in range(NUM_TASKS)])
    return np.array(weights), np.asarray(shared.w)


def _oracle_adam_steps(method, alpha_scaling, steps, learning_rate=0.05, ridge=1e-6):
    """The same steps in NumPy (float64): Keras's Adam candidates d_i from the shared moments, alpha from
    `nash_bargaining_weights` on D D^T ("pub") or G G^T ("nash_mtl"), rescaled to sum to K if "normalized"; PUB
    moves w by sum_i alpha_i d_i and both advance the moments with sum_i alpha_i g_i (Nash-MTL also moves w by
    Adam's step on it).

    Returns the weights used, the final w and, per step, the Nash solution on the *other* Gram matrix (gradients
    for "pub", updates for "nash_mtl"), scaled the same way.
    """
    matrices, targets, w = (np.asarray(x, np.float64) for x in _least_squares_tasks())
    momentum, velocity = np.zeros(WIDTH), np.zeros(WIDTH)
    used, other = [], []

    def scale(alpha):
        return alpha if alpha_scaling == "nash" else NUM_TASKS * alpha / alpha.sum()

    for t in range(1, steps + 1):
        grads = np.stack([matrices[i].T @ (matrices[i] @ w - targets[i]) for i in range(NUM_TASKS)])
        updates = np.stack([keras_adam_update(momentum, velocity, g, learning_rate, t) for g in grads])
        on_updates = nash_bargaining_weights(updates @ updates.T, ridge)
        on_grads = nash_bargaining_weights(grads @ grads.T, ridge)
        alpha, alternative = (on_updates, on_grads) if method == "pub" else (on_grads, on_updates)
        alpha = scale(alpha)  # what the step applies
        combined = alpha @ grads
        move = alpha @ updates if method == "pub" else keras_adam_update(momentum, velocity, combined,
                                                                         learning_rate, t)
        momentum, velocity = keras_adam_moments(momentum, velocity, combined)
        w = w - move
        used.append(alpha)
        other.append(scale(alternative))
    return np.array(used), w, np.array(other)


# The library steps in float32, the oracle in float64: the largest error measured is 1e-5 (PUB, Nash scale; the
# weights are ~1 / |d|). 1e-4 keeps a tenfold margin and is 400x below the smallest PUB / Nash-MTL gap (> 0.4).
ORACLE_RTOL = 1e-4


@pytest.mark.parametrize("alpha_scaling", ["nash", "normalized"])
@pytest.mark.parametrize("method", ["pub", "nash_mtl"])
def test_weights_are_the_nash_solution_on_the_updates_for_pub_and_on_the_gradients_for_nash_mtl(method, alpha_scaling):
    """Three tasks that are not identical, three steps of Keras's Adam (so the moments are not zero from step 2):
    PUB's alpha is the bargaining solution on the updates' Gram matrix D D^T, Nash-MTL's on the gradients' G G^T,
    each against a SciPy solve on matrices built in NumPy; and the two differ, so the test tells them apart."""
    steps = 3
    weights, w = _balanced_adam_steps(method, alpha_scaling, steps)
    expected, expected_w, other = _oracle_adam_steps(method, alpha_scaling, steps)
    np.testing.assert_allclose(weights, expected, rtol=ORACLE_RTOL)
    np.testing.assert_allclose(w, expected_w, rtol=ORACLE_RTOL, atol=1e-6)
    # Normalized, the two methods' weights differ by more than 5% on some task at every step.
    normalized = expected / expected.sum(axis=1, keepdims=True)
    other_normalized = other / other.sum(axis=1, keepdims=True)
    assert np.all(np.max(np.abs(normalized / other_normalized - 1.0), axis=1) > 0.05), (expected, other)
