"""The optimizers on whichever Keras 3 backend this process runs (`KERAS_BACKEND`): TensorFlow, JAX or PyTorch.

Written with `keras` and NumPy only, so that the same file checks the TensorFlow path (Keras 3's TensorFlow pass of
`make test`) and the backend-neutral `keras.ops` path (`make test-backends`: JAX, and PyTorch where it is
installed) against the NumPy oracle of tests/numpy_oracle.py, independent of the library.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from tfrs_clippy.keras_runtime import BACKEND, LEGACY_KERAS

if LEGACY_KERAS:
    pytest.skip("Keras 3's backends: this file runs in the Keras 3 passes (TensorFlow, JAX, PyTorch)",
                allow_module_level=True)

import keras  # noqa: E402

import tfrs_clippy  # noqa: E402

from numpy_oracle import (  # noqa: E402
    ClippyOracle,
    agc_sigma,
    gc_sigma,
    lamb_sigma,
    scaled_adagrad_numpy,
    scaled_adam_numpy,
)

RNG = np.random.default_rng(17)
WEIGHTS = RNG.normal(size=(6, 4)).astype(np.float32)
GRADS = [RNG.normal(scale=s, size=(6, 4)).astype(np.float32) for s in (1.0, 3.0, 0.5, 10.0, 1.0)]


def run_steps(optimizer, grads=GRADS, weights=WEIGHTS, name="w"):
    """Applies `grads` one step each to a fresh variable; returns the variable and the optimizer."""
    variable = keras.Variable(weights, name=name)
    for grad in grads:
        optimizer.apply_gradients([(keras.ops.convert_to_tensor(grad), variable)])
    return variable


def test_backend_is_the_requested_one():
    """The pass runs where `make` sent it (KERAS_BACKEND unset means TensorFlow), and the library agrees."""
    requested = os.environ.get("KERAS_BACKEND", "tensorflow")
    assert keras.backend.backend() == requested and BACKEND == requested


@pytest.mark.parametrize("mode", ["standard", "delayed", "delayed_clipped"])
@pytest.mark.parametrize("axis", [None, 0])
def test_clippy_adagrad_matches_the_numpy_oracle(mode, axis):
    optimizer = tfrs_clippy.ClippyAdagrad(learning_rate=0.5, variable_relative_threshold=0.1,
                                          absolute_threshold=1e-2, clipping_axis=axis, export_clipping_factors=True,
                                          use_standard_accumulator_update=mode == "standard",
                                          clip_accumulator_update=mode == "delayed_clipped")
    oracle = ClippyOracle(WEIGHTS, 0.5, mode=mode, variable_relative_threshold=0.1, absolute_threshold=1e-2,
                          axis=axis)
    variable = keras.Variable(WEIGHTS, name="w")
    for grad in GRADS:
        optimizer.apply_gradients([(keras.ops.convert_to_tensor(grad), variable)])
        sigma = oracle.step(grad)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(variable), oracle.weights, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(optimizer.accumulator(variable)), oracle.accumulator,
                                   rtol=1e-5)
        factor = float(keras.ops.convert_to_numpy(optimizer.clipping_factors[0]))
        np.testing.assert_allclose(factor, sigma.min(), rtol=1e-5)
    assert sigma.min() < 1.0  # the test clips


@pytest.mark.parametrize("method, sigma_fn", [
    ("naive", lambda g, w, r: 1.0),
    ("gc", lambda g, w, r: gc_sigma(g, w, r, 1.0)),
    ("agc", lambda g, w, r: agc_sigma(g, w, r, 0.1, axis=-1)),
    ("lamb", lambda g, w, r: lamb_sigma(g, w, r, 0.3)),
])
def test_adagrad_baselines_match_the_numpy_oracle(method, sigma_fn):
    settings = {"naive": {}, "gc": {"threshold": 1.0}, "agc": {"threshold": 0.1}, "lamb": {"trust_scale": 0.3}}
    optimizer = tfrs_clippy.build_optimizer(method, 0.3, **settings[method])
    variable = run_steps(optimizer)
    expected = scaled_adagrad_numpy(WEIGHTS, GRADS, 0.3, sigma_fn)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(variable), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["adam", "clippy_adam"])
def test_adam_family_matches_the_numpy_oracle(method):
    learning_rate = 0.05

    def clippy_sigma(g, w, d):
        update = learning_rate * d
        bound = 1e-2 + 0.5 * np.abs(w)
        return min(1.0, float(np.min(np.where(update == 0, 1.0, bound / np.abs(update)))))

    optimizer = tfrs_clippy.build_optimizer(method, learning_rate)
    variable = run_steps(optimizer)
    expected = scaled_adam_numpy(WEIGHTS, GRADS, learning_rate,
                                 clippy_sigma if method == "clippy_adam" else (lambda g, w, d: 1.0))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(variable), expected, rtol=2e-5, atol=5e-6)


@pytest.mark.parametrize("method", ["clippy", "clippy_adam"])
def test_a_non_finite_gradient_is_skipped_and_counted(method):
    optimizer = tfrs_clippy.build_optimizer(method, 0.1, export_clipping_factors=True)
    bad = GRADS[0].copy()
    bad[2, 1] = np.nan
    variable = run_steps(optimizer, grads=[GRADS[0]])
    before = [keras.ops.convert_to_numpy(v).copy() for v in [variable, *optimizer.variables]]
    optimizer.apply_gradients([(keras.ops.convert_to_tensor(bad), variable)])
    after = [keras.ops.convert_to_numpy(v) for v in [variable, *optimizer.variables]]
    names = ["variable", *(v.path for v in optimizer.variables)]
    for name, old, new in zip(names, before, after, strict=True):
        if "iteration" in name or "nonfinite" in name or "clipping_factor" in name:
            continue
        np.testing.assert_array_equal(new, old, err_msg=name)
    assert int(keras.ops.convert_to_numpy(optimizer.nonfinite_steps)) == 1
    assert float(keras.ops.convert_to_numpy(optimizer.clipping_factors[0])) == 0.0


def test_exclude_from_clipping_matches_the_variable_path():
    layer = keras.layers.Dense(4, name="item_embedding_proj", use_bias=False)
    layer.build((None, 6))
    layer.kernel.assign(WEIGHTS)
    assert layer.kernel.path == "item_embedding_proj/kernel"
    optimizer = tfrs_clippy.ClippyAdagrad.from_paper(learning_rate=0.5, exclude_from_clipping=["embedding"])
    for grad in GRADS:
        optimizer.apply_gradients([(keras.ops.convert_to_tensor(grad), layer.kernel)])
    plain = scaled_adagrad_numpy(WEIGHTS, GRADS, 0.5, lambda g, w, r: 1.0)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.kernel), plain, rtol=1e-5, atol=1e-6)
    # The control: the same variable path with a pattern that does not match it is clipped.
    control = keras.layers.Dense(4, name="item_embedding_proj", use_bias=False)
    control.build((None, 6))
    control.kernel.assign(WEIGHTS)
    clipped = tfrs_clippy.ClippyAdagrad.from_paper(learning_rate=0.5, exclude_from_clipping=["^embedding"])
    for grad in GRADS:
        clipped.apply_gradients([(keras.ops.convert_to_tensor(grad), control.kernel)])
    assert not np.allclose(keras.ops.convert_to_numpy(control.kernel), plain)


def _linear_model() -> keras.Model:
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(4, activation="relu", kernel_initializer=keras.initializers.Constant(0.3),
                                name="hidden")(inputs)
    outputs = keras.layers.Dense(1, kernel_initializer="ones", name="head")(hidden)
    return keras.Model(inputs, outputs)


def _data():
    x = RNG.normal(size=(64, 6)).astype(np.float32)
    return x, (x @ np.arange(1, 7, dtype=np.float32)[:, None]) + 3.0


def _weights(model):
    return [keras.ops.convert_to_numpy(w) for w in model.weights]


def test_fit_compiled_equals_eager_and_a_saved_model_trains_on_identically(tmp_path):
    x, y = _data()
    runs = {}
    for jit in (True, False):
        model = _linear_model()
        model.compile(optimizer=tfrs_clippy.ClippyAdagrad.from_paper(learning_rate=0.8,
                                                                     export_clipping_factors=True),
                      loss="mse", jit_compile=jit)
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        runs[jit] = model
    for compiled, eager in zip(_weights(runs[True]), _weights(runs[False]), strict=True):
        np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-6)
    factors = [float(keras.ops.convert_to_numpy(f)) for f in runs[True].optimizer.clipping_factors]
    assert min(factors) < 1.0  # the run clips

    path = tmp_path / "model.keras"
    runs[True].save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored.optimizer, tfrs_clippy.ClippyAdagrad)
    assert restored.optimizer.get_config() == runs[True].optimizer.get_config()
    for model in (runs[True], restored):
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for original, loaded in zip(_weights(runs[True]), _weights(restored), strict=True):
        np.testing.assert_allclose(loaded, original, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["clippy", "clippy_adam"])
def test_a_compiled_fit_on_a_non_finite_batch_changes_no_weight_and_counts_every_variable(method):
    x, y = _data()
    y = y.copy()
    y[:16] = np.nan  # the first batch's loss, and so every gradient, is NaN
    model = _linear_model()
    model.compile(optimizer=tfrs_clippy.build_optimizer(method, 0.5, export_clipping_factors=True), loss="mse",
                  jit_compile=True)
    model.fit(x[:16], y[:16], batch_size=16, epochs=1, shuffle=False, verbose=0)  # builds; one skipped step
    before = _weights(model)
    model.fit(x[:16], y[:16], batch_size=16, epochs=1, shuffle=False, verbose=0)
    for old, new in zip(before, _weights(model), strict=True):
        np.testing.assert_array_equal(new, old)
    assert int(keras.ops.convert_to_numpy(model.optimizer.nonfinite_steps)) == 2 * len(model.trainable_weights)
    assert all(float(keras.ops.convert_to_numpy(f)) == 0.0 for f in model.optimizer.clipping_factors)
    model.fit(x[16:], y[16:], batch_size=16, epochs=1, shuffle=False, verbose=0)  # finite batches train again
    assert not np.allclose(_weights(model)[0], before[0])


def test_a_backend_that_cannot_train_is_refused_at_creation():
    if importlib.util.find_spec("jax") is None:
        pytest.skip("Keras's numpy backend imports jax, which lives in .venv-backends (make test-backends runs this)")
    code = ("import tfrs_clippy\n"
            "try:\n    tfrs_clippy.ClippyAdagrad(learning_rate=0.1)\n"
            "except tfrs_clippy.keras_runtime.UnsupportedBackendError as error:\n    print(error)\n")
    env = dict(os.environ, KERAS_BACKEND="numpy", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_USE_LEGACY_KERAS", None)
    process = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    message = process.stdout
    assert "'numpy'" in message and "KERAS_BACKEND" in message and "jax" in message, message
