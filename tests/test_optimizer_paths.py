"""The same step on every execution path, and variable matching on the names real Keras models give.

A sparse step with repeated ids runs in graph mode, under XLA (`jit_compile=True`, where `deduplicate` pads) and
densified; each must give the NumPy oracle's weights and the same exported clipping factor, for every scaling rule
on both bases. `exclude_from_clipping` and `build_optimizer`'s embedding pattern are matched against the names a
real Keras model of this runtime gives its variables (Keras 3: paths such as "item_embedding/embeddings").
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfrs_clippy import keras
from tfrs_clippy.optimizers import DEFAULT_SETTINGS, METHODS, build_optimizer

import numpy_oracle

SHAPE = (6, 3)
# Arguments at which each rule scales these steps (sigma < 1 somewhere), learning rate included.
RULES = {
    "gc": dict(threshold=0.5),
    "agc": dict(threshold=0.05),
    "lamb": dict(trust_scale=0.05),
    "clippy": dict(variable_relative_threshold=0.1, absolute_threshold=1e-3),
}
LEARNING_RATE = {"adagrad": 0.3, "adam": 0.05}


def _steps(seed: int = 3, steps: int = 8) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(5,) + SHAPE[1:]).astype(np.float32), rng.choice(SHAPE[0], size=5, replace=True))
            for _ in range(steps)]


def _densify(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    dense = np.zeros(SHAPE, np.float64)
    np.add.at(dense, indices, values)
    return dense


def _method(rule: str, base: str) -> str:
    return rule if base == "adagrad" else f"{rule}_adam"


def _train(method: str, path: str, weights: np.ndarray, steps) -> tuple[np.ndarray, list[float]]:
    """Trains a table named like an embedding (row-wise AGC/LAMB) along `path`; weights and per-step factors."""
    base = "adam" if method.endswith("_adam") else "adagrad"
    options = dict(sparse_updates="dense") if base == "adam" else {}
    optimizer = build_optimizer(method, LEARNING_RATE[base], include_embeddings=True, export_clipping_factors=True,
                                **RULES[method.removesuffix("_adam")], **options)
    variable = tf.Variable(weights, name="item_embedding")
    apply = tf.function(optimizer.apply_gradients, jit_compile=path == "xla")
    factors = []
    for values, indices in steps:
        grad = tf.IndexedSlices(tf.constant(values), tf.constant(indices), tf.constant(SHAPE, tf.int64))
        apply([(tf.convert_to_tensor(grad) if path == "dense" else grad, variable)])
        factors.append(float(optimizer.clipping_factors[0]))
    return variable.numpy(), factors


def _oracle_sigma(rule: str):
    """The rule in NumPy on (g, w, direction), per row for AGC and LAMB (the table is an embedding)."""
    arguments = RULES[rule]
    return {
        "gc": lambda g, w, d: numpy_oracle.gc_sigma(g, w, d, arguments["threshold"]),
        "agc": lambda g, w, d: numpy_oracle.agc_sigma(g, w, d, arguments["threshold"], axis=0),
        "lamb": lambda g, w, d: numpy_oracle.lamb_sigma(g, w, d, arguments["trust_scale"], axis=0),
    }[rule]


@pytest.mark.parametrize("base", ["adagrad", "adam"])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_sparse_repeated_ids_give_the_same_step_on_every_path(rule, base):
    weights = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    steps = _steps()
    results = {path: _train(_method(rule, base), path, weights, steps) for path in ("graph", "xla", "dense")}
    for path in ("xla", "dense"):
        np.testing.assert_allclose(results[path][0], results["graph"][0], rtol=1e-5, atol=1e-6, err_msg=path)
        np.testing.assert_allclose(results[path][1], results["graph"][1], rtol=1e-5, err_msg=path)
    factors = results["graph"][1]
    assert min(factors) < 0.99 or (rule == "lamb" and max(factors) != 1.0)  # the rule acted
    if rule != "clippy":  # Clippy has its own oracles (tests/test_clippy_adagrad.py, tests/test_clippy_adam.py)
        grads = [_densify(values, indices) for values, indices in steps]
        oracle = numpy_oracle.scaled_adagrad_numpy if base == "adagrad" else numpy_oracle.scaled_adam_numpy
        expected = oracle(weights, grads, LEARNING_RATE[base], _oracle_sigma(rule))
        atol = 1e-6 if base == "adagrad" else 5e-6  # float32 Adam over 8 steps, see test_baselines.py
        np.testing.assert_allclose(results["graph"][0], expected, rtol=1e-5, atol=atol)


def _two_tower_model() -> keras.Model:
    ids = keras.Input((1,), dtype="int32")
    embedded = keras.layers.Flatten()(keras.layers.Embedding(10, 4, name="item_embedding")(ids))
    hidden = keras.layers.Dense(3, name="hidden")(embedded)
    model = keras.Model(ids, keras.layers.Dense(1, name="score")(hidden))
    model.build((None, 1))
    return model


@pytest.mark.parametrize("method", ["gc", "clippy", "gc_adam", "clippy_adam"])
def test_embedding_pattern_and_exclusions_match_real_keras_variable_names(method):
    """By the names (Keras 3: paths) this runtime's layers give: the table unscaled, "hidden" excluded by path."""
    model = _two_tower_model()
    optimizer = build_optimizer(method, 0.1, exclude_from_clipping=["^hidden/"])
    by_layer = {}
    for layer in model.layers:
        for variable in layer.trainable_variables:  # Keras 3 names both kernels "kernel": go by layer
            by_layer.setdefault(layer.name, set()).add(optimizer.scaling_for(variable, sparse=False).rule is not None)
    assert by_layer == {"item_embedding": {False}, "hidden": {False}, "score": {True}}
    # And the names the optimizer matches are the ones it reports.
    optimizer.build(model.trainable_variables)
    assert set(optimizer.nonfinite_steps_by_name()) == {
        str(getattr(v, "path", None) or v.name) for v in model.trainable_variables}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_class_defaults_to_the_middle_of_its_grid(method):
    """`DEFAULT_SETTINGS` (what train.py and reproduce.py use) and the classes' own defaults are one fact."""
    cls = METHODS[method]
    # ClippyAdagrad() keeps TFRS's defaults; the paper's setting is `from_paper`'s.
    config = (cls.from_paper() if method == "clippy" else cls()).get_config()
    for name, value in DEFAULT_SETTINGS[method].items():
        assert config[name] == pytest.approx(value), name
