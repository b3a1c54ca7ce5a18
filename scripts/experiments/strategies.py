"""The `tf.distribute` strategy of `scripts/train.py --strategy`, and the servers and devices it needs.

- `default`: one device.
- `mirrored`: every local GPU, or with `--virtual-cpus K` the CPU split into K logical devices.
- `multi_worker`: MultiWorkerMirroredStrategy over TF_CONFIG's cluster.
- `parameter_server`: TF_CONFIG's cluster (a worker or PS task serves forever), or `--local-cluster W,P` servers
  started in this process; variables larger than `--ps-min-shard-bytes` are sharded over the parameter servers.
- `tpu`: the TPU `--tpu` names; `TPUUnavailableError` when it cannot be reached.
"""

from __future__ import annotations

import argparse
import os
import socket
import urllib.parse
from typing import Optional

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker", "parameter_server", "tpu")
TPU_CONNECT_TIMEOUT_SECONDS = 10.0


class TPUUnavailableError(RuntimeError):
    """`--strategy tpu` was asked for, but no TPU can be reached."""


def split_cpu(count: int) -> None:
    """Splits the physical CPU into `count` logical devices; must run before TensorFlow runs any op."""
    (cpu,) = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_local_cluster(workers: int, parameter_servers: int) -> tf.distribute.cluster_resolver.ClusterResolver:
    """Starts `workers` workers and `parameter_servers` servers in this process; returns their resolver."""
    spec = tf.train.ClusterSpec({
        "worker": [f"127.0.0.1:{_free_port()}" for _ in range(workers)],
        "ps": [f"127.0.0.1:{_free_port()}" for _ in range(parameter_servers)],
    })
    # As TensorFlow's in-process example does: a worker needs inter-op threads beyond the closure it runs, and the
    # default (one per core) deadlocks `fit` on a 2-core host.
    worker_config = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=max(2, workers + 1))
    for job, count in (("worker", workers), ("ps", parameter_servers)):
        for index in range(count):
            tf.distribute.Server(
                spec, job_name=job, task_index=index, protocol="grpc", start=True,
                config=worker_config if job == "worker" else None,
            )
    return tf.distribute.cluster_resolver.SimpleClusterResolver(spec, rpc_layer="grpc")


def _require_tf_config(strategy: str) -> None:
    if "TF_CONFIG" not in os.environ:
        raise ValueError(f"--strategy {strategy} reads the cluster from TF_CONFIG, which is not set.")


def parameter_server_strategy(args: argparse.Namespace) -> tf.distribute.Strategy:
    """The strategy on `--local-cluster` or TF_CONFIG's cluster; on a worker or PS task, serves forever instead."""
    if args.local_cluster:
        resolver = start_local_cluster(*args.local_cluster)
    else:
        _require_tf_config("parameter_server")
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        if resolver.task_type in ("worker", "ps"):
            server = tf.distribute.Server(
                resolver.cluster_spec(), job_name=resolver.task_type, task_index=resolver.task_id,
                protocol=resolver.rpc_layer or "grpc", start=True,
            )
            server.join()
    num_ps = len(resolver.cluster_spec().as_dict()["ps"])
    partitioner = tf.distribute.experimental.partitioners.MinSizePartitioner(
        min_shard_bytes=args.ps_min_shard_bytes, max_shards=num_ps
    )
    return tf.distribute.experimental.ParameterServerStrategy(resolver, variable_partitioner=partitioner)


def _check_reachable(address: str) -> None:
    """Raises TPUUnavailableError if a grpc://host:port address does not accept a connection (else TF would hang)."""
    parsed = urllib.parse.urlparse(address)
    if parsed.scheme != "grpc":
        return  # a TPU name: only the cluster resolver can look it up
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=TPU_CONNECT_TIMEOUT_SECONDS).close()
    except OSError as error:
        raise TPUUnavailableError(f"no TPU reachable: cannot connect to --tpu {address}: {error}") from None


def tpu_strategy(address: Optional[str]) -> tf.distribute.TPUStrategy:
    """Connects to the TPU at `address` (a name or grpc:// address) and initializes it.

    Raises:
        TPUUnavailableError: No address was given and TPU_NAME is unset, or the TPU cannot be reached.
    """
    if not address:
        raise TPUUnavailableError("no TPU reachable: pass --tpu NAME_OR_GRPC_ADDRESS or set TPU_NAME.")
    _check_reachable(address)
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=address)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as error:
        raise TPUUnavailableError(f"no TPU reachable: --tpu {address}: {error}") from None
    return tf.distribute.TPUStrategy(resolver)


def make_strategy(args: argparse.Namespace) -> tf.distribute.Strategy:
    """The strategy of `--strategy` (on a parameter-server cluster's worker or PS task, never returns)."""
    if args.virtual_cpus:
        split_cpu(args.virtual_cpus)
    if args.strategy == "default":
        return tf.distribute.get_strategy()
    if args.strategy == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([device.name for device in devices])
    if args.strategy == "multi_worker":
        _require_tf_config("multi_worker")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if args.strategy == "parameter_server":
        return parameter_server_strategy(args)
    return tpu_strategy(args.tpu)
