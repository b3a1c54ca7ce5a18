"""ClippyAdam against Keras's own Adam, an independent NumPy oracle and its own invariants, in either runtime."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

import tfrs_clippy
from tfrs_clippy import ClippyAdam, keras

INF = dict(variable_relative_threshold=math.inf, absolute_threshold=math.inf)
# Tight enough that most steps clip at lr 0.05, so the tests see sigma < 1 as well as sigma = 1.
TIGHT = dict(variable_relative_threshold=0.02, absolute_threshold=1e-3)
# The paper's absolute threshold with a tighter relative one: at lr 0.02 some steps clip and most do not.
MIXED = dict(variable_relative_threshold=0.1, absolute_threshold=1e-2)
SHAPE = (6, 4)


def random_problem(seed: int, steps: int = 20, sparse_rows: int = 0, shape=SHAPE, repeats: bool = True):
    """Initial weights and gradients: dense arrays, or (values, indices) pairs (repeated ids allowed) when sparse."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=shape).astype(np.float32)
    grads = []
    for _ in range(steps):
        scale = rng.choice([0.1, 1.0, 10.0])
        if sparse_rows:
            indices = rng.choice(shape[0], size=sparse_rows, replace=repeats).astype(np.int64)
            grads.append(((scale * rng.normal(size=(sparse_rows,) + shape[1:])).astype(np.float32), indices))
        else:
            grads.append((scale * rng.normal(size=shape)).astype(np.float32))
    return weights, grads


def to_tf(grad, shape=SHAPE):
    if isinstance(grad, tuple):
        values, indices = grad
        return tf.IndexedSlices(tf.constant(values), tf.constant(indices), tf.constant(shape, tf.int64))
    return tf.constant(grad)


def run(optimizer, weights, grads, in_function=True, jit_compile=False):
    """Applies the gradients one step at a time; returns the variable, per-step weights and clipping factors."""
    variable = tf.Variable(weights, name="w")
    apply = optimizer.apply_gradients
    if in_function:
        apply = tf.function(apply, jit_compile=jit_compile)
    history, factors = [np.array(weights)], []
    for grad in grads:
        apply([(to_tf(grad, weights.shape), variable)])
        history.append(variable.numpy())
        if getattr(optimizer, "export_clipping_factors", False):
            factors.append(float(optimizer.clipping_factors[0].numpy()))
    return variable, history, factors


class AdamOracle:
    """Clippy Adam in NumPy float64, written from the formulas (not from the implementation).

    m = b1 m + (1 - b1) g ; v = b2 v + (1 - b2) g^2 ; u = lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
    sigma = min(1, min_i (rel |w_i| + abs) / |u_i|) over the tensor (axis None) or each slice along `axis`;
    w -= sigma u. `lazy`: a sparse gradient updates only its distinct rows' m, v and w.
    """

    def __init__(self, weights, lr, rel, abs_, axis=None, lazy=False, b1=0.9, b2=0.999, eps=1e-7, rms=None):
        self.rms = rms  # StableAdamW's d: sigma <= 1 / max(1, RMS(g / (sqrt(v_hat) + eps_hat)) / d)
        self.w = np.array(weights, np.float64)
        self.m = np.zeros_like(self.w)
        self.v = np.zeros_like(self.w)
        self.t = 0
        self.lr, self.rel, self.abs, self.axis, self.lazy = lr, rel, abs_, axis, lazy
        self.b1, self.b2, self.eps = b1, b2, eps

    def _sigma(self, w, u, g, v):
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(u == 0, 1.0, (self.rel * np.abs(w) + self.abs) / np.abs(u))
        axes = tuple(range(u.ndim)) if self.axis is None else tuple(a for a in range(u.ndim) if a != self.axis % u.ndim)
        sigma = np.minimum(1.0, ratio.min(axis=axes, keepdims=True))
        if self.rms is not None:
            correction = 1 - self.b2 ** self.t
            normalized = g / (np.sqrt(v / correction) + self.eps / math.sqrt(correction))
            rms = np.sqrt(np.mean(normalized**2, axis=axes, keepdims=True))
            sigma = np.minimum(sigma, 1.0 / np.maximum(1.0, rms / self.rms))
        return sigma * np.ones_like(u)

    def step(self, grad) -> float:
        self.t += 1
        if isinstance(grad, tuple) and self.lazy:
            values, indices = grad
            rows = np.unique(indices)
            g = np.zeros((len(rows),) + self.w.shape[1:])
            for value, index in zip(values, indices, strict=True):
                g[np.searchsorted(rows, index)] += value
        else:
            if isinstance(grad, tuple):
                dense = np.zeros_like(self.w)
                np.add.at(dense, grad[1], grad[0])
                grad = dense
            rows, g = slice(None), np.asarray(grad, np.float64)
        m = self.b1 * self.m[rows] + (1 - self.b1) * g
        v = self.b2 * self.v[rows] + (1 - self.b2) * g * g
        lr_t = self.lr * math.sqrt(1 - self.b2 ** self.t) / (1 - self.b1 ** self.t)
        u = lr_t * m / (np.sqrt(v) + self.eps)
        sigma = self._sigma(self.w[rows], u, g, v)
        self.m[rows], self.v[rows] = m, v
        self.w[rows] = self.w[rows] - sigma * u
        return float(sigma.min())


