"""The paper's baselines (GC, AGC, LAMB on Adagrad, naive): each rule alone on hand numbers, each optimizer against
a NumPy Adagrad with that rule, sparse against dense, and the method factory."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from tfrs_clippy import keras
from tfrs_clippy.optimizers import (
    METHODS,
    PAPER_GRIDS,
    Adagrad,
    Adam,
    AdaptiveGradientClippingAdagrad,
    AdaptiveGradientClippingAdam,
    ClippyAdagrad,
    GradientClippingAdagrad,
    GradientClippingAdam,
    LambAdagrad,
    LambAdam,
    build_optimizer,
    rules,
)

import numpy_oracle
from test_clippy_adagrad import densify, random_problem, run_optimizer


def step_inputs(grad, variable, precondition=None):
    grad = tf.constant(grad, tf.float32)
    precondition = tf.ones_like(grad) if precondition is None else tf.constant(precondition, tf.float32)
    return rules.StepInputs(grad=grad, variable=tf.constant(variable, tf.float32), precondition=precondition,
                            direction=grad * precondition, update=grad * precondition)


def test_gc_rule_on_hand_numbers():
    rule = rules.GradientClippingRule(threshold=1.0)
    assert float(rule(step_inputs([3.0, 4.0], [1.0, 1.0]), [0])[0]) == pytest.approx(0.2)  # ||g|| = 5
    assert float(rule(step_inputs([0.3, 0.4], [1.0, 1.0]), [0])[0]) == 1.0
    assert float(rule(step_inputs([0.0, 0.0], [1.0, 1.0]), [0])[0]) == 1.0  # zero gradient


def test_agc_rule_is_unit_wise_with_a_weight_floor():
    rule = rules.AdaptiveGradientClippingRule(threshold=0.1, weight_floor=1e-3)
    # Columns are units: ||w_0|| = 5, ||g_0|| = 10 -> 0.1*5/10 = 0.05; unit 1 has zero weights -> floor 1e-3.
    step = step_inputs([[6.0, 1.0], [8.0, 0.0]], [[3.0, 0.0], [4.0, 0.0]])
    sigma = rule(step, reduce_axes=[0]).numpy()
    np.testing.assert_allclose(sigma, [[0.05, 0.1 * 1e-3 / 1.0]], rtol=1e-6)
    zero = rule(step_inputs([[0.0, 0.0]], [[1.0, 1.0]]), reduce_axes=[0]).numpy()
    np.testing.assert_array_equal(zero, [[1.0, 1.0]])


def test_lamb_rule_with_its_zero_norm_guards():
    rule = rules.LambRule(trust_scale=0.01)
    # r = g * p = [0.6, 0.8] (||r|| = 1), ||w|| = 5 -> sigma = 0.01 * 5 / 1.
    assert float(rule(step_inputs([1.2, 1.6], [3.0, 4.0], precondition=[0.5, 0.5]), [0])[0]) == pytest.approx(0.05)
    assert float(rule(step_inputs([1.0, 1.0], [0.0, 0.0]), [0])[0]) == 1.0  # ||w|| = 0
    assert float(rule(step_inputs([0.0, 0.0], [3.0, 4.0]), [0])[0]) == 1.0  # ||r|| = 0


def test_update_rms_rule_and_the_minimum_of_rules_on_hand_numbers():
    rule = rules.UpdateRmsRule(threshold=1.0)
    # g * p = [3, 4, 0, 0]: RMS = sqrt(25 / 4) = 2.5 -> sigma = 1 / 2.5; an RMS below the threshold leaves 1.
    spike = step_inputs([6.0, 8.0, 0.0, 0.0], [1.0] * 4, precondition=[0.5] * 4)
    assert float(rule(spike, [0])[0]) == pytest.approx(0.4)
    assert float(rule(step_inputs([0.6, 0.8, 0.0, 0.0], [1.0] * 4), [0])[0]) == 1.0
    per_row = rule(step_inputs([[3.0, 4.0], [0.3, 0.4]], [[1.0, 1.0]] * 2), [1]).numpy()
    np.testing.assert_allclose(per_row, [[1.0 / math.sqrt(12.5)], [1.0]], rtol=1e-6)
    both = rules.MinimumRule((rule, rules.GradientClippingRule(threshold=1.0)))
    step = step_inputs([6.0, 8.0, 0.0, 0.0], [1.0] * 4, precondition=[0.5] * 4)  # GC: 1 / ||g|| = 0.1
    assert float(both(step, [0])[0]) == pytest.approx(0.1)


CASES = {
    "naive": (Adagrad, {}, lambda g, w, r: 1.0),
    "gc": (GradientClippingAdagrad, {"threshold": 0.5}, lambda g, w, r: numpy_oracle.gc_sigma(g, w, r, 0.5)),
    "agc": (AdaptiveGradientClippingAdagrad, {"threshold": 0.05},
            lambda g, w, r: numpy_oracle.agc_sigma(g, w, r, 0.05, axis=-1)),
    "lamb": (LambAdagrad, {"trust_scale": 0.05}, lambda g, w, r: numpy_oracle.lamb_sigma(g, w, r, 0.05)),
}


@pytest.mark.parametrize("method", list(CASES))
def test_each_baseline_matches_numpy_adagrad_with_its_rule(method):
    cls, arguments, sigma_fn = CASES[method]
    weights, grads = random_problem(seed=11)
    variable, _ = run_optimizer(cls(learning_rate=0.3, **arguments), weights, grads)
    expected = numpy_oracle.scaled_adagrad_numpy(weights, grads, 0.3, sigma_fn)
    np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-5, atol=1e-6)
    if method != "naive":  # the rule must have acted, or the comparison proves nothing
        plain = numpy_oracle.scaled_adagrad_numpy(weights, grads, 0.3, lambda g, w, r: 1.0)
        assert np.max(np.abs(expected - plain)) > 1e-3


ADAM_CASES = {
    "adam": (Adam, {}, lambda g, w, d: 1.0),
    "gc_adam": (GradientClippingAdam, {"threshold": 1.0}, lambda g, w, d: numpy_oracle.gc_sigma(g, w, d, 1.0)),
    "agc_adam": (AdaptiveGradientClippingAdam, {"threshold": 0.1},
                 lambda g, w, d: numpy_oracle.agc_sigma(g, w, d, 0.1, axis=-1)),
    "lamb_adam": (LambAdam, {"trust_scale": 0.05}, lambda g, w, d: numpy_oracle.lamb_sigma(g, w, d, 0.05)),
}


@pytest.mark.parametrize("method", sorted(ADAM_CASES))
def test_each_adam_baseline_matches_numpy_adam_with_its_rule(method):
    """The same rules on Adam's direction d = m_hat / (sqrt(v_hat) + eps_hat); the moments see the raw gradient."""
    cls, arguments, sigma_fn = ADAM_CASES[method]
    weights, grads = random_problem(seed=11)
    variable, _ = run_optimizer(cls(learning_rate=0.05, **arguments), weights, grads)
    expected = numpy_oracle.scaled_adam_numpy(weights, grads, 0.05, sigma_fn)
    # float32 against float64 over 20 steps: Adam's early steps divide by a small sqrt(v), which amplifies the
    # float32 rounding of m and v to ~1.5e-6 on some coordinates; a rule's error is ~lr = 5e-2.
    np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-5, atol=5e-6)
    plain = numpy_oracle.scaled_adam_numpy(weights, grads, 0.05, lambda g, w, d: 1.0)
    if method == "adam":
        theirs, _ = run_optimizer(keras.optimizers.Adam(learning_rate=0.05), weights, grads)
        np.testing.assert_allclose(variable.numpy(), theirs.numpy(), rtol=1e-6, atol=1e-6)
    else:  # the rule must have acted, or the comparison proves nothing
        assert np.max(np.abs(expected - plain)) > 1e-3


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_lamb_exports_the_same_factor_on_every_path(path, jit_compile):
    """A step with repeated ids: the factor is the smallest trust ratio of the rows that move, whatever the path.

    The dense path sees every row, the sparse one only the touched rows and, under XLA, `deduplicate`'s padding rows
    (zero updates). Rows that do not move used to count with sigma = 1, hiding the trust ratios (> 1 here).
    """
    weights = np.arange(1.0, 13.0, dtype=np.float32).reshape(4, 3)
    values, indices = np.ones((3, 3), np.float32), np.array([2, 0, 2])
    grad = tf.IndexedSlices(tf.constant(values), tf.constant(indices), tf.constant([4, 3], tf.int64))
    if path == "dense":
        grad = tf.convert_to_tensor(grad)
    optimizer = LambAdagrad(learning_rate=0.1, trust_scale=5.0, export_clipping_factors=True)
    variable = tf.Variable(weights, name="item_embedding")
    tf.function(optimizer.apply_gradients, jit_compile=jit_compile)([(grad, variable)])
    dense = densify((values, indices), weights.shape)
    r = dense / np.sqrt(0.1 + dense**2 + 1e-7)  # the accumulator starts at 0.1; G += g^2 first
    ratios = 5.0 * numpy_oracle.norms(weights, 0) / np.where(numpy_oracle.norms(r, 0) > 0, numpy_oracle.norms(r, 0), 1)
    expected = ratios[[0, 2]].min()  # rows 0 and 2 move
    assert expected > 1.0
    assert float(optimizer.clipping_factors[0]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("method", ["agc", "lamb"])
def test_embedding_tables_are_row_wise_and_sparse_equals_dense(method):
    cls, arguments, _ = CASES[method]
    weights, sparse_grads = random_problem(seed=12, sparse_rows=5, repeats=True)
    dense_grads = [densify(g, weights.shape).astype(np.float32) for g in sparse_grads]
    results = []
    for grads in (sparse_grads, dense_grads):
        optimizer = cls(learning_rate=0.3, **arguments)
        variable = tf.Variable(weights, name="item_embedding")
        for grad in grads:
            optimizer.apply_gradients([(tf.IndexedSlices(tf.constant(grad[0]), tf.constant(grad[1]),
                                                         tf.constant(weights.shape, tf.int64))
                                        if isinstance(grad, tuple) else tf.constant(grad), variable)])
        results.append(variable.numpy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5, atol=1e-6)
    sigma_fn = {"agc": lambda g, w, r: numpy_oracle.agc_sigma(g, w, r, 0.05, axis=0),
                "lamb": lambda g, w, r: np.where(np.abs(g).sum(axis=1, keepdims=True) > 0,
                                                 numpy_oracle.lamb_sigma(g, w, r, 0.05, axis=0), 1.0)}[method]
    expected = numpy_oracle.scaled_adagrad_numpy(weights, dense_grads, 0.3, sigma_fn)
    np.testing.assert_allclose(results[0], expected, rtol=1e-5, atol=1e-6)


def test_factory_leaves_embeddings_to_plain_adagrad_by_default():
    grad = tf.constant(np.full((2, 2), 10.0, np.float32))
    moved = {}
    for include in (False, True):
        optimizer = build_optimizer("gc", learning_rate=1.0, include_embeddings=include, threshold=1e-3)
        table = tf.Variable(np.zeros((2, 2), np.float32), name="user_embedding")
        kernel = tf.Variable(np.zeros((2, 2), np.float32), name="kernel")
        optimizer.apply_gradients([(grad, table), (grad, kernel)])
        moved[include] = (-table.numpy()[0, 0], -kernel.numpy()[0, 0])
    adagrad_step = 10.0 / math.sqrt(0.1 + 100.0 + 1e-7)
    assert moved[False][0] == pytest.approx(adagrad_step, rel=1e-5)  # the table: plain Adagrad
    assert moved[False][1] == pytest.approx(adagrad_step * 1e-3 / 20.0, rel=1e-4)  # the kernel: GC, ||g|| = 20
    assert moved[True][0] == pytest.approx(moved[True][1], rel=1e-6)  # included: the table is clipped too


CLIPPY_KEYS = ("variable_relative_threshold", "accumulator_relative_threshold", "absolute_threshold",
               "use_standard_accumulator_update", "clip_accumulator_update")


def _clippy_settings(optimizer) -> tuple:
    config = optimizer.get_config()
    return tuple(config[key] for key in CLIPPY_KEYS)


def test_factory_defaults_clippy_to_the_paper_setting_and_the_class_keeps_tfrs_defaults():
    paper = (0.5, 0.0, 1e-2, True, False)
    assert _clippy_settings(build_optimizer("clippy", 0.1)) == paper
    assert _clippy_settings(ClippyAdagrad.from_paper(0.1)) == paper
    assert _clippy_settings(ClippyAdagrad(0.1)) == (0.1, 0.0, 1e-7, False, False)  # TFRS's, a drop-in
    assert build_optimizer("clippy", 0.1).exclude_from_clipping == ["embedding"]  # as in the paper
    # The grid point the scripts use is the same setting, named once.
    assert PAPER_GRIDS["clippy"] == [{"variable_relative_threshold": 0.5, "absolute_threshold": 1e-2}]


def test_factory_clippy_arguments_override_the_paper_setting():
    frozen = build_optimizer("clippy", 0.1, variable_relative_threshold=0.1, absolute_threshold=1e-7)
    assert _clippy_settings(frozen) == (0.1, 0.0, 1e-7, True, False)
    delayed = build_optimizer("clippy", 0.1, use_standard_accumulator_update=False, clip_accumulator_update=True)
    assert _clippy_settings(delayed) == (0.5, 0.0, 1e-2, False, True)
    assert delayed.accumulator_update == "delayed_clipped"


@pytest.mark.parametrize("overrides, move", [({}, 1e-2), ({"variable_relative_threshold": 0.1,
                                                            "absolute_threshold": 1e-7}, 1e-7)])
def test_factory_clippy_moves_a_tensor_with_a_zero_weight_by_its_absolute_threshold(overrides, move):
    # One scale per tensor: the zero weight's bound lambda_abs caps the step of the whole tensor. Adagrad's step is
    # 1 / sqrt(0.1 + 1) = 0.95, so the paper's 1e-2 moves it by 1e-2 and TFRS's 1e-7 leaves it frozen.
    variable = tf.Variable([0.0, 1.0])
    build_optimizer("clippy", 1.0, **overrides).apply_gradients([(tf.constant([1.0, 1.0]), variable)])
    np.testing.assert_allclose(variable.numpy(), [-move, 1.0 - move], rtol=1e-4)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_and_grid_point_round_trips(method):
    for hyperparameters in PAPER_GRIDS[method]:
        optimizer = build_optimizer(method, learning_rate=0.05, export_clipping_factors=True, **hyperparameters)
        config = optimizer.get_config()
        assert type(optimizer).from_config(config).get_config() == config
        assert keras.optimizers.deserialize(keras.optimizers.serialize(optimizer)).get_config() == config
    if method == "clippy":
        assert isinstance(optimizer, ClippyAdagrad) and optimizer.accumulator_update == "standard"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: build_optimizer("sgd", 0.1),
         "`method` must be one of ['adam', 'agc', 'agc_adam', 'clippy', 'clippy_adam', 'gc', 'gc_adam', 'lamb', "
                                                  "'lamb_adam', 'naive'], got 'sgd'"),
        (lambda: GradientClippingAdagrad(threshold=-1.0), "`threshold` must be a non-negative number, got -1.0"),
        (lambda: AdaptiveGradientClippingAdagrad(weight_floor=-1.0), "`weight_floor` must be a non-negative number"),
        (lambda: LambAdagrad(trust_scale=float("nan")), "`trust_scale` must be a non-negative number, got nan"),
        (lambda: LambAdagrad(embedding_pattern="["), "`embedding_pattern` has an invalid pattern '['"),
    ],
)
def test_bad_arguments_name_the_argument(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value)


