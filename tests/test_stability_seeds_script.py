"""scripts/stability_seeds.py end to end on a tiny budget: it runs, prints one row per seed and the summary."""

import os
import re
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "stability_seeds.py")


COLUMNS = ("seed", "micro", "full", "rescued", "rollbacks")


def _run(*extra: str) -> dict:
    """Runs the script on 2 seeds x 60 steps of Adagrad at lr 0.5; returns {"rows": {seed: {column: int}}, ...}."""
    completed = subprocess.run(
        [sys.executable, SCRIPT, "--seeds", "2", "--steps", "60", "--learning-rate", "0.5", *extra],
        capture_output=True, text=True, timeout=180, env=dict(os.environ),
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = {}
    for line in completed.stdout.splitlines():
        if re.match(r"^\s+\d+\s+\d+\s+\d+\s+\d+\s+\d+\s", line):
            values = dict(zip(COLUMNS, map(int, line.split()[: len(COLUMNS)])))
            rows[values["seed"]] = values
    diverged = re.search(r"diverged: (\d+)/2 seeds", completed.stdout)
    assert diverged, completed.stdout
    return {"rows": rows, "diverged": int(diverged.group(1)), "stdout": completed.stdout}


@pytest.mark.slow
def test_seeds_script_counts_runs_with_and_without_rollback():
    # Known outcome (the same in both runtimes): on both seeds the loss blows up at step 1, inside the detector's
    # warm-up (seed 0: 11 -> 1.3e6). Seed 0 recovers, twice (micro); seed 1 never does (full, held-out loss ~400).
    # With rollback each blow-up goes back to the initial state at half the learning rate: neither seed diverges.
    plain, rolled_back = _run(), _run("--rollback", "--lr-factor", "0.5")
    assert "rollback=off" in plain["stdout"] and "rollback=on" in rolled_back["stdout"]
    assert plain["rows"] == {
        0: {"seed": 0, "micro": 2, "full": 0, "rescued": 0, "rollbacks": 0},
        1: {"seed": 1, "micro": 0, "full": 1, "rescued": 0, "rollbacks": 0},
    }
    assert plain["diverged"] == 1
    assert rolled_back["rows"] == {seed: {"seed": seed, "micro": 4, "full": 0, "rescued": 0, "rollbacks": 4}
                                   for seed in (0, 1)}
    assert rolled_back["diverged"] == 0


def test_seeds_script_rejects_a_bad_seed_count():
    completed = subprocess.run(
        [sys.executable, SCRIPT, "--seeds", "0"], capture_output=True, text=True, timeout=120, env=dict(os.environ)
    )
    assert completed.returncode != 0 and "--seeds must be >= 1" in completed.stderr