# Keras's Adam is the reference ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("in_function", [False, True])
def test_infinite_thresholds_equal_keras_adam(sparse, amsgrad, in_function):
    # Distinct ids: on repeated ids Keras 3's Adam adds each duplicate's g^2 to v, not (sum g)^2 (its base does not
    # sum duplicates, Keras 2's does), so it is not Adam on the summed gradient there; see the next test.
    weights, grads = random_problem(seed=3, sparse_rows=4 if sparse else 0, repeats=False)
    ours, _, _ = run(ClippyAdam(learning_rate=0.05, amsgrad=amsgrad, **INF), weights, grads, in_function)
    theirs, _, _ = run(keras.optimizers.Adam(learning_rate=0.05, amsgrad=amsgrad), weights, grads, in_function)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sparse_updates", ["dense", "lazy"])
def test_repeated_ids_equal_the_summed_gradient(sparse_updates):
    weights, grads = random_problem(seed=9, sparse_rows=6)
    summed = []
    for values, indices in grads:
        rows = np.unique(indices)
        summed.append((np.stack([values[indices == row].sum(axis=0) for row in rows]), rows))
    options = dict(learning_rate=0.05, sparse_updates=sparse_updates, **TIGHT)
    ours, _, _ = run(ClippyAdam(**options), weights, grads)
    reference, _, _ = run(ClippyAdam(**options), weights, summed)
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), rtol=1e-6, atol=1e-6)
    if tfrs_clippy.LEGACY_KERAS:  # Keras 2's Adam sums repeated ids too
        theirs, _, _ = run(keras.optimizers.Adam(learning_rate=0.05), weights, grads)
        plain, _, _ = run(ClippyAdam(learning_rate=0.05, sparse_updates=sparse_updates, **INF), weights, grads)
        if sparse_updates == "dense":
            np.testing.assert_allclose(plain.numpy(), theirs.numpy(), rtol=1e-6, atol=1e-6)


def test_infinite_thresholds_equal_keras_adam_with_weight_decay_and_schedule():
    weights, grads = random_problem(seed=4)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=5, decay_rate=0.5)
    ours, _, _ = run(ClippyAdam(learning_rate=schedule, weight_decay=0.1, **INF), weights, grads)
    theirs, _, _ = run(keras.optimizers.Adam(learning_rate=schedule, weight_decay=0.1), weights, grads)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-6, atol=1e-6)


def test_default_thresholds_do_not_fire_at_adams_default_rate():
    """At lr 1e-3 the first step moves each coordinate by ~lr < lambda_abs: ClippyAdam is Keras's Adam."""
    weights, grads = random_problem(seed=5, steps=5)
    ours, _, factors = run(ClippyAdam(export_clipping_factors=True), weights, grads)
    theirs, _, _ = run(keras.optimizers.Adam(), weights, grads)
    assert factors == [1.0] * 5
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-6, atol=1e-6)


