"""Runs a test helper script in a fresh process (strategies and servers outlive a test) and reads its JSON line."""

import json
import os
import pathlib
import subprocess
import sys


def run_json_script(script: pathlib.Path, timeout: float, *args: str) -> dict:
    """Runs `script` with this interpreter and environment; returns the JSON object on its last stdout line."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    process = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                             timeout=timeout)
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout.strip().splitlines()[-1])
