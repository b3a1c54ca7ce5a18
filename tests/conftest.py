"""Test-suite wiring: markers, and which tests belong to which Keras runtime.

`make test` runs the suite twice, once per runtime (TF_USE_LEGACY_KERAS=1 and unset). Tests under tests/models/
need TFRS, which imports only under Keras 2; in the Keras 3 run they are not collected (and the run says so).
Tests marked `keras2_only` / `keras3_only` are deselected, not skipped, in the other runtime.
"""

import os
import pathlib
import sys

LEGACY_KERAS = os.environ.get("TF_USE_LEGACY_KERAS", None) in ("true", "True", "1")
# The scripts' shared package (`experiments`) as the scripts see it: `python scripts/x.py` puts scripts/ first.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))

_KERAS2_ONLY_DIRS = ("models",)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s; still runs in CI")
    config.addinivalue_line("markers", "keras2_only: runs only with TF_USE_LEGACY_KERAS=1")
    config.addinivalue_line("markers", "keras3_only: runs only under Keras 3")


def pytest_ignore_collect(collection_path: pathlib.Path, config):
    if LEGACY_KERAS:
        return None
    tests_root = pathlib.Path(__file__).parent
    try:
        relative = collection_path.relative_to(tests_root)
    except ValueError:
        return None
    if relative.parts and relative.parts[0] in _KERAS2_ONLY_DIRS:
        return True
    return None


def pytest_collection_modifyitems(config, items):
    unwanted = "keras3_only" if LEGACY_KERAS else "keras2_only"
    deselected = [item for item in items if item.get_closest_marker(unwanted)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker(unwanted)]


def pytest_report_header(config):
    runtime = "Keras 2 (tf_keras, TFRS)" if LEGACY_KERAS else "Keras 3 (tests/models not collected: TFRS needs Keras 2)"
    return f"tfrs_clippy runtime: {runtime}"
