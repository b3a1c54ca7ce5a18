"""Candidate updates d_i from one shared optimizer state (Adam, Adagrad, ClippyAdagrad), dense and sparse."""

import numpy as np
import pytest
import tensorflow as tf

import tfrs_clippy
from tfrs_clippy.keras_runtime import keras
from tfrs_clippy.multitask import AdagradRule, AdamRule, stack_task_gradients, update_rule_for
from tfrs_clippy.multitask.updates import tf_variable

SHAPE = (6, 3)


def _variable(seed: int = 0):
    value = np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32)
    return tf.Variable(value) if tfrs_clippy.LEGACY_KERAS else keras.Variable(value)


def _warmed_up(optimizer, variable, steps: int = 3):
    """The optimizer after `steps` steps on random gradients: a state that is not the initial one."""
    rng = np.random.default_rng(1)
    for _ in range(steps):
        optimizer.apply_gradients([(tf.constant(rng.normal(size=SHAPE), tf.float32), variable)])
    return optimizer


def _task_grads(num_tasks: int = 3, seed: int = 2) -> list[tf.Tensor]:
    rng = np.random.default_rng(seed)
    return [tf.constant(rng.normal(size=SHAPE) * 10.0**k, tf.float32) for k in range(num_tasks)]


def _delta_of_one_real_step(make_optimizer, grad: tf.Tensor) -> np.ndarray:
    """What the optimizer itself moves a fresh, identically warmed-up variable by for `grad`."""
    variable = _variable()
    optimizer = _warmed_up(make_optimizer(), variable)
    before = np.array(variable.numpy())
    optimizer.apply_gradients([(grad, variable)])
    return before - variable.numpy()


OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adagrad": lambda: tfrs_clippy.Adagrad(0.1),
    "adagrad_delayed": lambda: tfrs_clippy.Adagrad(0.1, accumulator_update="delayed"),
    "clippy": lambda: tfrs_clippy.ClippyAdagrad.from_paper(0.5),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_candidates_are_the_steps_the_optimizer_would_take(name):
    variable = _variable()
    optimizer = _warmed_up(OPTIMIZERS[name](), variable)
    grads = _task_grads()
    candidates = update_rule_for(optimizer).candidates(variable, stack_task_gradients(grads, variable)).numpy()
    for candidate, grad in zip(candidates, grads):
        np.testing.assert_allclose(candidate, _delta_of_one_real_step(OPTIMIZERS[name], grad), rtol=2e-5, atol=1e-7)


def test_adam_candidates_match_numpy():
    variable = _variable()
    optimizer = _warmed_up(keras.optimizers.Adam(0.01, beta_1=0.8, beta_2=0.95, epsilon=1e-3), variable)
    grads = _task_grads()
    candidates = AdamRule(optimizer).candidates(variable, stack_task_gradients(grads, variable)).numpy()
    m = tf_variable(optimizer._momentums[0]).numpy().astype(np.float64)
    v = tf_variable(optimizer._velocities[0]).numpy().astype(np.float64)
    t = 4
    for candidate, grad in zip(candidates, grads):
        g = grad.numpy().astype(np.float64)
        m_i, v_i = 0.8 * m + 0.2 * g, 0.95 * v + 0.05 * g**2
        expected = 0.01 * np.sqrt(1 - 0.95**t) / (1 - 0.8**t) * m_i / (np.sqrt(v_i) + 1e-3)
        np.testing.assert_allclose(candidate, expected, rtol=1e-5)


def test_clippy_candidates_match_numpy():
    variable = _variable()
    optimizer = _warmed_up(tfrs_clippy.ClippyAdagrad.from_paper(0.5), variable)
    grads = _task_grads()
    candidates = AdagradRule(optimizer).candidates(variable, stack_task_gradients(grads, variable)).numpy()
    w = tf_variable(variable).numpy().astype(np.float64)
    accumulator = optimizer.accumulator(variable).numpy().astype(np.float64)
    for candidate, grad in zip(candidates, grads):
        g = grad.numpy().astype(np.float64)
        update = 0.5 * g / np.sqrt(accumulator + g**2 + 1e-7)  # Algorithm 1: accumulate first
        sigma = min(1.0, np.min((0.5 * np.abs(w) + 1e-2) / np.abs(update)))
        np.testing.assert_allclose(candidate, sigma * update, rtol=1e-5)
    assert np.abs(candidates[2]).max() < np.abs(candidates[0]).max() * 20, "the 100x gradient must be clipped"


