"""The runtime is chosen once, from TF_USE_LEGACY_KERAS, and broken installs get an error that says what to do."""

import os
import subprocess
import sys

import pytest

import tfrs_clippy


def run_python(code: str, legacy: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_USE_LEGACY_KERAS", None)
    if legacy:
        env["TF_USE_LEGACY_KERAS"] = "1"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_class_matches_this_process_runtime():
    assert tfrs_clippy.LEGACY_KERAS == (os.environ.get("TF_USE_LEGACY_KERAS") in ("1", "true", "True"))
    assert tfrs_clippy.keras.__version__.startswith("2." if tfrs_clippy.LEGACY_KERAS else "3.")
    assert issubclass(tfrs_clippy.ClippyAdagrad, tfrs_clippy.keras.optimizers.Optimizer)


def test_missing_tf_keras_names_the_package_to_install():
    result = run_python("import sys; sys.modules['tf_keras'] = None; import tfrs_clippy", legacy=True)
    assert result.returncode != 0
    assert "KerasRuntimeError" in result.stderr
    assert "pip install 'tf-keras==2.21.*'" in result.stderr


def test_legacy_optimizer_base_is_refused_with_the_fix():
    # TFRS issue #751: a mixed install where the optimizer base is the legacy one (it needs _resource_apply_dense).
    code = (
        "import tf_keras; tf_keras.optimizers.Optimizer = tf_keras.optimizers.legacy.Optimizer\n"
        "import tfrs_clippy"
    )
    result = run_python(code, legacy=True)
    assert result.returncode != 0
    assert "legacy optimizer base" in result.stderr and "#751" in result.stderr


@pytest.mark.parametrize("legacy", [True, False])
def test_each_runtime_imports_in_a_fresh_process(legacy):
    code = ("import tfrs_clippy as t; from tfrs_clippy.optimizers.adapter import RuntimeOptimizer as R; "
            "print(t.LEGACY_KERAS, R.__module__, all(issubclass(c, R) for c in (t.ClippyAdagrad, t.ClippyAdam)))")
    result = run_python(code, legacy)
    assert result.returncode == 0, result.stderr[-2000:]
    expected_adapter = "keras2_adapter" if legacy else "keras3_adapter"
    assert result.stdout.split() == [str(legacy), f"tfrs_clippy.optimizers.{expected_adapter}", "True"]
