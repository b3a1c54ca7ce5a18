"""ClippyAdagrad against a NumPy oracle, TFRS's class, plain Adagrad and its own invariants, in either runtime."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import tensorflow as tf

import tfrs_clippy
from tfrs_clippy import ClippyAdagrad, keras
from tfrs_clippy.optimizers import rules

from numpy_oracle import ClippyOracle

MODES = {
    "standard": dict(use_standard_accumulator_update=True),
    "delayed": dict(),
    "delayed_clipped": dict(clip_accumulator_update=True),
}
# Thresholds tight enough that most steps clip, so the tests see sigma < 1 as well as sigma = 1.
THRESHOLDS = dict(variable_relative_threshold=0.05, accumulator_relative_threshold=1e-3, absolute_threshold=1e-3)


def random_problem(seed: int, shape=(6, 4), steps: int = 20, sparse_rows: int = 0, repeats: bool = False):
    """Initial weights and a list of gradients: dense arrays, or (values, indices) pairs when sparse_rows > 0."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=shape).astype(np.float32)
    grads = []
    for _ in range(steps):
        scale = rng.choice([0.1, 1.0, 10.0])
        if sparse_rows:
            indices = rng.choice(shape[0], size=sparse_rows, replace=repeats).astype(np.int64)
            values = (scale * rng.normal(size=(sparse_rows,) + shape[1:])).astype(np.float32)
            grads.append((values, indices))
        else:
            grads.append((scale * rng.normal(size=shape)).astype(np.float32))
    return weights, grads


def densify(grad, shape) -> np.ndarray:
    if isinstance(grad, tuple):
        values, indices = grad
        dense = np.zeros(shape, np.float64)
        np.add.at(dense, indices, values)
        return dense
    return np.asarray(grad, np.float64)


def to_tf_grad(grad, shape):
    if isinstance(grad, tuple):
        values, indices = grad
        return tf.IndexedSlices(tf.constant(values), tf.constant(indices), tf.constant(shape, tf.int64))
    return tf.constant(grad)


