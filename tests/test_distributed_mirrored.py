"""ClippyAdagrad, ClippyAdam and the baselines under MirroredStrategy (2 logical CPUs) equal one device at the same
global batch.

Both runtimes. The strategy runs in a fresh process (`scripts/dist_mirrored.py`): logical devices must be
configured before TensorFlow runs an op, which pytest's process has already done. One process runs every case.
"""

import pathlib

import pytest

from script_runner import run_json_script

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "dist_mirrored.py"
# `scripts/dist_common.CASES`, which the script runs; listed here so that each case is a test of its own.
CASES = ("clippy_sparse", "clippy_dense", "gc_sparse", "agc_sparse", "lamb_sparse", "naive_sparse",
         "clippy_adam_sparse", "clippy_adam_dense")


@pytest.fixture(scope="module")
def results() -> dict:
    return run_json_script(SCRIPT, timeout=240)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_two_replicas_equal_one_device_after_20_steps(results, case):
    result = results["cases"][case]
    assert result["replicas"] == 2
    assert result["weights_vs_one_device"] <= 1e-5
    assert result["slots_vs_one_device"] <= 1e-5  # relative
    assert result["clipping_factors_vs_one_device"] <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_every_replica_holds_identical_weights_slots_and_factors(results, case):
    result = results["cases"][case]
    for key in ("weights", "slots", "clipping_factors"):
        assert result[f"{key}_across_replicas"] == 0.0, key


@pytest.mark.slow
@pytest.mark.parametrize("case", [case for case in CASES if not case.startswith("naive")])
def test_the_updates_were_actually_scaled(results, case):
    """Otherwise the equality above would say nothing about the scaling rules."""
    assert results["cases"][case]["min_clipping_factor"] < 0.5


@pytest.mark.slow
@pytest.mark.parametrize("gradient", ["sparse", "dense"])
def test_clippy_adds_no_communication_beyond_the_gradient_all_reduce(results, gradient):
    counts = results["collective_ops"]
    adagrad, clippy = counts[f"adagrad_{gradient}"], counts[f"clippy_{gradient}"]
    assert adagrad, "the traced step has no collective op: the count would prove nothing"
    assert clippy == adagrad
