"""Candidate updates d_i from one shared optimizer state (Keras's Adam, the Adagrad and Adam families of
tfrs_clippy), dense and sparse; the commit: state, non-finite gradients, where the scaling rule applies."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

import tfrs_clippy
from tfrs_clippy.keras_runtime import keras
from tfrs_clippy.multitask import AdagradRule, AdamRule, stack_task_gradients, update_rule_for
from tfrs_clippy.multitask.updates import ScaledAdamRule, tf_variable
from tfrs_clippy.optimizers import ScaledOptimizer

SHAPE = (6, 3)


def _variable(seed: int = 0):
    value = np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32)
    return tf.Variable(value) if tfrs_clippy.LEGACY_KERAS else keras.Variable(value)


def _warmed_up(optimizer, variable, steps: int = 3):
    """The optimizer after `steps` steps on random dense gradients: a state that is not the initial one."""
    rng = np.random.default_rng(1)
    for _ in range(steps):
        optimizer.apply_gradients([(tf.constant(rng.normal(size=variable.shape), tf.float32), variable)])
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
    "lamb": lambda: tfrs_clippy.LambAdagrad(0.1, trust_scale=0.1),
    "scaled_adam": lambda: tfrs_clippy.Adam(0.01),
    # lambda_rel 0.01: the rule fires on these weights (~N(0, 1)) at lr 0.05.
    "clippy_adam": lambda: tfrs_clippy.ClippyAdam(0.05, variable_relative_threshold=0.01),
    "clippy_adam_amsgrad": lambda: tfrs_clippy.ClippyAdam(0.05, variable_relative_threshold=0.01, amsgrad=True),
    "gc_adam": lambda: tfrs_clippy.GradientClippingAdam(0.05, threshold=10.0),
    "lamb_adam": lambda: tfrs_clippy.LambAdam(0.05, trust_scale=0.1),
}
SCALED = sorted(name for name in OPTIMIZERS if name != "adam")
"""The optimizers of tfrs_clippy."""


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_candidates_are_the_steps_the_optimizer_would_take(name):
    variable = _variable()
    optimizer = _warmed_up(OPTIMIZERS[name](), variable)
    grads = _task_grads()
    candidates = update_rule_for(optimizer).candidates(variable, stack_task_gradients(grads, variable))
    for candidate, grad in zip(candidates.updates.numpy(), grads, strict=True):
        np.testing.assert_allclose(candidate, _delta_of_one_real_step(OPTIMIZERS[name], grad), rtol=2e-5, atol=1e-7)
    assert bool(candidates.all_finite)


def test_the_adam_family_gets_its_own_rule():
    assert isinstance(update_rule_for(OPTIMIZERS["clippy_adam"]()), ScaledAdamRule)
    assert isinstance(update_rule_for(OPTIMIZERS["adam"]()), AdamRule)


def test_adam_candidates_match_numpy():
    variable = _variable()
    optimizer = _warmed_up(keras.optimizers.Adam(0.01, beta_1=0.8, beta_2=0.95, epsilon=1e-3), variable)
    grads = _task_grads()
    candidates = AdamRule(optimizer).candidates(variable, stack_task_gradients(grads, variable)).updates.numpy()
    m = tf_variable(optimizer._momentums[0]).numpy().astype(np.float64)
    v = tf_variable(optimizer._velocities[0]).numpy().astype(np.float64)
    t = 4
    for candidate, grad in zip(candidates, grads, strict=True):
        g = grad.numpy().astype(np.float64)
        m_i, v_i = 0.8 * m + 0.2 * g, 0.95 * v + 0.05 * g**2
        expected = 0.01 * np.sqrt(1 - 0.95**t) / (1 - 0.8**t) * m_i / (np.sqrt(v_i) + 1e-3)
        np.testing.assert_allclose(candidate, expected, rtol=1e-5)


def test_clippy_candidates_match_numpy():
    variable = _variable()
    optimizer = _warmed_up(tfrs_clippy.ClippyAdagrad.from_paper(0.5), variable)
    grads = _task_grads()
    candidates = AdagradRule(optimizer).candidates(variable, stack_task_gradients(grads, variable)).updates.numpy()
    w = tf_variable(variable).numpy().astype(np.float64)
    accumulator = optimizer.accumulator(variable).numpy().astype(np.float64)
    for candidate, grad in zip(candidates, grads, strict=True):
        g = grad.numpy().astype(np.float64)
        update = 0.5 * g / np.sqrt(accumulator + g**2 + 1e-7)  # Algorithm 1: accumulate first
        sigma = min(1.0, np.min((0.5 * np.abs(w) + 1e-2) / np.abs(update)))
        np.testing.assert_allclose(candidate, sigma * update, rtol=1e-5)
    assert np.abs(candidates[2]).max() < np.abs(candidates[0]).max() * 20, "the 100x gradient must be clipped"


def test_clippy_adam_candidates_match_numpy():
    variable = _variable()
    optimizer = _warmed_up(OPTIMIZERS["clippy_adam_amsgrad"](), variable)
    grads = _task_grads()
    candidates = update_rule_for(optimizer).candidates(variable, stack_task_gradients(grads, variable))
    w = tf_variable(variable).numpy().astype(np.float64)
    slots = optimizer.slots_of(variable)
    m, v, v_hat = (slot.numpy().astype(np.float64) for slot in (slots.momentum, slots.velocity, slots.velocity_hat))
    t = 4
    sigmas = []
    for candidate, grad in zip(candidates.updates.numpy(), grads, strict=True):
        g = grad.numpy().astype(np.float64)
        m_i, v_i = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g**2
        update = 0.05 * np.sqrt(1 - 0.999**t) / (1 - 0.9**t) * m_i / (np.sqrt(np.maximum(v_hat, v_i)) + 1e-7)
        sigmas.append(min(1.0, np.min((0.01 * np.abs(w) + 1e-2) / np.abs(update))))
        np.testing.assert_allclose(candidate, sigmas[-1] * update, rtol=1e-5)
    assert max(sigmas) < 1.0, "the rule must fire"
    np.testing.assert_allclose(float(candidates.smallest_scale), min(sigmas), rtol=1e-5)


@pytest.mark.parametrize("name", ["adagrad", "clippy", "clippy_adam", "clippy_adam_amsgrad"])
def test_commit_advances_the_state_as_the_optimizer_on_the_combined_gradient(name):
    """The slots end as the optimizer's own after one step on sum_i alpha_i g_i; the variable moves by
    sum_i alpha_i d_i."""
    variable, reference = _variable(), _variable()
    optimizer, reference_optimizer = _warmed_up(OPTIMIZERS[name](), variable), _warmed_up(OPTIMIZERS[name](), reference)
    grads = _task_grads()
    weights = tf.constant([0.5, 1.5, 1.0])
    stacked = stack_task_gradients(grads, variable)
    rule = update_rule_for(optimizer)
    candidates = rule.candidates(variable, stacked)
    before = np.array(variable.numpy())
    rule.commit(variable, stacked, candidates, weights)
    reference_optimizer.apply_gradients([(stacked.combine(weights), reference)])
    np.testing.assert_allclose(before - variable.numpy(), candidates.move(weights).numpy(), rtol=1e-5, atol=1e-7)
    slots, reference_slots = optimizer.slots_of(variable), reference_optimizer.slots_of(reference)
    for field in dataclasses.fields(slots):
        if getattr(slots, field.name) is not None and field.name not in ("clipping_factor", "nonfinite_steps"):
            np.testing.assert_allclose(
                getattr(slots, field.name).numpy(), getattr(reference_slots, field.name).numpy(), rtol=1e-5,
                err_msg=field.name,
            )
    assert int(slots.nonfinite_steps) == 0


def test_commit_with_unit_weights_is_adagrad_on_the_summed_gradient():
    """With the delayed accumulator the Adagrad step is linear in g: sum_i d_i = d(sum_i g_i), state included."""
    make = OPTIMIZERS["adagrad_delayed"]
    variable, reference = _variable(), _variable()
    optimizer, reference_optimizer = _warmed_up(make(), variable), _warmed_up(make(), reference)
    grads = _task_grads()
    stacked = stack_task_gradients(grads, variable)
    rule = update_rule_for(optimizer)
    ones = tf.ones([3])
    rule.commit(variable, stacked, rule.candidates(variable, stacked), ones)
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
    summed = rule.candidates(variable, stack_task_gradients(grads, variable)).updates.numpy().sum(axis=0)
    of_sum = rule.candidates(variable, stack_task_gradients([tf.add_n(grads)], variable)).updates.numpy()[0]
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


@pytest.mark.parametrize("name", ["adam", "clippy", "clippy_adam"])
def test_sparse_commit_touches_only_the_touched_rows(name):
    table = _embedding_table()
    optimizer = OPTIMIZERS[name]()
    optimizer.build([table])
    before = np.array(table.numpy())
    grads = [_sparse([[1, 1], [2, 2]], [4, 1]), _sparse([[-3, 1]], [4])]
    stacked = stack_task_gradients(grads, table)
    rule = update_rule_for(optimizer)
    weights = tf.constant([0.5, 1.5])
    rule.commit(table, stacked, rule.candidates(table, stacked), weights)
    moved = np.any(table.numpy() != before, axis=1)
    assert list(np.flatnonzero(moved)) == [1, 4]
    # The touched rows moved exactly as the dense computation says.
    dense_table = _embedding_table()
    dense_optimizer = OPTIMIZERS[name]()
    dense_optimizer.build([dense_table])
    dense_grads = [tf.convert_to_tensor(grad) for grad in grads]
    dense_stacked = stack_task_gradients(dense_grads, dense_table)
    dense_candidates = update_rule_for(dense_optimizer).candidates(dense_table, dense_stacked).updates.numpy()
    expected_move = np.tensordot([0.5, 1.5], dense_candidates, 1)[[1, 4]]
    np.testing.assert_allclose((before - table.numpy())[[1, 4]], expected_move, rtol=1e-5)


def test_sparse_adam_candidates_are_the_lazy_step():
    """On a table whose every row has moments, a sparse candidate is ClippyAdam's lazy step on the touched rows."""
    make = lambda: tfrs_clippy.ClippyAdam(0.05, variable_relative_threshold=0.01, sparse_updates="lazy")  # noqa: E731
    table, reference = _embedding_table(), _embedding_table()
    optimizer, reference_optimizer = _warmed_up(make(), table), _warmed_up(make(), reference)
    grad = _sparse([[4, -1], [2, 2], [-3, 1]], [4, 1, 4])
    candidates = update_rule_for(optimizer).candidates(table, stack_task_gradients([grad, None], table))
    assert float(candidates.smallest_scale) < 1.0, "the rule must fire"
    before = np.array(reference.numpy())
    reference_optimizer.apply_gradients([(grad, reference)])
    lazy_move = before - reference.numpy()
    assert list(np.flatnonzero(np.any(lazy_move != 0, axis=1))) == [1, 4]
    rows = stack_task_gradients([grad, None], table).rows.numpy()
    np.testing.assert_allclose(candidates.updates.numpy()[0], lazy_move[rows], rtol=1e-5)


