"""Trains a sharded embedding table with ClippyAdagrad on an in-process ParameterServer cluster (2 workers, 2 PS).

Prints one JSON line: the final table and clipping factors for each clipping granularity, under the cluster and
on one device with the table as one variable ("whole") and as two separate variables ("per_shard").
"""

import json
import os
import socket

os.environ["TF_USE_LEGACY_KERAS"] = "1"

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfrs_clippy  # noqa: E402

ROWS, DIM, STEPS = 10, 3, 4
# Plain lists: tensors made before the cluster starts belong to a context that connecting replaces.
IDS = [[[1, 7], [7, 8]], [[0, 9], [4, 4]], [[2, 3], [8, 1]]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_cluster() -> tf.distribute.experimental.ParameterServerStrategy:
    spec = tf.train.ClusterSpec({
        "worker": [f"127.0.0.1:{free_port()}" for _ in range(2)],
        "ps": [f"127.0.0.1:{free_port()}" for _ in range(2)],
    })
    for job in ("worker", "ps"):
        for index in range(2):
            tf.distribute.Server(spec, job_name=job, task_index=index, protocol="grpc", start=True)
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(spec, rpc_layer="grpc")
    return tf.distribute.experimental.ParameterServerStrategy(
        resolver, variable_partitioner=tf.distribute.experimental.partitioners.FixedShardsPartitioner(2)
    )


def loss_fn(rows_of):
    """sum((table[ids] . 1)^2 * [1, 2, 3]) with a fixed weight per column, so clipping differs per row and shard."""
    def loss(ids):
        return tf.reduce_sum(tf.square(rows_of(ids)) * tf.constant([1.0, 2.0, 3.0]))
    return loss


def initial_table() -> np.ndarray:
    return np.linspace(-1.0, 1.0, ROWS * DIM, dtype=np.float32).reshape(ROWS, DIM)


def train(variables, rows_of, optimizer, schedule=None) -> None:
    """Steps over IDS; `schedule(replica_step)` returns the function to call per batch (default: a tf.function)."""
    loss = loss_fn(rows_of)

    def replica_step(ids):
        with tf.GradientTape() as tape:
            value = loss(ids)
        optimizer.apply_gradients(zip(tape.gradient(value, variables), variables))
        return value

    step = schedule(replica_step) if schedule else tf.function(replica_step)
    for ids in IDS:
        step(tf.constant(ids))


def factors(optimizer) -> list:
    return [float(f) for f in optimizer.clipping_factors]


def main() -> None:
    strategy = start_cluster()
    coordinator = tf.distribute.experimental.coordinator.ClusterCoordinator(strategy)
    results = {}
    for axis in (None, 0):
        options = dict(learning_rate=0.5, export_clipping_factors=True, clipping_axis=axis)
        with strategy.scope():
            layer = tfrs_clippy.keras.layers.Embedding(ROWS, DIM)
            layer.build((None,))
            optimizer = tfrs_clippy.ClippyAdagrad(**options)
            # Slots must exist before steps are scheduled: two workers tracing the first step at once would
            # each try to create them.
            optimizer.build(layer.trainable_variables)
        shards = layer.trainable_variables
        start = 0
        for shard in shards:
            shard.assign(initial_table()[start:start + shard.shape[0]])
            start += shard.shape[0]

        def on_cluster(replica_step):
            step = tf.function(lambda ids: strategy.run(replica_step, args=(ids,)))
            # One step at a time (join after each): the comparison with one device needs the same step order.
            return lambda ids: (coordinator.schedule(step, args=(ids,)), coordinator.join())

        train(shards, layer, optimizer, schedule=on_cluster)
        coordinator.join()
        results[f"cluster_{axis}"] = {
            "table": np.concatenate([s.numpy() for s in shards]).tolist(), "factors": factors(optimizer),
            "shard_rows": [int(s.shape[0]) for s in shards],
        }

        whole = tf.Variable(initial_table())
        optimizer = tfrs_clippy.ClippyAdagrad(**options)
        train([whole], lambda ids: tf.gather(whole, ids), optimizer)
        results[f"whole_{axis}"] = {"table": whole.numpy().tolist(), "factors": factors(optimizer)}

        split = results[f"cluster_{axis}"]["shard_rows"][0]
        parts = [tf.Variable(initial_table()[:split]), tf.Variable(initial_table()[split:])]
        optimizer = tfrs_clippy.ClippyAdagrad(**options)
        train(parts, lambda ids: tf.gather(tf.concat(parts, 0), ids), optimizer)
        results[f"per_shard_{axis}"] = {
            "table": np.concatenate([p.numpy() for p in parts]).tolist(), "factors": factors(optimizer),
        }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