def run_optimizer(optimizer, weights: np.ndarray, grads, in_function: bool = True):
    """Applies `grads` one step at a time; returns the variable and the per-step clipping factors."""
    variable = tf.Variable(weights, name="w")
    apply = optimizer.apply_gradients
    if in_function:
        apply = tf.function(apply)
    factors = []
    for grad in grads:
        apply([(to_tf_grad(grad, weights.shape), variable)])
        if getattr(optimizer, "export_clipping_factors", False):
            factors.append(float(optimizer.clipping_factors[0].numpy()))
    return variable, factors


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("clipping_axis", [None, 0, 1])
@pytest.mark.parametrize("sparse", [False, True])
def test_matches_numpy_oracle(mode, clipping_axis, sparse):
    weights, grads = random_problem(seed=1, sparse_rows=5 if sparse else 0, repeats=sparse)
    optimizer = ClippyAdagrad(
        learning_rate=0.02, export_clipping_factors=True, clipping_axis=clipping_axis, **MODES[mode], **THRESHOLDS
    )
    variable, factors = run_optimizer(optimizer, weights, grads)
    oracle = ClippyOracle(weights, learning_rate=0.02, mode=mode, axis=clipping_axis, **THRESHOLDS)
    sigmas = [float(oracle.step(densify(g, weights.shape)).min()) for g in grads]

    np.testing.assert_allclose(variable.numpy(), oracle.weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(factors, sigmas, rtol=1e-5, atol=1e-6)
    assert min(sigmas) < 0.5 and max(sigmas) == 1.0, "the problem should exercise clipped and unclipped steps"


def test_paper_setting_is_algorithm_1():
    weights, grads = random_problem(seed=2)
    optimizer = ClippyAdagrad.from_paper(learning_rate=2.0)
    variable, _ = run_optimizer(optimizer, weights, grads)
    oracle = ClippyOracle(weights, learning_rate=2.0, mode="standard", variable_relative_threshold=0.5,
                          accumulator_relative_threshold=0.0, absolute_threshold=1e-2)
    for grad in grads:
        oracle.step(grad)
    np.testing.assert_allclose(variable.numpy(), oracle.weights, rtol=1e-5, atol=1e-6)
    assert optimizer.get_config()["variable_relative_threshold"] == 0.5
    assert optimizer.get_config()["absolute_threshold"] == 1e-2
    assert optimizer.get_config()["use_standard_accumulator_update"] is True


@pytest.mark.parametrize("sparse", [False, True])
def test_infinite_thresholds_equal_plain_adagrad(sparse):
    # Unique indices: Keras 3's own Adagrad mishandles repeated ones (see the duplicates test).
    weights, grads = random_problem(seed=3, sparse_rows=4 if sparse else 0)
    inf = math.inf
    clippy = ClippyAdagrad(learning_rate=0.3, use_standard_accumulator_update=True, variable_relative_threshold=inf,
                           accumulator_relative_threshold=inf, absolute_threshold=inf)
    adagrad = keras.optimizers.Adagrad(learning_rate=0.3, initial_accumulator_value=0.1, epsilon=1e-7)
    ours, _ = run_optimizer(clippy, weights, grads)
    theirs, _ = run_optimizer(adagrad, weights, grads)
    assert np.max(np.abs(ours.numpy() - theirs.numpy())) <= 1e-6


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("clipping_axis", [None, 0])
def test_repeated_ids_equal_the_densified_gradient(mode, clipping_axis):
    weights, sparse_grads = random_problem(seed=4, sparse_rows=12, repeats=True)
    dense_grads = [densify(g, weights.shape).astype(np.float32) for g in sparse_grads]
    assert any(len(set(i.tolist())) < len(i) for _, i in sparse_grads), "the problem must repeat ids"
    make = lambda: ClippyAdagrad(learning_rate=0.5, clipping_axis=clipping_axis, **MODES[mode], **THRESHOLDS)
    sparse_result, _ = run_optimizer(make(), weights, sparse_grads)
    dense_result, _ = run_optimizer(make(), weights, dense_grads)
    np.testing.assert_allclose(sparse_result.numpy(), dense_result.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("clipping_axis", [None, 0])
def test_no_coordinate_moves_more_than_its_bound(mode, clipping_axis):
    rng = np.random.default_rng(5)
    weights = rng.normal(size=(8, 3)).astype(np.float32)
    optimizer = ClippyAdagrad(learning_rate=10.0, clipping_axis=clipping_axis, **MODES[mode], **THRESHOLDS)
    variable = tf.Variable(weights)
    apply = tf.function(optimizer.apply_gradients)
    for _ in range(15):
        grad = (100.0 * rng.normal(size=weights.shape)).astype(np.float32)
        before = variable.numpy()
        accumulator = optimizer._slots[0].accumulator.numpy() if optimizer._slots else np.full_like(before, 0.1)
        if mode == "standard":
            accumulator = accumulator + grad.astype(np.float64) ** 2
        bound = (THRESHOLDS["absolute_threshold"] + THRESHOLDS["variable_relative_threshold"] * np.abs(before)
                 + THRESHOLDS["accumulator_relative_threshold"] / np.sqrt(accumulator + 1e-7))
        apply([(tf.constant(grad), variable)])
        moved = np.abs(variable.numpy() - before)
        assert np.all(moved <= bound * (1 + 1e-5) + 1e-7), np.max(moved / bound)
        # ... and the bound is tight: some coordinate of each clipped unit moves by its full bound.
        assert np.isclose(np.max(moved / bound), 1.0, rtol=1e-4)


def test_nonfinite_gradient_never_reaches_weights_or_accumulator():
    optimizer = ClippyAdagrad(learning_rate=0.1, export_clipping_factors=True)
    first = tf.Variable([1.0, 2.0, 3.0], name="first")
    second = tf.Variable([1.0, 2.0, 3.0], name="second")
    table = tf.Variable(np.ones((5, 2), np.float32), name="table")
    apply = tf.function(optimizer.apply_gradients)
    row = tf.IndexedSlices(tf.ones((1, 2)), tf.constant([1]), tf.constant([5, 2]))
    apply([(tf.ones(3), first), (tf.ones(3), second), (row, table)])
    snapshot = [v.numpy() for v in (first, *[s.accumulator for s in optimizer._slots])]
    bad_sparse = tf.IndexedSlices(tf.constant([[1.0, math.inf]]), tf.constant([3]), tf.constant([5, 2]))
    before_table = table.numpy()
    apply([(tf.constant([1.0, math.nan, 1.0]), first), (tf.ones(3), second), (bad_sparse, table)])

    np.testing.assert_array_equal(first.numpy(), snapshot[0])
    np.testing.assert_array_equal(optimizer._slots[0].accumulator.numpy(), snapshot[1])
    np.testing.assert_array_equal(table.numpy(), before_table)
    np.testing.assert_array_equal(optimizer._slots[2].accumulator.numpy(), snapshot[3])
    assert not np.array_equal(second.numpy(), [1.0, 2.0, 3.0])  # a finite neighbour still trains
    counts = {name: int(c) for name, c in optimizer.nonfinite_steps_by_name().items()}
    assert sorted(counts.values()) == [0, 1, 1]
    assert int(optimizer.nonfinite_steps) == 2
    assert [float(f) for f in optimizer.clipping_factors][0] == 0.0


def test_exclude_from_clipping_gives_plain_adagrad():
    optimizer = ClippyAdagrad(learning_rate=5.0, exclude_from_clipping=["embedding"],
                              use_standard_accumulator_update=True, **THRESHOLDS)
    free = tf.Variable(np.ones((3, 2), np.float32), name="embedding_table")
    clipped = tf.Variable(np.ones((3, 2), np.float32), name="kernel")
    grad = tf.constant(np.full((3, 2), 4.0, np.float32))
    optimizer.apply_gradients([(grad, free), (grad, clipped)])
    adagrad_step = 5.0 * 4.0 / math.sqrt(0.1 + 16.0 + 1e-7)
    np.testing.assert_allclose(free.numpy(), 1.0 - adagrad_step, rtol=1e-6)
    bound = THRESHOLDS["absolute_threshold"] + THRESHOLDS["variable_relative_threshold"] * 1.0 + \
        THRESHOLDS["accumulator_relative_threshold"] / math.sqrt(16.1 + 1e-7)
    np.testing.assert_allclose(clipped.numpy(), 1.0 - bound, rtol=1e-5)


def test_float16_and_bfloat16_variables_keep_float32_accumulators():
    optimizer = ClippyAdagrad(learning_rate=0.1)
    half = tf.Variable(tf.ones(4, tf.float16))
    brain = tf.Variable(tf.ones(4, tf.bfloat16))
    optimizer.apply_gradients([(tf.fill([4], tf.constant(1e-3, tf.float16)), half),
                               (tf.fill([4], tf.constant(1e-3, tf.bfloat16)), brain)])
    assert [s.accumulator.dtype for s in optimizer._slots] == [tf.float32, tf.float32]
    # 1e-3 squared is below float16's smallest normal; a float16 accumulator would round it away.
    np.testing.assert_allclose(optimizer._slots[0].accumulator.numpy(), 0.1 + 1e-6, rtol=1e-3)
    assert half.dtype == tf.float16 and float(half[0]) < 1.0


def test_learning_rate_schedule_is_followed():
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([2], [1.0, 0.1])
    weights, grads = random_problem(seed=6, steps=4)
    variable, _ = run_optimizer(ClippyAdagrad(learning_rate=schedule, **THRESHOLDS), weights, grads)
    oracle = ClippyOracle(weights, learning_rate=1.0, mode="delayed", **THRESHOLDS)
    for step, grad in enumerate(grads):
        oracle.learning_rate = 1.0 if step <= 2 else 0.1  # PiecewiseConstantDecay: step <= boundary -> first value
        oracle.step(grad)
    np.testing.assert_allclose(variable.numpy(), oracle.weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_fused_and_unfused_dense_steps_agree(fused):
    weights, grads = random_problem(seed=7)
    reference, _ = run_optimizer(ClippyAdagrad(learning_rate=0.5, fuse_dense_updates=False, **THRESHOLDS), weights,
                                 grads, in_function=False)
    result, _ = run_optimizer(ClippyAdagrad(learning_rate=0.5, fuse_dense_updates=fused, **THRESHOLDS), weights, grads)
    np.testing.assert_allclose(result.numpy(), reference.numpy(), rtol=1e-6, atol=1e-6)


ALL_ARGUMENTS = dict(
    learning_rate=0.25, initial_accumulator_value=0.2, variable_relative_threshold=0.3,
    accumulator_relative_threshold=1e-3, absolute_threshold=1e-4, epsilon=1e-6, export_clipping_factors=True,
    clip_accumulator_update=False, use_standard_accumulator_update=True, clipping_axis=0,
    exclude_from_clipping=["embedding", "bias$"], fuse_dense_updates=False, name="my_clippy",
)


def test_config_round_trips_every_argument():
    optimizer = ClippyAdagrad(**ALL_ARGUMENTS)
    config = optimizer.get_config()
    for key, value in ALL_ARGUMENTS.items():
        assert config[key] == pytest.approx(value) if isinstance(value, float) else config[key] == value, key
    restored = ClippyAdagrad.from_config(config)
    assert restored.get_config() == config
    serialized = keras.optimizers.serialize(optimizer)
    assert "ClippyAdagrad" in str(serialized)
    assert keras.optimizers.deserialize(serialized).get_config() == config


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(variable_relative_threshold=-0.1),
         "`variable_relative_threshold` must be a non-negative number, got -0.1"),
        (dict(accumulator_relative_threshold=-1.0),
         "`accumulator_relative_threshold` must be a non-negative number, got -1.0"),
        (dict(absolute_threshold=float("nan")), "`absolute_threshold` must be a non-negative number, got nan"),
        (dict(initial_accumulator_value=-0.5), "`initial_accumulator_value` must be a non-negative number, got -0.5"),
        (dict(epsilon=0.0, initial_accumulator_value=0.0),
         "`initial_accumulator_value` + `epsilon` must be positive"),  # epsilon 0 alone is fine, as in TFRS
        (dict(epsilon=float("nan")), "`epsilon` must be a number, got nan"),
        (dict(learning_rate=-1.0), "`learning_rate` must be a finite non-negative number or a schedule, got -1.0"),
        (dict(clip_accumulator_update=True, use_standard_accumulator_update=True), "cannot both be True"),
        (dict(clipping_axis=1.5), "`clipping_axis` must be None or an int, got 1.5"),
        (dict(exclude_from_clipping="embedding"), "must be a list of regular expressions, got the string 'embedding'"),
        (dict(exclude_from_clipping=["("]), "invalid pattern '('"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(arguments, message):
    with pytest.raises(ValueError) as error:
        ClippyAdagrad(**arguments)
    assert message in str(error.value)


def test_class_belongs_to_this_process_runtime():
    assert issubclass(ClippyAdagrad, tf.keras.optimizers.Optimizer)
    assert tfrs_clippy.LEGACY_KERAS == keras.__version__.startswith("2.")


def graphs_with_nested_functions(graph):
    """`graph` and, recursively, the bodies of every function it calls (nested `tf.function`s such as the XLA-compiled
    sparse rows step, control-flow branches): their ops live in the graph's function library, not in
    `graph.get_operations()`. Returns [(function name or None for `graph`, FuncGraph)]."""
    found, pending, seen = [(None, graph)], [graph], set()
    while pending:
        for name, function in pending.pop()._functions.items():  # pylint: disable=protected-access
            if name not in seen:
                seen.add(name)
                found.append((name, function.graph))
                pending.append(function.graph)
    library = {function.signature.name for function in graph.as_graph_def().library.function}
    assert library <= seen, f"functions of the library not walked: {sorted(library - seen)}"
    return found


def table_sized_ops(graph, rows: int) -> list:
    """The ops of `graph` and of its nested functions that may materialize a tensor of `rows` or more rows: a
    fully known output of at least `rows` elements, an output with a dimension of `rows`, or a variable read of
    unknown shape (a nested function's read of a table handle may have no static shape)."""
    suspects = []
    for name, body in graphs_with_nested_functions(graph):
        for op in body.get_operations():
            for output in op.outputs:
                shape = output.shape
                unknown_read = op.type == "ReadVariableOp" and not shape.is_fully_defined()
                large = shape.rank is not None and (
                    (shape.is_fully_defined() and shape.num_elements() >= rows) or rows in shape.as_list())
                if unknown_read or large:
                    suspects.append((name, op.type, op.name, shape))
    return suspects


@pytest.mark.parametrize("clipping_axis", [0, None])
def test_sparse_step_never_touches_the_whole_table(clipping_axis):
    """No op of the sparse step produces a tensor as large as the table, nor in the functions it calls: work is
    proportional to the touched rows. clipping_axis=None takes the fast path, a nested XLA-compiled function."""
    rows = 100_003  # a row count no other tensor in the graph has
    optimizer = ClippyAdagrad(learning_rate=0.1, export_clipping_factors=True, clipping_axis=clipping_axis)
    table = tf.Variable(tf.zeros((rows, 8)))
    optimizer.build([table])

    @tf.function
    def sparse_step(values, indices):
        optimizer.apply_gradients([(tf.IndexedSlices(values, indices, tf.constant([rows, 8], tf.int64)), table)])

    graph = sparse_step.get_concrete_function(
        tf.TensorSpec([None, 8], tf.float32), tf.TensorSpec([None], tf.int64)
    ).graph
    assert not table_sized_ops(graph, rows), "an op materializes a table-sized tensor"
    nested = graphs_with_nested_functions(graph)[1:]
    if clipping_axis is None:  # the check did walk into the compiled rows step, where the rows are gathered
        assert any(op.type == "ResourceGather" for _, body in nested for op in body.get_operations()), nested
    sparse_step(tf.ones((3, 8)), tf.constant([5, 5, 17], tf.int64))
    assert float(tf.reduce_sum(table)) != 0.0


def _ranker_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 50, size=(256, 3))
    labels = (ids.sum(axis=1, keepdims=True) % 7 / 7.0).astype(np.float32)
    return ids, labels


def _embedding_model(seed: int = 0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((3,), dtype="int32"),
        keras.layers.Embedding(50, 8),
        keras.layers.Flatten(),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(1),
    ])


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_embedding_and_dense_model(jit_compile):
    ids, labels = _ranker_data()
    model = _embedding_model()
    model.compile(optimizer=ClippyAdagrad.from_paper(learning_rate=0.1, export_clipping_factors=True), loss="mse",
                  jit_compile=jit_compile)
    history = model.fit(ids, labels, batch_size=32, epochs=4, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert losses[-1] < 0.7 * losses[0], losses
    factors = model.optimizer.clipping_factors_by_name()
    assert len(factors) == 5 and all(0.0 < float(f) <= 1.0 for f in factors.values())


def test_jit_compiled_fit_equals_graph_fit():
    ids, labels = _ranker_data(1)
    results = []
    for jit_compile in (False, True):
        model = _embedding_model(seed=3)
        model.compile(optimizer=ClippyAdagrad(learning_rate=0.2, **THRESHOLDS), loss="mse", jit_compile=jit_compile)
        model.fit(ids, labels, batch_size=32, epochs=1, verbose=0, shuffle=False)
        results.append(model.get_weights())
    for graph_weight, jit_weight in zip(*results, strict=True):
        np.testing.assert_allclose(graph_weight, jit_weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_fit(policy):
    ids, labels = _ranker_data(2)
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = _embedding_model()
        model.compile(optimizer=ClippyAdagrad(learning_rate=0.1, **THRESHOLDS), loss="mse")
        history = model.fit(ids, labels, batch_size=32, epochs=2, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert all(math.isfinite(loss) for loss in history.history["loss"])
    assert history.history["loss"][-1] < history.history["loss"][0]
    inner = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    assert isinstance(inner, ClippyAdagrad)
    assert all(slots.accumulator.dtype == tf.float32 for slots in inner._slots)


def _save_and_restore(model, directory, save_format: str):
    """A fresh model and optimizer holding the saved state (`.keras` file, or a TensorFlow checkpoint)."""
    if save_format == "keras":
        path = str(directory / "model.keras")
        model.save(path)
        return keras.models.load_model(path)
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(str(directory / "checkpoint"))
    restored = _embedding_model(seed=99)
    restored.compile(optimizer=ClippyAdagrad.from_config(model.optimizer.get_config()), loss="mse")
    tf.train.Checkpoint(model=restored, optimizer=restored.optimizer).restore(path).expect_partial()
    restored.optimizer.build(restored.trainable_variables)  # slots restore as they are created
    return restored


@pytest.mark.parametrize("save_format", ["keras", "checkpoint"])
def test_saved_model_continues_training_identically(tmp_path, save_format):
    ids, labels = _ranker_data(4)
    first, second = (ids[:128], labels[:128]), (ids[128:], labels[128:])
    model = _embedding_model(seed=5)
    model.compile(optimizer=ClippyAdagrad(learning_rate=0.3, export_clipping_factors=True, clipping_axis=0,
                                          **THRESHOLDS), loss="mse")
    model.fit(*first, batch_size=32, verbose=0, shuffle=False)
    restored = _save_and_restore(model, tmp_path, save_format)
    assert isinstance(restored.optimizer, ClippyAdagrad)
    assert restored.optimizer.get_config() == model.optimizer.get_config()
    assert int(restored.optimizer.iterations) == int(model.optimizer.iterations) == 4
    for trained in (model, restored):
        trained.fit(*second, batch_size=32, verbose=0, shuffle=False)
    for original, reloaded in zip(model.get_weights(), restored.get_weights(), strict=True):
        np.testing.assert_array_equal(original, reloaded)
    for original, reloaded in zip(model.optimizer.variables, restored.optimizer.variables, strict=True):
        np.testing.assert_array_equal(original.numpy(), reloaded.numpy())


@pytest.mark.keras2_only
@pytest.mark.parametrize(
    "flags",
    [dict(export_clipping_factors=e, clip_accumulator_update=c, use_standard_accumulator_update=s)
     for e, c, s in itertools.product([False, True], repeat=3) if not (c and s)],
)
@pytest.mark.parametrize("sparse", [False, True])
def test_equals_tfrs_clippy_adagrad(flags, sparse):
    from tensorflow_recommenders.experimental.optimizers import ClippyAdagrad as TfrsClippyAdagrad

    # Unique indices: TFRS's class scatters repeated ids one by one (ours sums them first).
    weights, grads = random_problem(seed=8, sparse_rows=4 if sparse else 0)
    arguments = dict(learning_rate=0.5, **THRESHOLDS, **flags)
    ours, our_factors = run_optimizer(ClippyAdagrad(**arguments), weights, grads)
    theirs_optimizer = TfrsClippyAdagrad(**arguments)
    theirs, _ = run_optimizer(theirs_optimizer, weights, grads)
    assert np.max(np.abs(ours.numpy() - theirs.numpy())) <= 1e-6
    if flags["export_clipping_factors"]:
        assert our_factors[-1] == pytest.approx(float(theirs_optimizer.clipping_factors[0].numpy()), abs=1e-6)
        assert min(our_factors) < 1.0


def test_core_rule_is_a_pure_function():
    """The rule alone, on hand numbers: u = [0.4, -0.1, 0], bound = 0.01 + 0.1*|w| -> sigma = 0.02/0.4."""
    rule = rules.ClippyRule(variable_relative_threshold=0.1, accumulator_relative_threshold=0.0,
                            absolute_threshold=0.01)
    step = rules.StepInputs(grad=tf.constant([4.0, -1.0, 0.0]), variable=tf.constant([0.1, 5.0, 0.0]),
                            precondition=tf.ones(3), direction=tf.constant([4.0, -1.0, 0.0]),
                            update=tf.constant([0.4, -0.1, 0.0]))
    sigma = rule(step, reduce_axes=[0])
    assert float(sigma[0]) == pytest.approx((0.01 + 0.1 * 0.1) / 0.4)
    zero_bound = rules.ClippyRule(0.0, 0.0, 0.0)
    assert float(zero_bound(step, reduce_axes=[0])[0]) == 0.0


def test_float64_variables_are_computed_in_float64():
    weights, grads = random_problem(seed=9, steps=5)  # a learning rate float32 holds exactly: it is stored so
    optimizer = ClippyAdagrad(learning_rate=2.0**-6, **THRESHOLDS)
    variable = tf.Variable(weights.astype(np.float64))
    for grad in grads:
        optimizer.apply_gradients([(tf.constant(grad, tf.float64), variable)])
    oracle = ClippyOracle(weights, learning_rate=2.0**-6, mode="delayed", **THRESHOLDS)
    for grad in grads:
        oracle.step(grad)
    assert optimizer.accumulator(variable).dtype == tf.float64
    np.testing.assert_allclose(variable.numpy(), oracle.weights, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_sparse_gradient_with_no_rows_changes_nothing(jit_compile):
    optimizer = ClippyAdagrad(learning_rate=0.1)
    table = tf.Variable(np.ones((4, 2), np.float32))
    empty = tf.IndexedSlices(tf.zeros((0, 2)), tf.zeros((0,), tf.int64), tf.constant([4, 2], tf.int64))
    tf.function(optimizer.apply_gradients, jit_compile=jit_compile)([(empty, table)])
    np.testing.assert_array_equal(table.numpy(), np.ones((4, 2)))
    np.testing.assert_array_equal(optimizer.accumulator(table).numpy(), np.full((4, 2), 0.1, np.float32))


def test_steps_on_a_subset_of_variables_use_their_own_slots():
    optimizer = ClippyAdagrad(learning_rate=0.1, use_standard_accumulator_update=True)
    first, second = tf.Variable([1.0, 1.0], name="first"), tf.Variable([1.0, 1.0], name="second")
    optimizer.apply_gradients([(tf.constant([1.0, 1.0]), first), (tf.constant([2.0, 2.0]), second)])
    optimizer.apply_gradients([(tf.constant([3.0, 3.0]), second)])
    np.testing.assert_allclose(optimizer.accumulator(first).numpy(), [1.1, 1.1], rtol=1e-6)
    np.testing.assert_allclose(optimizer.accumulator(second).numpy(), [13.1, 13.1], rtol=1e-6)  # 0.1 + 4 + 9


@pytest.mark.keras2_only  # Keras 3 refuses variables the optimizer was not first built with
def test_a_variable_first_seen_later_gets_its_own_slots():
    optimizer = ClippyAdagrad(learning_rate=0.1, use_standard_accumulator_update=True)
    first, later = tf.Variable([1.0], name="first"), tf.Variable([1.0, 1.0], name="later")
    optimizer.apply_gradients([(tf.constant([2.0]), first)])
    optimizer.apply_gradients([(tf.constant([1.0, 1.0]), later), (tf.constant([1.0]), first)])
    np.testing.assert_allclose(optimizer.accumulator(later).numpy(), [1.1, 1.1], rtol=1e-6)
    np.testing.assert_allclose(optimizer.accumulator(first).numpy(), [5.1], rtol=1e-6)


@pytest.mark.parametrize("accumulator_update", ["standard", "delayed", "delayed_clipped"])
@pytest.mark.parametrize("rule", ["clippy", "none"])
def test_chunked_xla_dense_step_is_bit_identical_to_one_chunk(monkeypatch, accumulator_update, rule):
    """The XLA dense step reduces sigma chunk by chunk (`core._chunked_scale`): with 8-element chunks (several and
    a tail) its sigma is bit-identical to one chunk's, the new values agree to an ulp (XLA may fuse the update
    differently), and a non-finite gradient changes nothing."""
    from tfrs_clippy.optimizers import core

    rng = np.random.default_rng(3)
    shape = (7, 11, 3)
    grad, weights = (tf.constant(rng.normal(size=shape).astype(np.float32) * s) for s in (3.0, 1.0))
    accumulator = tf.constant(rng.uniform(0.1, 2.0, size=shape).astype(np.float32))
    options = dict(epsilon=1e-7, accumulator_update=accumulator_update,
                   rule=rules.ClippyRule(0.05, 1e-3, 1e-3) if rule == "clippy" else None)
    outputs = []
    for chunk in (8, 1 << 18):
        monkeypatch.setattr(core, "_CHUNK", chunk)
        step = tf.function(core.next_dense_values, jit_compile=True)  # a fresh trace for each chunk size
        outputs.append([step(g, weights, accumulator, tf.constant(0.5), **options) for g in
                        (grad, tf.tensor_scatter_nd_update(grad, [[1, 2, 0]], [np.nan]))])
    for (chunked, skipped), (whole, whole_skipped) in zip([outputs[0]], [outputs[1]], strict=True):
        assert float(chunked[2].smallest_scale) == float(whole[2].smallest_scale)
        if rule == "clippy":
            assert float(chunked[2].smallest_scale) < 1.0
        np.testing.assert_allclose(chunked[0].numpy(), whole[0].numpy(), rtol=2e-7, atol=1e-7)
        np.testing.assert_allclose(chunked[1].numpy(), whole[1].numpy(), rtol=2e-7)
        assert not bool(skipped[2].all_finite) and not bool(whole_skipped[2].all_finite)
        np.testing.assert_array_equal(skipped[0].numpy(), weights.numpy())
        np.testing.assert_array_equal(skipped[1].numpy(), accumulator.numpy())


@pytest.mark.parametrize("accumulator_update", ["standard", "delayed", "delayed_clipped"])
@pytest.mark.parametrize("rule", ["clippy", "none"])
def test_chunked_xla_dense_step_equals_the_unfused_step(monkeypatch, accumulator_update, rule):
    """Through the optimizer, the chunked XLA path (tiny chunks) against the TensorFlow-ops path: the factors and
    values to float rounding, a non-finite gradient skipped and counted on both."""
    from tfrs_clippy.optimizers import core

    monkeypatch.setattr(core, "_CHUNK", 8)
    shape = (7, 11, 3) if rule == "clippy" else (7, 11, 5)  # shapes no other test traces
    rng = np.random.default_rng(3)
    weights = rng.normal(size=shape).astype(np.float32)
    grads = [rng.normal(size=shape).astype(np.float32) * s for s in (0.1, 1.0, 3.0)]
    grads.insert(2, np.where(np.arange(np.prod(shape)).reshape(shape) == 17, np.inf, grads[1]).astype(np.float32))
    results = []
    for fused in (True, False):
        if rule == "clippy":
            optimizer = ClippyAdagrad(learning_rate=0.5, export_clipping_factors=True, fuse_dense_updates=fused,
                                      **MODES[accumulator_update], **THRESHOLDS)
        else:  # no rule: plain Adagrad
            optimizer = tfrs_clippy.Adagrad(learning_rate=0.5, accumulator_update=accumulator_update,
                                            export_clipping_factors=True, fuse_dense_updates=fused)
        variable, factors = run_optimizer(optimizer, weights, grads)
        results.append((variable.numpy(), optimizer.accumulator(variable).numpy(), factors,
                        int(optimizer.nonfinite_steps)))
    (w_fast, g_fast, f_fast, n_fast), (w_ref, g_ref, f_ref, n_ref) = results
    np.testing.assert_allclose(f_fast, f_ref, rtol=1e-6)
    assert f_fast[2] == 0.0 and n_fast == n_ref == 1
    if rule == "clippy":
        assert min(f for f in f_fast if f > 0) < 1.0  # clipping was active
    np.testing.assert_allclose(w_fast, w_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g_fast, g_ref, rtol=1e-6)


@pytest.mark.parametrize("accumulator_update", ["standard", "delayed", "delayed_clipped"])
def test_sparse_fast_path_equals_the_densified_step_and_skips_non_finite(accumulator_update):
    """The per-tensor sparse step (tf.unique, rows padded to a power of two, one XLA call) against the dense step
    on the densified gradient: same factors and values, untouched rows unchanged, a non-finite gradient skipped."""
    rows, dim = 37, 3
    rng = np.random.default_rng(5)
    weights = rng.normal(size=(rows, dim)).astype(np.float32)
    steps = []
    for scale in (0.1, 1.0, 10.0):
        ids = rng.integers(0, rows, size=11)  # repeats, 11 ids: padded rows in the bucket
        steps.append((rng.normal(size=(11, dim)).astype(np.float32) * scale, ids))
    steps.append((np.full((3, dim), np.nan, np.float32), np.array([1, 2, 1])))
    outcomes = []
    for sparse in (True, False):
        optimizer = ClippyAdagrad(learning_rate=0.5, export_clipping_factors=True, **MODES[accumulator_update],
                                  **THRESHOLDS)
        variable = tf.Variable(weights)
        apply = tf.function(optimizer.apply_gradients)
        factors = []
        for values, ids in steps:
            if sparse:
                grad = tf.IndexedSlices(tf.constant(values), tf.constant(ids, tf.int64),
                                        tf.constant([rows, dim], tf.int64))
            else:
                dense = np.zeros((rows, dim), np.float32)
                np.add.at(dense, ids, values)
                grad = tf.constant(dense)
            apply([(grad, variable)])
            factors.append(float(optimizer.clipping_factors[0].numpy()))
        outcomes.append((variable.numpy(), optimizer.accumulator(variable).numpy(), factors,
                         int(optimizer.nonfinite_steps)))
    (w_sparse, g_sparse, f_sparse, n_sparse), (w_dense, g_dense, f_dense, n_dense) = outcomes
    np.testing.assert_allclose(f_sparse, f_dense, rtol=1e-6)
    assert min(f_sparse[:3]) < 1.0 and f_sparse[3] == 0.0 and n_sparse == n_dense == 1
    np.testing.assert_allclose(w_sparse, w_dense, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(g_sparse, g_dense, rtol=1e-6)
    untouched = np.setdiff1d(np.arange(rows), np.concatenate([ids for _, ids in steps]))
    np.testing.assert_array_equal(w_sparse[untouched], weights[untouched])