def test_commit_with_unit_weights_is_adagrad_on_the_summed_gradient():
    """With the delayed accumulator the Adagrad step is linear in g: sum_i d_i = d(sum_i g_i), state included."""
    make = OPTIMIZERS["adagrad_delayed"]
    variable, reference = _variable(), _variable()
    optimizer, reference_optimizer = _warmed_up(make(), variable), _warmed_up(make(), reference)
    grads = _task_grads()
    stacked = stack_task_gradients(grads, variable)
    rule = update_rule_for(optimizer)
    ones = tf.ones([3])
    rule.commit(variable, stacked, tf.tensordot(ones, rule.candidates(variable, stacked), 1), stacked.combine(ones))
    reference_optimizer.apply_gradients([(tf.add_n(grads), reference)])
    np.testing.assert_allclose(variable.numpy(), reference.numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        optimizer.accumulator(variable).numpy(), reference_optimizer.accumulator(reference).numpy(), rtol=1e-6
    )


def test_adam_is_not_linear_in_the_gradient():
    """Why PUB with alpha = 1 is not Adam on the summed loss: sum_i d_i(g_i) != d(sum_i g_i)."""
    variable = _variable()
    optimizer = _warmed_up(keras.optimizers.Adam(0.01), variable)
    grads = _task_grads()
    rule = AdamRule(optimizer)
    summed = rule.candidates(variable, stack_task_gradients(grads, variable)).numpy().sum(axis=0)
    of_sum = rule.candidates(variable, stack_task_gradients([tf.add_n(grads)], variable)).numpy()[0]
    assert np.abs(summed - of_sum).max() > 1e-3


def _embedding_table(rows: int = 10, dim: int = 2):
    value = np.arange(rows * dim, dtype=np.float32).reshape(rows, dim) / 10.0
    return tf.Variable(value) if tfrs_clippy.LEGACY_KERAS else keras.Variable(value)


def _sparse(values, indices, rows: int = 10) -> tf.IndexedSlices:
    return tf.IndexedSlices(tf.constant(values, tf.float32), tf.constant(indices, tf.int64), tf.constant([rows, 2]))


def test_sparse_gradients_are_merged_onto_the_touched_rows():
    first = _sparse([[1, 1], [2, 2], [3, 3]], [4, 1, 4])
    second = _sparse([[10, 10]], [7])
    stacked = stack_task_gradients([first, second, None], _embedding_table())
    valid = stacked.valid.numpy() > 0
    rows = stacked.rows.numpy()[valid]
    assert sorted(rows) == [1, 4, 7]
    dense = np.zeros([3, 10, 2])
    dense[:, rows] = stacked.values.numpy()[:, valid]
    np.testing.assert_array_equal(dense[0, [1, 4, 7]], [[2, 2], [4, 4], [0, 0]])
    np.testing.assert_array_equal(dense[1, [1, 4, 7]], [[0, 0], [0, 0], [10, 10]])
    np.testing.assert_array_equal(dense[2], 0)
    assert not np.any(stacked.values.numpy()[:, ~valid])


@pytest.mark.parametrize("name", ["adam", "clippy"])
def test_sparse_commit_touches_only_the_touched_rows(name):
    table = _embedding_table()
    optimizer = OPTIMIZERS[name]()
    optimizer.build([table])
    before = np.array(table.numpy())
    grads = [_sparse([[1, 1], [2, 2]], [4, 1]), _sparse([[-3, 1]], [4])]
    stacked = stack_task_gradients(grads, table)
    rule = update_rule_for(optimizer)
    candidates = rule.candidates(table, stacked)
    weights = tf.constant([0.5, 1.5])
    rule.commit(table, stacked, tf.tensordot(weights, candidates, 1), stacked.combine(weights))
    moved = np.any(table.numpy() != before, axis=1)
    assert list(np.flatnonzero(moved)) == [1, 4]
    # The touched rows moved exactly as the dense computation says.
    dense_table = _embedding_table()
    dense_optimizer = OPTIMIZERS[name]()
    dense_optimizer.build([dense_table])
    dense_grads = [tf.convert_to_tensor(grad) for grad in grads]
    dense_stacked = stack_task_gradients(dense_grads, dense_table)
    dense_candidates = update_rule_for(dense_optimizer).candidates(dense_table, dense_stacked).numpy()
    expected_move = np.tensordot([0.5, 1.5], dense_candidates, 1)[[1, 4]]
    np.testing.assert_allclose((before - table.numpy())[[1, 4]], expected_move, rtol=1e-5)


@pytest.mark.parametrize(
    "optimizer, message",
    [
        (lambda: keras.optimizers.SGD(0.1), "needs Adam or an optimizer of tfrs_clippy"),
        (lambda: keras.optimizers.Adam(0.1, clipnorm=1.0), "clipnorm"),
        (lambda: keras.optimizers.Adam(0.1, amsgrad=True), "amsgrad"),
    ],
)
def test_unsupported_optimizers_are_refused(optimizer, message):
    with pytest.raises(ValueError, match=message):
        update_rule_for(optimizer())
