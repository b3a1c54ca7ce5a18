"""scripts/keras_rs_ranker.py (a keras-rs `FeatureCross` ranker trained with ClippyAdagrad) computes the same numbers
on every Keras 3 backend."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytestmark = [pytest.mark.keras3_only, pytest.mark.slow]
pytest.importorskip("keras_rs", reason="keras-rs and JAX live in .venv-backends: `make test-backends` runs this file")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "keras_rs_ranker.py"
ARGS = ["--dataset", "synthetic", "--train-examples", "2048", "--epochs", "2", "--batch-size", "128"]


def _backend_env(backend: str) -> dict:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_USE_LEGACY_KERAS", None)
    return env


def _run(backend: str, out: pathlib.Path) -> dict:
    process = subprocess.run([sys.executable, str(SCRIPT), *ARGS, "--out", str(out)], env=_backend_env(backend),
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def tensorflow_run(tmp_path_factory) -> dict:
    return _run("tensorflow", tmp_path_factory.mktemp("keras_rs") / "tensorflow.json")


def test_the_tensorflow_run_clips_and_learns(tensorflow_run):
    assert tensorflow_run["backend"] == "tensorflow"
    assert min(tensorflow_run["clipping_factors"].values()) < 1.0  # Clippy is active, not a no-op here
    assert tensorflow_run["nonfinite_steps"] == 0
    first, last = tensorflow_run["history"]
    assert last["train_loss"] < first["train_loss"]
    assert all(metric["auc"] > 0.55 for metric in last["test"].values() if "auc" in metric)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_every_backend_computes_the_tensorflow_numbers(backend, tensorflow_run, tmp_path):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed (jax: pip install -e '.[jax]'; torch: see README 'Backends')")
    run = _run(backend, tmp_path / f"{backend}.json")
    assert run["backend"] == backend
    for ours, reference in zip(run["history"], tensorflow_run["history"], strict=True):
        np.testing.assert_allclose(ours["train_loss"], reference["train_loss"], rtol=1e-5)
        for task, metrics in reference["test"].items():
            for name, value in metrics.items():
                np.testing.assert_allclose(ours["test"][task][name], value, rtol=1e-4, err_msg=f"{task} {name}")
    names = sorted(tensorflow_run["weight_sums"])
    assert sorted(run["weight_sums"]) == names
    np.testing.assert_allclose([run["weight_sums"][n] for n in names],
                               [tensorflow_run["weight_sums"][n] for n in names], rtol=1e-4)
    for name in names:
        np.testing.assert_allclose(run["weight_probes"][name], tensorflow_run["weight_probes"][name], rtol=1e-4,
                                   atol=1e-6, err_msg=name)
    np.testing.assert_allclose([run["clipping_factors"][n] for n in names],
                               [tensorflow_run["clipping_factors"][n] for n in names], rtol=1e-4)

