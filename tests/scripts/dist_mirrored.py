"""Each optimizer under MirroredStrategy on 2 logical CPUs against one device at the same global batch.

Run as a script in a fresh process (the logical CPUs must exist before TensorFlow runs an op), in the runtime of
the inherited environment. Prints one JSON line:
- per case of `dist_common.CASES`: the largest difference between the mirrored and the one-device weights,
  optimizer slots (relative: accumulators are sums of squares) and clipping factors after `STEPS` steps; the largest
  difference between the two replicas; and the smallest clipping factor of the last step (below 1 when the
  scaling was exercised);
- per case of `COUNTED_CASES`: the collective ops in the traced step's graph.
"""

import json
import os
import sys

import tensorflow as tf

(_CPU,) = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(_CPU, [tf.config.LogicalDeviceConfiguration()] * 2)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_common  # noqa: E402  pylint: disable=wrong-import-position

COUNTED_CASES = ("adagrad_sparse", "clippy_sparse", "adagrad_dense", "clippy_dense")


def compare(case: str, strategy: tf.distribute.Strategy) -> dict:
    """Trains `case` mirrored and on one device; the differences described in the module docstring."""
    mirrored = dist_common.train(case, strategy)
    single = dist_common.train(case)
    result = {"replicas": len(mirrored["weights"][0])}
    for key in ("weights", "slots", "clipping_factors"):
        first_replica = [values[0] for values in mirrored[key]]
        result[f"{key}_vs_one_device"] = dist_common.max_difference(
            first_replica, [v[0] for v in single[key]], relative=key == "slots"
        )
        result[f"{key}_across_replicas"] = max(
            dist_common.max_difference([values[0]], [other]) for values in mirrored[key] for other in values[1:]
        )
    result["min_clipping_factor"] = min(float(values[0]) for values in mirrored["clipping_factors"])
    return result


def main() -> None:
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    results = {case: compare(case, strategy) for case in dist_common.CASES}
    counts = {case: dist_common.collective_op_counts(case, strategy) for case in COUNTED_CASES}
    print(json.dumps({"cases": results, "collective_ops": counts}))


if __name__ == "__main__":
    main()
