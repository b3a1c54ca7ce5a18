"""Swapping `tfrs.experimental.optimizers.ClippyAdagrad` for ours: TFRS's own tests, arguments, state, warnings.

TFRS's shipped `ClippyAdagradTest` runs against our class with two edits made to its source here, so a new TFRS
release is tested as it is. The rest checks what its tests do not: argument types, `clipping_factors` before the
first step, checkpoints written by one class and restored into the other, and eager use without retracing
warnings. docs/drop_in.md lists each difference found and its resolution.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import pathlib
import unittest

import numpy as np
import pytest
import tensorflow as tf

from tfrs_clippy import ClippyAdagrad, keras
from tfrs_clippy.optimizers import core
from tfrs_clippy.optimizers.variable_names import variable_name


def _tfrs_test_file() -> pathlib.Path | None:
    """TFRS's installed clippy_adagrad_test.py, found without importing TFRS (it imports only under Keras 2)."""
    spec = importlib.util.find_spec("tensorflow_recommenders")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(spec.submodule_search_locations[0]) / "experimental" / "optimizers" / "clippy_adagrad_test.py"
    return path if path.exists() else None


TFRS_TEST_FILE = _tfrs_test_file()
TFRS_TEST_CLASS = "ClippyAdagradTest"


def _tfrs_test_names() -> list[str]:
    if TFRS_TEST_FILE is None:
        return []
    tree = ast.parse(TFRS_TEST_FILE.read_text())
    (test_class,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == TFRS_TEST_CLASS]
    return [node.name for node in test_class.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test")]


class _PointAtOurClass(ast.NodeTransformer):
    """TFRS's test source with its two edits.

    1. `clippy_adagrad.ClippyAdagrad` (the class under test) becomes ours.
    2. `optimizer._accumulators[i]`, TFRS's private list in build order, becomes `optimizer.accumulator(v)`, our
       public accessor, with v the i-th variable of the test's `apply_gradients` call (the build order).
    """

    def __init__(self) -> None:
        self.edits = {"class": 0, "accumulators": 0}
        self._variables: list[ast.expr] | None = None

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:
        if not node.name.startswith("test"):
            return self.generic_visit(node)
        calls = [call for call in ast.walk(node) if isinstance(call, ast.Call)
                 and isinstance(call.func, ast.Attribute) and call.func.attr == "apply_gradients"]
        self._variables = None
        if calls and isinstance(calls[0].args[0], ast.List):
            self._variables = [pair.elts[1] for pair in calls[0].args[0].elts]
        return self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        if node.attr == "ClippyAdagrad" and isinstance(node.value, ast.Name) and node.value.id == "clippy_adagrad":
            self.edits["class"] += 1
            return ast.copy_location(ast.Name(id="OurClippyAdagrad", ctx=ast.Load()), node)
        return self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> ast.AST:
        target = node.value
        if isinstance(target, ast.Attribute) and target.attr == "_accumulators":
            if self._variables is None or not isinstance(node.slice, ast.Constant):
                raise AssertionError(f"TFRS's test reads `_accumulators` in a form this harness does not map: "
                                     f"{ast.unparse(node)}")
            self.edits["accumulators"] += 1
            call = ast.Call(func=ast.Attribute(value=target.value, attr="accumulator", ctx=ast.Load()),
                            args=[self._variables[node.slice.value]], keywords=[])
            return ast.copy_location(call, node)
        return self.generic_visit(node)


@pytest.fixture(scope="module")
def tfrs_test_module() -> dict:
    """TFRS's test module, executed with the two edits (and nothing else) applied to its source."""
    tree = ast.parse(TFRS_TEST_FILE.read_text(), filename=str(TFRS_TEST_FILE))
    transformer = _PointAtOurClass()
    tree = ast.fix_missing_locations(transformer.visit(tree))
    # Both edits must have been needed: a TFRS release that renames either would otherwise test TFRS itself.
    assert transformer.edits["class"] > 0 and transformer.edits["accumulators"] > 0, transformer.edits
    namespace = {"__name__": "tfrs_clippy_adagrad_test", "OurClippyAdagrad": ClippyAdagrad}
    exec(compile(tree, str(TFRS_TEST_FILE), "exec"), namespace)  # pylint: disable=exec-used
    return namespace


@pytest.mark.keras2_only
@pytest.mark.skipif(TFRS_TEST_FILE is None, reason="TFRS is not installed")
@pytest.mark.parametrize("name", _tfrs_test_names() or ["<TFRS not installed>"])
def test_tfrs_own_clippy_adagrad_test_passes_against_ours(tfrs_test_module, name):
    result = unittest.TestResult()
    tfrs_test_module[TFRS_TEST_CLASS](name).run(result)
    assert result.testsRun == 1
    problems = [text for _, text in result.errors + result.failures]
    assert not problems and not result.skipped, "\n".join(problems) or result.skipped


@pytest.mark.keras2_only
@pytest.mark.skipif(TFRS_TEST_FILE is None, reason="TFRS is not installed")
def test_every_tfrs_case_is_collected(tfrs_test_module):
    # unittest also lists tf.test.TestCase's `test_session`, a reserved name TensorFlow skips: 7 names, 6 tests.
    listed = unittest.TestLoader().getTestCaseNames(tfrs_test_module[TFRS_TEST_CLASS])
    assert sorted(set(listed) - {"test_session"}) == sorted(_tfrs_test_names())
    assert len(_tfrs_test_names()) >= 6  # TFRS 0.7.x ships 6; fewer would mean cases this harness missed


# All defaults: the README's claim, with no argument overridden ----------------------------------------------


def _defaults_problem():
    """A kernel with a 0 weight (TFRS's lambda_abs 1e-7 then clips hard) and a table stepped with repeated ids."""
    kernel = tf.Variable([[0.5, 0.0, -2.0], [1.5, 0.2, -0.3]], name="kernel")
    table = tf.Variable(np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(6, 2), name="table")
    rng = np.random.default_rng(4)
    steps = [(tf.constant(rng.normal(size=(2, 3)).astype(np.float32)),
              tf.IndexedSlices(tf.constant(rng.normal(size=(4, 2)).astype(np.float32)),
                               tf.constant(rng.choice(6, size=4, replace=True)), tf.constant([6, 2])))
             for _ in range(10)]
    return [kernel, table], steps


@pytest.mark.keras2_only
@pytest.mark.parametrize("export_clipping_factors", [None, True])
def test_all_defaults_equal_tfrs_with_repeated_sparse_ids(export_clipping_factors):
    """`ClippyAdagrad()` and TFRS's `ClippyAdagrad()`, nothing overridden (None: not even the export flag)."""
    from tensorflow_recommenders.experimental.optimizers import ClippyAdagrad as TfrsClippyAdagrad

    arguments = {} if export_clipping_factors is None else {"export_clipping_factors": True}
    results = []
    for optimizer in (ClippyAdagrad(**arguments), TfrsClippyAdagrad(**arguments)):
        variables, steps = _defaults_problem()
        factors = []
        for grads in steps:
            optimizer.apply_gradients(zip(grads, variables))
            if arguments:
                factors.append([float(factor) for factor in optimizer.clipping_factors])
        results.append(([v.numpy() for v in variables], _accumulators(optimizer, variables), factors))
    (ours, our_accumulators, our_factors), (theirs, their_accumulators, their_factors) = results
    for mine, reference in zip([*ours, *our_accumulators], [*theirs, *their_accumulators], strict=True):
        np.testing.assert_allclose(mine, reference, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(our_factors, their_factors, rtol=1e-5, atol=1e-9)
    if arguments:
        assert min(min(step) for step in our_factors) < 1e-3  # the 0 weight clipped: the comparison is not vacuous


# epsilon: 0 is well defined with a positive initial accumulator, which G never falls below ---------------------

MODES = {
    "delayed": dict(),
    "delayed_clipped": dict(clip_accumulator_update=True),
    "standard": dict(use_standard_accumulator_update=True),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("gradient_kind", ["dense_fused", "dense_unfused", "sparse"])
def test_epsilon_zero_with_a_positive_initial_accumulator_steps_by_hand_numbers(mode, gradient_kind):
    """G0 = 0.25, g = [2, 0], lr = 0.1, no clipping: delayed 0.1 * 2 / sqrt(0.25) = 0.4, standard 0.2 / sqrt(4.25)."""
    optimizer = ClippyAdagrad(learning_rate=0.1, initial_accumulator_value=0.25, epsilon=0.0,
                              variable_relative_threshold=float("inf"),
                              fuse_dense_updates=gradient_kind != "dense_unfused",
                              **MODES[mode])
    variable = tf.Variable([[1.0, 1.0]])
    if gradient_kind == "sparse":
        gradient = tf.IndexedSlices(tf.constant([[2.0, 0.0]]), tf.constant([0]), tf.constant([1, 2]))
    else:
        gradient = tf.constant([[2.0, 0.0]])
    for _ in range(2):
        optimizer.apply_gradients([(gradient, variable)])
    accumulator = 0.25
    expected = 1.0
    for _ in range(2):
        if mode == "standard":
            accumulator += 4.0
        expected -= 0.1 * 2.0 / np.sqrt(accumulator)
        if mode != "standard":
            accumulator += 4.0
    np.testing.assert_allclose(variable.numpy(), [[expected, 1.0]], rtol=1e-6)  # the zero coordinate: 0, not NaN
    np.testing.assert_allclose(optimizer.accumulator(variable).numpy(), [[accumulator, 0.25]], rtol=1e-6)
    assert optimizer.get_config()["epsilon"] == 0.0


def test_a_negative_epsilon_smaller_than_the_initial_accumulator_is_accepted():
    optimizer = ClippyAdagrad(learning_rate=0.1, initial_accumulator_value=0.3, epsilon=-0.05,
                              variable_relative_threshold=float("inf"))
    variable = tf.Variable([1.0])
    optimizer.apply_gradients([(tf.constant([1.0]), variable)])
    np.testing.assert_allclose(variable.numpy(), [1.0 - 0.1 / np.sqrt(0.25)], rtol=1e-6)


@pytest.mark.parametrize(
    "initial_accumulator_value, epsilon",
    [(0.0, 0.0), (0, 0), (0.0, -1e-7), (0.1, -0.1), (1e-40, 0.0)],  # 1e-40: subnormal, which TF flushes to 0
)
def test_ill_defined_denominators_are_rejected_naming_both_arguments(initial_accumulator_value, epsilon):
    with pytest.raises(ValueError) as error:
        ClippyAdagrad(initial_accumulator_value=initial_accumulator_value, epsilon=epsilon)
    message = str(error.value)
    assert "`initial_accumulator_value` + `epsilon` must be positive" in message
    assert f"initial_accumulator_value={float(initial_accumulator_value)}" in message
    assert f"epsilon={float(epsilon)}" in message


# Argument types: what Keras 2 (TFRS's runtime) accepts, both runtimes accept, with the same numbers ------------

def _one_step(**arguments) -> np.ndarray:
    optimizer = ClippyAdagrad(**arguments)
    variable = tf.Variable([1.0, -2.0, 0.5])
    for _ in range(3):
        optimizer.apply_gradients([(tf.constant([0.3, -1.0, 2.0]), variable)])
    return variable.numpy()


@pytest.mark.parametrize(
    "make, reference",
    [(lambda: 1, 1.0), (lambda: np.float32(0.5), 0.5), (lambda: np.float64(0.5), 0.5), (lambda: np.int64(1), 1.0),
     (lambda: tf.constant(0.5), 0.5), (lambda: tf.Variable(0.5), 0.5)],
    ids=["int", "np.float32", "np.float64", "np.int64", "tensor", "variable"],
)
def test_numeric_learning_rates_of_any_type_equal_the_python_float(make, reference):
    learning_rate = make()
    np.testing.assert_array_equal(_one_step(learning_rate=learning_rate), _one_step(learning_rate=reference))
    config = ClippyAdagrad(learning_rate=learning_rate).get_config()
    assert config["learning_rate"] == pytest.approx(reference)


def test_int_and_numpy_hyperparameters_equal_python_floats_and_serialize():
    as_numpy = dict(initial_accumulator_value=np.float32(1), variable_relative_threshold=np.float64(0.05),
                    accumulator_relative_threshold=0, absolute_threshold=np.float32(1e-3), epsilon=0)
    as_float = {key: float(value) for key, value in as_numpy.items()}
    np.testing.assert_array_equal(_one_step(learning_rate=0.5, **as_numpy), _one_step(learning_rate=0.5, **as_float))
    config = ClippyAdagrad(**as_numpy).get_config()
    # TFRS's class keeps the np.float32 values it was given, which json cannot write.
    assert all(type(config[key]) is float for key in as_numpy)
    json.dumps({key: config[key] for key in as_numpy})


@pytest.mark.parametrize(
    "make, shown",
    [(lambda: np.float32("nan"), "nan"), (lambda: np.float64("inf"), "inf"), (lambda: np.int64(-1), "-1.0"),
     (lambda: tf.constant(-0.5), "-0.5")],
)
def test_bad_learning_rates_of_any_type_are_rejected(make, shown):
    with pytest.raises(ValueError) as error:
        ClippyAdagrad(learning_rate=make())
    assert f"`learning_rate` must be a finite non-negative number or a schedule, got {shown}." in str(error.value)


def test_a_schedule_learning_rate_is_followed_and_serialized():
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([1], [0.5, 0.25])
    optimizer = ClippyAdagrad(learning_rate=schedule, initial_accumulator_value=1.0, epsilon=0.0,
                              variable_relative_threshold=float("inf"))
    variable = tf.Variable([5.0])  # not 0: an infinite relative threshold still bounds a zero weight by 1e-7
    for _ in range(3):
        optimizer.apply_gradients([(tf.constant([1.0]), variable)])
    # Steps 0, 1, 2 use 0.5, 0.5 (boundary 1 is inclusive), 0.25 on G = 1, 2, 3 (delayed: before g^2 is added).
    expected = 5.0 - (0.5 / np.sqrt(1.0) + 0.5 / np.sqrt(2.0) + 0.25 / np.sqrt(3.0))
    np.testing.assert_allclose(variable.numpy(), [expected], rtol=1e-6)
    serialized = optimizer.get_config()["learning_rate"]
    assert serialized["class_name"] == "PiecewiseConstantDecay"
    assert ClippyAdagrad.from_config(optimizer.get_config()).get_config()["learning_rate"] == serialized


@pytest.mark.keras2_only
def test_argument_types_give_tfrs_numbers():
    from tensorflow_recommenders.experimental.optimizers import ClippyAdagrad as TfrsClippyAdagrad

    arguments = dict(learning_rate=np.float32(0.5), initial_accumulator_value=1, epsilon=0,
                     variable_relative_threshold=np.float64(0.05), absolute_threshold=np.float32(1e-3))
    ours = _one_step(**arguments)
    theirs = TfrsClippyAdagrad(**arguments)
    variable = tf.Variable([1.0, -2.0, 0.5])
    for _ in range(3):
        theirs.apply_gradients([(tf.constant([0.3, -1.0, 2.0]), variable)])
    np.testing.assert_allclose(ours, variable.numpy(), rtol=0, atol=1e-7)
    assert np.max(np.abs(ours - [1.0, -2.0, 0.5])) > 1e-3  # so the comparison is not vacuous


# clipping_factors before the first step -----------------------------------------------------------------------

def test_clipping_factors_before_the_first_step():
    """Ours: [] before build, then 1.0 ("not clipped"). TFRS's: [] before build, then 0.0 (its slot's zeros)."""
    optimizer = ClippyAdagrad(learning_rate=0.1, export_clipping_factors=True)
    variable = tf.Variable([1.0, 2.0])
    assert optimizer.clipping_factors == []
    optimizer.build([variable])
    assert [float(f) for f in optimizer.clipping_factors] == [1.0]
    assert {k: float(v) for k, v in optimizer.clipping_factors_by_name().items()} == {
        variable_name(variable): 1.0}


@pytest.mark.keras2_only
def test_tfrs_clipping_factors_before_the_first_step_are_zero():
    """Pins the documented difference: a monitor reading TFRS's factors before a step would see "fully clipped"."""
    from tensorflow_recommenders.experimental.optimizers import ClippyAdagrad as TfrsClippyAdagrad

    theirs = TfrsClippyAdagrad(learning_rate=0.1, export_clipping_factors=True)
    assert theirs.clipping_factors == []
    theirs.build([tf.Variable([1.0, 2.0])])
    assert [float(f) for f in theirs.clipping_factors] == [0.0]


# Checkpoints: TFRS's class and ours write the same Keras 2 layout, so each restores the other's ---------------

def _checkpoint_model():
    """A kernel, a scalar (where a shifted layout would misassign silently) and an embedding table."""
    return [tf.Variable([[0.5, -1.0, 2.0], [1.5, 0.2, -0.3]], name="kernel"), tf.Variable(0.7, name="scale"),
            tf.Variable(np.linspace(-1.0, 1.0, 10, dtype=np.float32).reshape(5, 2), name="table")]


def _checkpoint_gradients(step: int):
    scale = 1.0 + step
    return [tf.constant([[0.3, -2.0, 1.0], [0.5, 0.1, -4.0]]) * scale, tf.constant(0.9) * scale,
            tf.IndexedSlices(tf.constant([[1.0, -1.0], [3.0, 0.5]]) * scale, tf.constant([4 - step % 5, step % 2]),
                             tf.constant([5, 2]))]


def _train(optimizer, variables, steps: range) -> None:
    for step in steps:
        optimizer.apply_gradients(zip(_checkpoint_gradients(step), variables))


def _accumulators(optimizer, variables) -> list[np.ndarray]:
    if hasattr(optimizer, "accumulator"):
        return [optimizer.accumulator(v).numpy() for v in variables]
    return [a.numpy() for a in optimizer._accumulators]  # pylint: disable=protected-access  (TFRS's only access)


@pytest.mark.keras2_only
@pytest.mark.parametrize("export_clipping_factors", [False, True])
@pytest.mark.parametrize("direction", ["tfrs_to_ours", "ours_to_tfrs"])
def test_a_checkpoint_of_either_class_restores_into_the_other(tmp_path, direction, export_clipping_factors):
    from tensorflow_recommenders.experimental.optimizers import ClippyAdagrad as TfrsClippyAdagrad

    writer_class, reader_class = (
        (TfrsClippyAdagrad, ClippyAdagrad) if direction == "tfrs_to_ours" else (ClippyAdagrad, TfrsClippyAdagrad))
    arguments = dict(learning_rate=0.3, variable_relative_threshold=0.05, absolute_threshold=1e-3,
                     export_clipping_factors=export_clipping_factors)
    # The reference: TFRS's class, 6 steps in one go.
    reference, reference_optimizer = _checkpoint_model(), TfrsClippyAdagrad(**arguments)
    _train(reference_optimizer, reference, range(6))

    written, writer = _checkpoint_model(), writer_class(**arguments)
    _train(writer, written, range(3))
    path = tf.train.Checkpoint(optimizer=writer, model=written).save(str(tmp_path / "ckpt"))
    restored, reader = _checkpoint_model(), reader_class(**arguments)
    for variable in restored:
        variable.assign(tf.zeros_like(variable))
    # Restored before the slots exist, as a resumed training script does: they restore as they are created.
    status = tf.train.Checkpoint(optimizer=reader, model=restored).restore(path)
    reader.build(restored)
    status.assert_existing_objects_matched()
    assert int(reader.iterations) == 3
    np.testing.assert_array_equal(_accumulators(reader, restored)[1], _accumulators(writer, written)[1])
    if export_clipping_factors:
        assert [float(f) for f in reader.clipping_factors] == [float(f) for f in writer.clipping_factors]
        assert min(float(f) for f in writer.clipping_factors) < 1.0  # a clipped step: the factors are not defaults
    _train(reader, restored, range(3, 6))
    for ours, theirs in zip(restored, reference, strict=True):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=0, atol=1e-6)
    ours_and_theirs = zip(_accumulators(reader, restored), _accumulators(reference_optimizer, reference), strict=True)
    for ours, theirs in ours_and_theirs:
        np.testing.assert_allclose(ours, theirs, rtol=1e-6)


@pytest.mark.keras2_only
def test_float64_clipping_factors_have_tfrs_dtype():
    """TFRS's factor has its variable's dtype; ours too for float64, so such checkpoints restore either way."""
    optimizer = ClippyAdagrad(learning_rate=0.1, export_clipping_factors=True)
    wide, narrow = tf.Variable([1.0], dtype=tf.float64, name="wide"), tf.Variable([1.0], name="narrow")
    optimizer.apply_gradients([(tf.constant([10.0], tf.float64), wide), (tf.constant([10.0]), narrow)])
    assert [f.dtype for f in optimizer.clipping_factors] == [tf.float64, tf.float32]
    factors = optimizer.clipping_factors_by_name()  # float32 for both, so that they stack
    assert [f.dtype for f in factors.values()] == [tf.float32, tf.float32]
    # sigma = bound / |update| = (0.1 * |w| + 1e-7) / (lr * g / sqrt(G + epsilon)), with TFRS's defaults
    learning_rate = float(np.float32(0.1))  # Keras keeps the learning rate in a float32 variable
    expected = (0.1 * 1.0 + 1e-7) / (learning_rate * 10.0 / np.sqrt(0.1 + 1e-7))
    np.testing.assert_allclose([float(f) for f in factors.values()], [expected] * 2, rtol=1e-6)
    assert float(optimizer.clipping_factors[0]) == pytest.approx(expected, rel=1e-12)  # computed in float64


# Eager use: no retracing warning --------------------------------------------------------------------------------

class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def tensorflow_log():
    logger, handler = logging.getLogger("tensorflow"), _Records()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def test_eager_steps_on_differently_shaped_variables_log_no_retracing_warning(tensorflow_log):
    # Shapes no other test uses, so each one traces here: 8 shapes, which warned from the 5th on.
    variables = [tf.Variable(tf.fill([k, 17, 3], 2.0)) for k in range(1, 9)]
    tracing_count = core._fused_next_dense_values.experimental_get_tracing_count()  # pylint: disable=protected-access
    optimizer = ClippyAdagrad(learning_rate=0.1, variable_relative_threshold=float("inf"))
    for _ in range(3):
        optimizer.apply_gradients([(tf.ones_like(v), v) for v in variables])
    assert not [m for m in tensorflow_log if "retracing" in m], tensorflow_log
    # Traced once per shape, as before; a second optimizer with the same rule reuses the traces.
    assert core._fused_next_dense_values.experimental_get_tracing_count() - tracing_count == 8
    ClippyAdagrad(learning_rate=0.1, variable_relative_threshold=float("inf")).apply_gradients(
        [(tf.ones_like(v), v) for v in variables])
    assert core._fused_next_dense_values.experimental_get_tracing_count() - tracing_count == 8
    # Delayed order: the first optimizer's G is 0.1, 1.1, 2.1 at its 3 steps, the second's 0.1 at its one.
    expected = 2.0 - 0.1 * sum(1 / np.sqrt(g) for g in (0.1, 1.1, 2.1, 0.1))
    for variable in variables:
        np.testing.assert_allclose(variable.numpy(), np.full(variable.shape, expected), rtol=1e-6)


def test_inside_a_tf_function_the_step_is_still_one_xla_call_per_variable():
    """The graph a tf.function traces is unchanged: each dense step calls the jit-compiled function."""
    variables = [tf.Variable(tf.ones([k, 2])) for k in (1, 2, 3)]
    optimizer = ClippyAdagrad(learning_rate=0.1)
    optimizer.build(variables)
    step = tf.function(lambda: optimizer.apply_gradients([(tf.ones_like(v), v) for v in variables]))
    graph = step.get_concrete_function().graph.as_graph_def()
    compiled = [f for f in graph.library.function
                if f.signature.name.startswith("__inference_next_dense_values") and f.attr["_XlaMustCompile"].b]
    assert len(compiled) == 3