# The NumPy oracle ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clipping_axis", [None, 0, 1])
@pytest.mark.parametrize("sparse", ["no", "dense", "lazy"])
def test_matches_numpy_oracle(clipping_axis, sparse):
    weights, grads = random_problem(seed=1, sparse_rows=0 if sparse == "no" else 5)
    optimizer = ClippyAdam(
        learning_rate=0.02, export_clipping_factors=True, clipping_axis=clipping_axis,
        sparse_updates="lazy" if sparse == "lazy" else "dense", **MIXED,
    )
    variable, _, factors = run(optimizer, weights, grads)
    oracle = AdamOracle(weights, 0.02, MIXED["variable_relative_threshold"], MIXED["absolute_threshold"],
                        axis=clipping_axis, lazy=sparse == "lazy")
    expected_factors = [oracle.step(grad) for grad in grads]
    np.testing.assert_allclose(variable.numpy(), oracle.w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(optimizer.momentum(variable).numpy(), oracle.m, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(optimizer.velocity(variable).numpy(), oracle.v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(factors, expected_factors, rtol=1e-4)  # float32 vs float64
    assert min(factors) < 0.9 and max(factors) == 1.0  # both regimes were exercised


@pytest.mark.parametrize("clipping_axis", [None, 0])
def test_update_rms_threshold_matches_numpy_oracle(clipping_axis):
    """Clippy's bound and StableAdamW's 1 / max(1, RMS(g / sqrt(v_hat)) / d) at once: sigma is the smaller."""
    weights, grads = random_problem(seed=2)
    loose = dict(variable_relative_threshold=0.5, absolute_threshold=1e-2)
    optimizer = ClippyAdam(learning_rate=0.02, export_clipping_factors=True, clipping_axis=clipping_axis,
                           update_rms_threshold=0.8, **loose)
    variable, _, factors = run(optimizer, weights, grads)
    oracle = AdamOracle(weights, 0.02, 0.5, 1e-2, axis=clipping_axis, rms=0.8)
    expected_factors = [oracle.step(grad) for grad in grads]
    np.testing.assert_allclose(variable.numpy(), oracle.w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(factors, expected_factors, rtol=1e-4)
    without_rms = AdamOracle(weights, 0.02, 0.5, 1e-2, axis=clipping_axis)
    assert [without_rms.step(grad) for grad in grads] != pytest.approx(expected_factors)  # the RMS test acted


@pytest.mark.parametrize("jit_compile", [False, True])
def test_lazy_rows_touch_only_their_rows(jit_compile):
    """Untouched rows keep weight and moments; under XLA (padded deduplication) too, equal to the oracle."""
    weights, grads = random_problem(seed=6, sparse_rows=3, shape=(10, 4))
    optimizer = ClippyAdam(learning_rate=0.05, sparse_updates="lazy", clipping_axis=0, **TIGHT)
    variable, history, _ = run(optimizer, weights, grads, jit_compile=jit_compile)
    for before, after, (_, indices) in zip(history[:-1], history[1:], grads, strict=True):
        untouched = np.setdiff1d(np.arange(10), indices)
        np.testing.assert_array_equal(after[untouched], before[untouched])
    oracle = AdamOracle(weights, 0.05, TIGHT["variable_relative_threshold"], TIGHT["absolute_threshold"],
                        axis=0, lazy=True)
    for grad in grads:
        oracle.step(grad)
    np.testing.assert_allclose(variable.numpy(), oracle.w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(optimizer.momentum(variable).numpy(), oracle.m, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clipping_axis", [None, 0, 1])
def test_no_coordinate_moves_more_than_its_bound_and_the_bound_is_tight(clipping_axis):
    weights, grads = random_problem(seed=2)
    optimizer = ClippyAdam(learning_rate=0.05, export_clipping_factors=True, clipping_axis=clipping_axis, **TIGHT)
    _, history, factors = run(optimizer, weights, grads)
    clipped_steps = 0
    for before, after, factor in zip(history[:-1], history[1:], factors, strict=True):
        move = np.abs(after.astype(np.float64) - before)
        bound = TIGHT["variable_relative_threshold"] * np.abs(before.astype(np.float64)) + TIGHT["absolute_threshold"]
        assert np.all(move <= bound * (1 + 1e-5) + 1e-7)
        if factor < 1.0:
            clipped_steps += 1
            # Tight: some coordinate (per tensor, or in the most clipped slice) moves by its whole bound.
            assert np.max(move / bound) == pytest.approx(1.0, rel=1e-4)
    assert clipped_steps >= 5


# Non-finite gradients ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse_updates", [None, "dense", "lazy"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_gradient_is_skipped_and_counted(sparse_updates, bad):
    weights, grads = random_problem(seed=7, steps=3, sparse_rows=0 if sparse_updates is None else 4)
    optimizer = ClippyAdam(learning_rate=0.05, export_clipping_factors=True,
                           sparse_updates=sparse_updates or "dense", amsgrad=True, **TIGHT)
    variable = tf.Variable(weights, name="w")
    apply = tf.function(optimizer.apply_gradients)
    apply([(to_tf(grads[0]), variable)])
    state = [variable.numpy(), optimizer.momentum(variable).numpy(), optimizer.velocity(variable).numpy()]
    if sparse_updates is None:
        poisoned = grads[1].copy()
        poisoned[2, 1] = bad
    else:
        values = grads[1][0].copy()
        values[1, 3] = bad
        poisoned = (values, grads[1][1])
    apply([(to_tf(poisoned), variable)])
    after = [variable.numpy(), optimizer.momentum(variable).numpy(), optimizer.velocity(variable).numpy()]
    for old, new in zip(state, after, strict=True):
        np.testing.assert_array_equal(old, new)
    assert int(optimizer.nonfinite_steps) == 1
    assert list(optimizer.nonfinite_steps_by_name().values())[0].numpy() == 1
    assert float(optimizer.clipping_factors[0].numpy()) == 0.0
    apply([(to_tf(grads[2]), variable)])  # training goes on
    assert np.all(np.isfinite(variable.numpy())) and not np.array_equal(variable.numpy(), after[0])
    assert int(optimizer.nonfinite_steps) == 1


# Factors, exclusion, configuration, saving ------------------------------------------------------------------------


def _model(seed: int = 0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((3,), dtype="int32"),
        keras.layers.Embedding(50, 8),
        keras.layers.Flatten(),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(1),
    ])


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 50, size=(256, 3))
    labels = (ids.sum(axis=1, keepdims=True) % 7 / 7.0).astype(np.float32)
    return ids, labels


def test_clipping_factors_are_exported_by_name():
    model = _model()
    optimizer = ClippyAdam(learning_rate=0.3, export_clipping_factors=True, **TIGHT)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(*_data(), batch_size=64, epochs=1, verbose=0)
    factors = optimizer.clipping_factors_by_name()
    assert len(factors) == len(model.trainable_variables) == len(optimizer.clipping_factors)
    assert all(0.0 < float(f) <= 1.0 for f in factors.values())
    assert min(float(f) for f in factors.values()) < 1.0
    with pytest.raises(ValueError, match="export_clipping_factors=True"):
        ClippyAdam().clipping_factors_by_name()


def test_exclude_from_clipping_gives_plain_adam():
    weights, grads = random_problem(seed=8)
    clipped, excluded = tf.Variable(weights, name="kernel"), tf.Variable(weights, name="bias")
    reference = tf.Variable(weights, name="reference")
    optimizer = ClippyAdam(learning_rate=0.05, exclude_from_clipping=["bias"], export_clipping_factors=True, **TIGHT)
    adam = keras.optimizers.Adam(learning_rate=0.05)
    apply, apply_adam = tf.function(optimizer.apply_gradients), tf.function(adam.apply_gradients)
    for grad in grads:
        apply([(tf.constant(grad), clipped), (tf.constant(grad), excluded)])
        apply_adam([(tf.constant(grad), reference)])
    np.testing.assert_allclose(excluded.numpy(), reference.numpy(), rtol=1e-6, atol=1e-6)
    assert np.abs(clipped.numpy() - reference.numpy()).max() > 1e-2
    factors = [float(f.numpy()) for f in optimizer.clipping_factors]
    assert factors[1] == 1.0 and factors[0] < 1.0


ALL_ARGUMENTS = dict(
    learning_rate=0.02, beta_1=0.8, beta_2=0.99, epsilon=1e-6, amsgrad=True, variable_relative_threshold=0.3,
    absolute_threshold=1e-3, export_clipping_factors=True, clipping_axis=0, exclude_from_clipping=["embedding"],
    sparse_updates="lazy", fuse_dense_updates=False, update_rms_threshold=2.0, name="my_clippy_adam",
)


def test_config_round_trips_every_argument():
    optimizer = ClippyAdam(**ALL_ARGUMENTS)
    config = optimizer.get_config()
    for key, value in ALL_ARGUMENTS.items():
        assert config[key] == pytest.approx(value) if isinstance(value, float) else config[key] == value, key
    restored = ClippyAdam.from_config(config)
    assert restored.get_config() == config
    serialized = keras.optimizers.serialize(optimizer)
    assert "ClippyAdam" in str(serialized)
    deserialized = keras.optimizers.deserialize(serialized)
    assert isinstance(deserialized, ClippyAdam) and deserialized.get_config() == config


def test_saved_model_continues_training_identically(tmp_path):
    ids, labels = _data(4)
    first, second = (ids[:128], labels[:128]), (ids[128:], labels[128:])
    model = _model(seed=5)
    model.compile(optimizer=ClippyAdam(learning_rate=0.1, export_clipping_factors=True, clipping_axis=0,
                                       amsgrad=True, **TIGHT), loss="mse")
    model.fit(*first, batch_size=32, verbose=0, shuffle=False)
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored.optimizer, ClippyAdam)
    assert restored.optimizer.get_config() == model.optimizer.get_config()
    assert int(restored.optimizer.iterations) == int(model.optimizer.iterations) == 4
    for trained in (model, restored):
        trained.fit(*second, batch_size=32, verbose=0, shuffle=False)
    for original, reloaded in zip(model.get_weights(), restored.get_weights(), strict=True):
        np.testing.assert_array_equal(original, reloaded)
    for original, reloaded in zip(model.optimizer.variables, restored.optimizer.variables, strict=True):
        np.testing.assert_array_equal(original.numpy(), reloaded.numpy())


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(variable_relative_threshold=-0.1), "`variable_relative_threshold` must be a non-negative number"),
        (dict(absolute_threshold=math.nan), "`absolute_threshold` must be a non-negative number, got nan"),
        (dict(beta_1=1.0), "`beta_1` must be in [0, 1), got 1.0"),
        (dict(beta_2=-0.1), "`beta_2` must be in [0, 1), got -0.1"),
        (dict(epsilon=0.0), "`epsilon` must be a finite positive number, got 0.0"),
        (dict(sparse_updates="eager"), "`sparse_updates` must be one of ('dense', 'lazy'), got 'eager'"),
        (dict(clipping_axis=1.5), "`clipping_axis` must be None or an int, got 1.5"),
        (dict(exclude_from_clipping="bias"), "must be a list of regular expressions"),
        (dict(learning_rate=-1.0), "`learning_rate` must be a finite non-negative number or a schedule"),
        (dict(update_rms_threshold=0.0), "`update_rms_threshold` must be None or a positive number, got 0.0"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(arguments, message):
    with pytest.raises(ValueError) as error:
        ClippyAdam(**arguments)
    assert message in str(error.value)


def test_exported_and_of_this_runtime():
    assert tfrs_clippy.ClippyAdam is tfrs_clippy.optimizers.ClippyAdam is ClippyAdam
    assert issubclass(ClippyAdam, tf.keras.optimizers.Optimizer)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_embedding_model_lazy_and_dense(jit_compile):
    for sparse_updates in ("dense", "lazy"):
        model = _model()
        model.compile(optimizer=ClippyAdam(learning_rate=0.01, sparse_updates=sparse_updates), loss="mse",
                      jit_compile=jit_compile)
        history = model.fit(*_data(), batch_size=32, epochs=2, verbose=0)
        assert history.history["loss"][-1] < history.history["loss"][0]


@pytest.mark.keras2_only
def test_a_keras_adam_checkpoint_restores_into_clippy_adam(tmp_path):
    variable = tf.Variable(np.ones((3, 2), np.float32))
    adam = keras.optimizers.Adam(0.1)
    adam.apply_gradients([(tf.fill((3, 2), 2.0), variable)])
    path = tf.train.Checkpoint(v=variable, optimizer=adam).save(str(tmp_path / "adam"))
    restored = tf.Variable(np.zeros((3, 2), np.float32))
    optimizer = ClippyAdam(0.1)
    optimizer.build([restored])
    tf.train.Checkpoint(v=restored, optimizer=optimizer).restore(path)
    np.testing.assert_allclose(optimizer.momentum(restored).numpy(), adam._momentums[0].numpy())
    np.testing.assert_allclose(optimizer.velocity(restored).numpy(), adam._velocities[0].numpy())
    assert int(optimizer.iterations) == 1