def _slot_values(optimizer, variable) -> dict:
    """Every tensor slot of `variable` (all optimizer variables for Keras's Adam), as arrays."""
    if not isinstance(optimizer, ScaledOptimizer):
        return {index: np.array(slot) for index, slot in enumerate(optimizer.variables)}
    slots = optimizer.slots_of(variable)
    return {
        field.name: getattr(slots, field.name).numpy()
        for field in dataclasses.fields(slots)
        if getattr(slots, field.name) is not None and field.name not in ("clipping_factor", "nonfinite_steps")
    }


NON_FINITE_OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(0.01),
    "clippy": lambda: tfrs_clippy.ClippyAdagrad.from_paper(0.5, export_clipping_factors=True),
    "clippy_adam": lambda: tfrs_clippy.ClippyAdam(0.05, amsgrad=True, export_clipping_factors=True),
}


@pytest.mark.parametrize("name", sorted(NON_FINITE_OPTIMIZERS))
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("where", ["task_gradient", "weights"])
def test_a_non_finite_gradient_writes_nothing_and_is_counted(name, sparse, where):
    """A NaN in one task's gradient, or a NaN alpha (a non-finite combined gradient): neither the variable nor its
    state change; tfrs_clippy's optimizers count the step and export a clipping factor of 0."""
    variable = _embedding_table() if sparse else _variable()
    optimizer = _warmed_up(NON_FINITE_OPTIMIZERS[name](), variable)
    nan = float("nan") if where == "task_gradient" else 1.0
    if sparse:
        grads = [_sparse([[1, 1], [2, nan]], [4, 1]), _sparse([[-3, 1]], [4])]
    else:
        grads = [tf.constant(np.full(SHAPE, nan), tf.float32), _task_grads(1)[0]]
    weights = tf.constant([1.0, 1.0] if where == "task_gradient" else [float("nan"), 1.0])
    before_variable, before_slots = np.array(variable.numpy()), _slot_values(optimizer, variable)
    stacked = stack_task_gradients(grads, variable)
    rule = update_rule_for(optimizer)
    rule.commit(variable, stacked, rule.candidates(variable, stacked), weights)
    np.testing.assert_array_equal(variable.numpy(), before_variable)
    for slot, value in _slot_values(optimizer, variable).items():
        np.testing.assert_array_equal(value, before_slots[slot], err_msg=str(slot))
    if isinstance(optimizer, ScaledOptimizer):
        slots = optimizer.slots_of(variable)
        assert int(slots.nonfinite_steps) == 1 and float(slots.clipping_factor) == 0.0


