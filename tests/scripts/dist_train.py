"""Runs scripts/train.py's `main` with this script's arguments, then saves what the run ended with.

Usage: dist_train.py OUT.npz [train.py flags...]. OUT.npz holds `weights/<i>` for the i-th model variable and
`trainable/<i>` for the i-th trainable one (the shards of a sharded variable concatenated back; `max_shards` is the
largest number of shards of one variable) and `optimizer/<i>` for every
optimizer variable, each as the first replica holds it, for comparison with a checkpoint restored elsewhere. A
subprocess, because strategies set up devices or servers that outlive a test.
"""

import pathlib
import re
import sys
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "scripts"))
import train  # noqa: E402  pylint: disable=wrong-import-position


def merged_shards(variables: list) -> list[np.ndarray]:
    """The variables' values, the shards of a sharded one (consecutive, named <variable>/part_<k>) concatenated."""
    parts: dict[Any, list] = {}
    for index, variable in enumerate(variables):
        # Unsharded variables may share a name (metrics' "total:0"), so only shards are grouped by name.
        key = shard_of(variable) or index
        parts.setdefault(key, []).append(variable.numpy())
    return [values[0] if len(values) == 1 else np.concatenate(values) for values in parts.values()]


def shard_of(variable) -> Optional[str]:
    """The sharded variable's name if `variable` is one of its shards, else None."""
    match = re.match(r"(.*)/part_\d+(:\d+)?$", variable.name)
    return match.group(1) if match else None


def main() -> None:
    output, argv = sys.argv[1], sys.argv[2:]
    run = train.main(argv)
    arrays = {}
    for key, variables in (("weights", run.model.variables), ("trainable", run.model.trainable_variables)):
        arrays.update({f"{key}/{i}": value for i, value in enumerate(merged_shards(variables))})
    shards = [shard_of(v) for v in run.model.variables if shard_of(v)]
    arrays["max_shards"] = np.asarray(max((shards.count(name) for name in shards), default=1))
    arrays.update({f"optimizer/{i}": np.asarray(v.numpy()) for i, v in enumerate(run.optimizer.variables())})
    arrays["steps"] = np.asarray(run.steps)
    np.savez(output, **arrays)


if __name__ == "__main__":
    main()
