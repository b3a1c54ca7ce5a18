"""Test helper processes: run a script in a fresh process (strategies and servers outlive a test) and read its JSON
line; free loopback ports for their clusters."""

import json
import os
import pathlib
import socket
import subprocess
import sys


def run_json_script(script: pathlib.Path, timeout: float, *args: str) -> dict:
    """Runs `script` with this interpreter and environment; returns the JSON object on its last stdout line."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    process = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                             timeout=timeout)
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout.strip().splitlines()[-1])


def free_ports(count: int) -> list[int]:
    """Ports the OS reports free on 127.0.0.1 (held open together, so they are distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