@pytest.mark.parametrize(
    "make_optimizer",
    [
        # Algorithm 1's order: G = 3 + g^2 = 4, so u = 2 * g / sqrt(4) = 1 for g = 1.
        lambda: tfrs_clippy.ClippyAdagrad.from_paper(2.0, initial_accumulator_value=3.0, export_clipping_factors=True),
        # Adam's first step: u = lr * m_hat / (sqrt(v_hat) + eps) = 1 (up to eps) for g = 1.
        lambda: tfrs_clippy.ClippyAdam(1.0, export_clipping_factors=True),
    ],
    ids=["clippy_adagrad", "clippy_adam"],
)
@pytest.mark.parametrize("clip", ["per_task", "combined"])
def test_combined_clipping_keeps_the_bound_on_the_balanced_move(make_optimizer, clip):
    """w = (1, 0), two tasks with g = (1, 1), alpha = (1, 1); every unscaled step is u = (1, 1) and Clippy's bound
    0.5 |w| + 0.01 is (0.51, 0.01). "per_task": each d_i = 0.01 u, so the move (0.02, 0.02) is twice the bound of
    the second coordinate. "combined": the move 2u scaled once by 0.01 / 2, (0.01, 0.01), within the bound."""
    value = np.array([1.0, 0.0], np.float32)
    variable = tf.Variable(value) if tfrs_clippy.LEGACY_KERAS else keras.Variable(value)
    optimizer = make_optimizer()
    optimizer.build([variable])
    grads = [tf.constant([1.0, 1.0]), tf.constant([1.0, 1.0])]
    stacked = stack_task_gradients(grads, variable)
    rule = update_rule_for(optimizer, clip=clip)
    rule.commit(variable, stacked, rule.candidates(variable, stacked), tf.constant([1.0, 1.0]))
    move = value - variable.numpy()
    expected_move, expected_factor = ([0.02, 0.02], 0.01) if clip == "per_task" else ([0.01, 0.01], 0.005)
    np.testing.assert_allclose(move, expected_move, rtol=1e-5)
    np.testing.assert_allclose(float(optimizer.slots_of(variable).clipping_factor), expected_factor, rtol=1e-5)
    within_bound = np.abs(move) <= (0.5 * np.abs(value) + 0.01) * (1 + 1e-5)
    assert within_bound.all() == (clip == "combined"), move


@pytest.mark.parametrize(
    "optimizer, message",
    [
        (lambda: keras.optimizers.SGD(0.1), "needs Adam or an optimizer of tfrs_clippy"),
        (lambda: keras.optimizers.Adam(0.1, clipnorm=1.0), "clipnorm"),
        (lambda: keras.optimizers.Adam(0.1, amsgrad=True), "amsgrad"),
        (lambda: tfrs_clippy.ClippyAdam(0.1, clipnorm=1.0), "clipnorm"),
    ],
)
def test_unsupported_optimizers_are_refused(optimizer, message):
    with pytest.raises(ValueError, match=message):
        update_rule_for(optimizer())


def test_an_invalid_clip_is_refused():
    with pytest.raises(ValueError, match="`clip` must be one of .*got 'both'"):
        update_rule_for(tfrs_clippy.ClippyAdam(0.1), clip="both")
