"""ClippyAdagrad on a table sharded across parameter servers (TFRS's class crashes with export_clipping_factors).

Keras 3 has no ParameterServerStrategy support, so this runs in the Keras 2 run only. The cluster lives in a
subprocess: in-process servers cannot be shut down and would outlive the test.
"""

import pathlib

import numpy as np
import pytest

from script_runner import run_json_script

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "ps_sharded_clippy.py"


@pytest.fixture(scope="module")
def results() -> dict:
    return run_json_script(SCRIPT, timeout=300)


@pytest.mark.keras2_only
@pytest.mark.slow
def test_per_row_clipping_of_a_sharded_table_equals_one_device(results):
    cluster, whole = results["cluster_0"], results["whole_0"]
    assert cluster["shard_rows"] == [5, 5]
    np.testing.assert_allclose(cluster["table"], whole["table"], rtol=0, atol=1e-7)
    # One exported factor per shard, the smallest row factor of that shard; their minimum is the table's.
    assert len(cluster["factors"]) == 2 and all(0.0 < f <= 1.0 for f in cluster["factors"])
    assert min(cluster["factors"]) == pytest.approx(whole["factors"][0], abs=1e-7)


@pytest.mark.keras2_only
@pytest.mark.slow
def test_per_tensor_clipping_of_a_sharded_table_is_per_shard(results):
    """Pinned: with one scale per tensor, each shard is clipped as its own tensor (documented in the README)."""
    cluster, per_shard, whole = results["cluster_None"], results["per_shard_None"], results["whole_None"]
    np.testing.assert_allclose(cluster["table"], per_shard["table"], rtol=0, atol=1e-7)
    np.testing.assert_allclose(cluster["factors"], per_shard["factors"], rtol=0, atol=1e-7)
    assert min(cluster["factors"]) == pytest.approx(whole["factors"][0], abs=1e-7)
    assert np.max(np.abs(np.array(cluster["table"]) - whole["table"])) > 1e-3  # so the pin is not vacuous
