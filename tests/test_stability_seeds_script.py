"""scripts/stability_seeds.py end to end on a tiny budget: it runs, prints one row per seed and the summary."""

import os
import re
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "stability_seeds.py")


@pytest.mark.slow
def test_seeds_script_counts_runs_with_and_without_rollback():
    outputs = []
    for extra in ([], ["--rollback", "--lr-factor", "0.5"]):
        completed = subprocess.run(
            [sys.executable, SCRIPT, "--seeds", "2", "--steps", "60", "--learning-rate", "0.5", *extra],
            capture_output=True, text=True, timeout=180, env=dict(os.environ),
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        outputs.append(completed.stdout)
    for output in outputs:
        rows = [line for line in output.splitlines() if re.match(r"^\s+[01]\s+\d+\s+\d+\s+\d+", line)]
        assert len(rows) == 2
        assert re.search(r"diverged: [0-2]/2 seeds", output)
    assert "rollback=off" in outputs[0] and "rollback=on" in outputs[1]


def test_seeds_script_rejects_a_bad_seed_count():
    completed = subprocess.run(
        [sys.executable, SCRIPT, "--seeds", "0"], capture_output=True, text=True, timeout=120, env=dict(os.environ)
    )
    assert completed.returncode != 0 and "--seeds must be >= 1" in completed.stderr
