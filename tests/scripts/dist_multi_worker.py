"""One worker of a MultiWorkerMirroredStrategy cluster training ClippyAdagrad (the cluster comes from TF_CONFIG).

Each worker trains every case of `CASES` in sync with the others and prints one JSON line with its final weights,
optimizer slots and clipping factors; worker 0 also trains each case on one device, outside the strategy, at the
same global batch. Runs in the runtime of the inherited environment.
"""

import json
import os
import sys

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_common  # noqa: E402  pylint: disable=wrong-import-position

CASES = ("clippy_sparse", "clippy_dense")


def as_lists(values: dict) -> dict:
    """The first local replica's value of every variable, as nested lists (each worker has one replica)."""
    return {key: [np.asarray(per_replica[0]).tolist() for per_replica in lists] for key, lists in values.items()}


def main() -> None:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    task_index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    output = {"task": task_index, "replicas": strategy.num_replicas_in_sync, "cases": {}}
    for case in CASES:
        output["cases"][case] = {"distributed": as_lists(dist_common.train(case, strategy))}
        if task_index == 0:
            output["cases"][case]["one_device"] = as_lists(dist_common.train(case))
    output["collective_ops"] = {
        case: dist_common.collective_op_counts(case, strategy) for case in ("adagrad_sparse", "clippy_sparse")
    }
    print(json.dumps(output))


if __name__ == "__main__":
    main()