def test_scaling_factors_are_exported_for_baselines():
    optimizer = GradientClippingAdagrad(learning_rate=0.1, threshold=1.0, export_clipping_factors=True)
    variable = tf.Variable([1.0, 1.0], name="w")
    optimizer.apply_gradients([(tf.constant([3.0, 4.0]), variable)])
    (factor,) = optimizer.clipping_factors_by_name().values()
    assert float(factor) == pytest.approx(0.2)


@pytest.mark.parametrize("method", list(CASES))
def test_each_baseline_takes_epsilon_zero_with_a_positive_initial_accumulator(method):
    """The rule ClippyAdagrad follows (TFRS's tests use epsilon 0): the base they share checks it for all."""
    cls, arguments, sigma_fn = CASES[method]
    weights, grads = random_problem(seed=13, steps=5)
    variable, _ = run_optimizer(cls(learning_rate=0.3, epsilon=0.0, initial_accumulator_value=0.2, **arguments),
                                weights, grads)
    expected = numpy_oracle.scaled_adagrad_numpy(weights, grads, 0.3, sigma_fn, initial_accumulator_value=0.2,
                                                 epsilon=0.0)
    np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError) as error:
        cls(learning_rate=0.3, epsilon=0.0, initial_accumulator_value=0.0, **arguments)
    assert ("`initial_accumulator_value` + `epsilon` must be positive" in str(error.value)
            and "initial_accumulator_value=0.0 and epsilon=0.0" in str(error.value))
