"""What every experiment script shares: run records on disk, their keys, and the small formats of tables.

A *run record* is a JSON-serializable dict, one per training run, cached as `<runs dir>/<key>.json`:

    {
      "key": "<config_key(config)>",
      "config": {... everything the run's result depends on ...},
      "tasks": {"<task>": "binary" | "regression", ...},
      "metrics": {"<task>_auc" | "<task>_rmse": float, ...},   # on the held-out (newest) split
      "losses": [per-step training loss, ...],
      "verdict": `tfrs_clippy.stability.RunVerdict.to_dict()`,
      "seconds": float,
      ...                                                        # each script's own measures
    }
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import subprocess
import tempfile
from typing import Any, Iterator, Mapping, Sequence

REPOSITORY = pathlib.Path(__file__).resolve().parents[2]
Record = Mapping[str, Any]


def config_key(config: Mapping[str, Any]) -> str:
    """A 16-hex-digit key of a run config: the same config (in any key order) always gives the same key."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def write_json_atomically(path: str | pathlib.Path, content: Any) -> pathlib.Path:
    """Writes `content` as JSON to `path` via a temporary file and a rename, so a reader never sees half a file.

    An interrupted run leaves either no file or the previous complete one: resuming can trust any file it finds.
    NaN and Inf are written as JSON's non-standard `NaN`/`Infinity`, which `json.load` reads back.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump(content, file, indent=1, sort_keys=True)
        os.chmod(temporary, 0o644)  # mkstemp makes the file private; records are meant to be shared
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return path


def read_json(path: str | pathlib.Path) -> Any:
    """The JSON content of `path`."""
    return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))


def format_multiplier(multiplier: float) -> str:
    """1.0 -> "1x", 0.5 -> "0.5x"."""
    return f"{multiplier:g}x"


def metric_names(tasks: Mapping[str, str]) -> list[str]:
    """The held-out metric of each task, binary tasks first (as the paper's rows): "<task>_auc", "<task>_rmse"."""
    binary = [f"{task}_auc" for task, kind in tasks.items() if kind == "binary"]
    regression = [f"{task}_rmse" for task, kind in tasks.items() if kind == "regression"]
    return binary + regression


def format_duration(seconds: float) -> str:
    """75 -> "1m15s"."""
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def commit() -> str:
    """The repository's short commit, for the line every generated table starts with ("unknown" outside git)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPOSITORY, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@contextlib.contextmanager
def stderr_silenced() -> Iterator[None]:
    """Sends file descriptor 2 to /dev/null: TensorFlow's C++ start-up lines bypass every Python log setting."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
