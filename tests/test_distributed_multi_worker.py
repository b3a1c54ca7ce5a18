"""MultiWorkerMirroredStrategy: 2 worker processes on 127.0.0.1 train in sync and end where one process ends.

Both runtimes. The test launches the workers (`scripts/dist_multi_worker.py`) with TF_CONFIG on free loopback
ports, bounds them in time, and compares their final weights with one process at the same global batch (16).
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from script_runner import free_ports

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "dist_multi_worker.py"
WORKERS = 2
TIMEOUT_SECONDS = 150


@pytest.fixture(scope="module")
def workers() -> list[dict]:
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(WORKERS)]}
    processes = []
    for index in range(WORKERS):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        env = dict(os.environ, TF_CONFIG=tf_config, TF_CPP_MIN_LOG_LEVEL="3")
        processes.append(
            subprocess.Popen(
                [sys.executable, str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outputs = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=TIMEOUT_SECONDS)
            assert process.returncode == 0, stderr[-3000:]
            outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return sorted(outputs, key=lambda output: output["task"])


def _arrays(values: dict, key: str) -> list[np.ndarray]:
    return [np.asarray(v) for v in values[key]]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["clippy_sparse", "clippy_dense"])
def test_workers_end_with_the_weights_of_one_process(workers, case):
    assert [w["replicas"] for w in workers] == [WORKERS] * WORKERS
    one_device = workers[0]["cases"][case]["one_device"]
    for worker in workers:
        distributed = worker["cases"][case]["distributed"]
        for ours, theirs in zip(_arrays(distributed, "weights"), _arrays(one_device, "weights"), strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
        for ours, theirs in zip(_arrays(distributed, "slots"), _arrays(one_device, "slots"), strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            _arrays(distributed, "clipping_factors"), _arrays(one_device, "clipping_factors"), atol=1e-5
        )
    assert min(np.min(f) for f in _arrays(one_device, "clipping_factors")) < 0.5  # clipping was exercised


@pytest.mark.slow
@pytest.mark.parametrize("case", ["clippy_sparse", "clippy_dense"])
def test_workers_hold_identical_state(workers, case):
    first, second = (w["cases"][case]["distributed"] for w in workers)
    assert first == second


@pytest.mark.slow
def test_clippy_adds_no_collective_beyond_adagrads(workers):
    counts = workers[0]["collective_ops"]
    assert counts["adagrad_sparse"] and counts["clippy_sparse"] == counts["adagrad_sparse"]
