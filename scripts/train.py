"""Trains one ranker with one optimizer on one dataset, on one device or under a `tf.distribute` strategy.

    .venv/bin/python scripts/train.py --dataset movielens_100k --preset small --scale 0.125 --method clippy \
        --learning-rate 0.05 --batch-size 256 --epochs 2 --strategy mirrored \
        --checkpoint-dir /tmp/run/ckpt --log-dir /tmp/run/logs

The rankers need Keras 2 (TFRS), so this script sets TF_USE_LEGACY_KERAS=1 itself. Strategies:
- `default`: one device.
- `mirrored`: every local GPU, or with `--virtual-cpus K` the CPU split into K logical devices.
- `multi_worker`: MultiWorkerMirroredStrategy; run the same command on every worker of TF_CONFIG's cluster.
- `parameter_server`: run the same command on every task of TF_CONFIG's cluster (workers and parameter servers
  serve; the chief trains), or `--local-cluster W,P` for W workers and P parameter servers in this process.
  Variables larger than `--ps-min-shard-bytes` are sharded over the parameter servers.
- `tpu`: `--tpu` (or TPU_NAME) names the TPU; fails with "no TPU reachable: ..." when there is none.

Every strategy trains on the same global batches: `--batch-size` is the global batch, split over the replicas.
Batches are full (the remainder of the stream is dropped), so shapes are static as TPUs need.

With `--checkpoint-dir`, the model, the optimizer (slots and step count) and the position in the data (the step:
one batch per step) are saved every `--checkpoint-every` steps and at each epoch end, and a rerun of the same
command resumes from the latest checkpoint. With `--log-dir`, losses and metrics go to TensorBoard under
`<log-dir>` every `--log-every` steps (`batch/...`) and per epoch (`epoch/...`), with the optimizer's per-variable
clipping factors (`clipping_factor/...`). Under ParameterServerStrategy, which runs no per-batch callback,
checkpoints and logs are per epoch only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import socket
import sys
import urllib.parse
from typing import Any, Optional, Sequence

os.environ["TF_USE_LEGACY_KERAS"] = "1"  # the rankers are tfrs.Models: Keras 2 only

import tensorflow as tf  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import models  # noqa: E402
import tfrs_clippy  # noqa: E402
from tfrs_clippy import data  # noqa: E402
from tfrs_clippy.keras_runtime import keras  # noqa: E402
from tfrs_clippy.optimizers import METHODS, PAPER_GRIDS  # noqa: E402
from tfrs_clippy.stability._summary import write_scalar  # noqa: E402

STRATEGIES = ("default", "mirrored", "multi_worker", "parameter_server", "tpu")
DATASETS = ("movielens_100k", "census_income", "synthetic")
RUN_FILE = "run.json"
"""Written beside the checkpoints: the flags that fix the data stream, which a resumed run must repeat."""
_STREAM_FLAGS = ("dataset", "batch_size", "shuffle_window", "seed", "epochs", "synthetic_examples",
                 "synthetic_vocabulary")
TPU_CONNECT_TIMEOUT_SECONDS = 10.0


class TPUUnavailableError(RuntimeError):
    """`--strategy tpu` was asked for, but no TPU can be reached."""


@dataclasses.dataclass
class TrainingRun:
    """What `train` built and did: for callers that inspect the result (tests, notebooks)."""

    strategy: tf.distribute.Strategy
    model: models.Ranker
    optimizer: Any
    history: dict[str, list[float]]
    steps: int
    """Optimizer steps taken in total, including those of the runs this one resumed."""


def _positive_int(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer >= 1, got {text!r}")
        return value
    return parse


def _positive_float(flag: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{flag} must be a number > 0, got {text!r}")
        return value
    return parse


def _int_list(flag: str, length: Optional[int] = None):
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(part) for part in text.split(","))
        except ValueError:
            values = ()
        if not values or min(values) < 1 or (length is not None and len(values) != length):
            shape = f"{length} " if length else ""
            raise argparse.ArgumentTypeError(f"{flag} must be {shape}comma-separated integers >= 1, got {text!r}")
        return values
    return parse


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"--hparams must be a JSON object, got {text!r}: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--hparams must be a JSON object, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--dataset", choices=DATASETS, default="movielens_100k")
    add("--synthetic-examples", type=_positive_int("--synthetic-examples"), default=100_000,
        help="training examples of the synthetic dataset")
    add("--synthetic-vocabulary", type=_int_list("--synthetic-vocabulary"), default=(1_000, 10_000, 100_000),
        help="vocabulary sizes of the synthetic dataset's categorical features, comma-separated")
    add("--preset", choices=tuple(models.PRESETS), default="small")
    add("--scale", type=_positive_float("--scale"), default=1.0, help="multiplier of every hidden width")
    add("--method", choices=tuple(METHODS), default="clippy")
    add("--hparams", type=_json_object, default=None,
        help="the method's hyper-parameters as JSON (default: the first of the paper's grid)")
    add("--include-embeddings", action="store_true", help="scale the embedding tables' updates too")
    add("--learning-rate", type=_positive_float("--learning-rate"), default=0.01)
    add("--batch-size", type=_positive_int("--batch-size"), default=256, help="the global batch")
    add("--epochs", type=_positive_int("--epochs"), default=1)
    add("--shuffle-window", type=int, default=0, help="examples shuffled together; 0 keeps time order")
    add("--seed", type=int, default=0)
    add("--max-steps", type=_positive_int("--max-steps"), default=None,
        help="stop after this many steps in total (the rest of the data is left for a resumed run)")
    add("--strategy", choices=STRATEGIES, default="default")
    add("--virtual-cpus", type=_positive_int("--virtual-cpus"), default=None,
        help="split the CPU into this many logical devices (mirrored replicas on a CPU-only host)")
    add("--local-cluster", type=_int_list("--local-cluster", length=2), default=None,
        help="parameter_server: WORKERS,PS servers started in this process on 127.0.0.1")
    add("--ps-min-shard-bytes", type=_positive_int("--ps-min-shard-bytes"), default=256 << 10,
        help="parameter_server: variables are cut into shards of at least this size, one per server at most")
    add("--tpu", default=os.environ.get("TPU_NAME"), help="TPU name or grpc:// address (default: $TPU_NAME)")
    add("--steps-per-execution", type=_positive_int("--steps-per-execution"), default=1)
    add("--jit-compile", action="store_true", help="compile the train step with XLA")
    add("--checkpoint-dir", default=None)
    add("--checkpoint-every", type=_positive_int("--checkpoint-every"), default=1000, help="steps")
    add("--log-dir", default=None, help="TensorBoard logs")
    add("--log-every", type=_positive_int("--log-every"), default=10, help="steps")
    add("--verbose", type=int, choices=(0, 1, 2), default=1, help="Keras: 0 silent, 1 progress bar, 2 per epoch")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The flags, checked against each other (errors name the flags and their values)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.shuffle_window < 0:
        parser.error(f"--shuffle-window must be >= 0, got {args.shuffle_window}")
    if args.local_cluster and args.strategy != "parameter_server":
        parser.error(f"--local-cluster is for --strategy parameter_server, got --strategy {args.strategy}")
    if args.virtual_cpus and args.strategy not in ("default", "mirrored"):
        parser.error(f"--virtual-cpus is for --strategy mirrored, got --strategy {args.strategy}")
    if args.checkpoint_every % args.steps_per_execution:
        parser.error(
            f"--checkpoint-every ({args.checkpoint_every}) must be a multiple of --steps-per-execution "
            f"({args.steps_per_execution}): Keras returns to Python only between executions"
        )
    return args


# Strategies -----------------------------------------------------------------------------------------------------


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


# Data, model, optimizer -----------------------------------------------------------------------------------------


def load_splits(args: argparse.Namespace) -> data.Splits:
    if args.dataset == "synthetic":
        return data.synthetic(
            num_train=args.synthetic_examples, num_test=0, vocabulary_sizes=args.synthetic_vocabulary, seed=args.seed
        )
    return getattr(data, args.dataset)()


def build_optimizer(args: argparse.Namespace) -> Any:
    """The method with `--hparams` (default: the paper's first grid point), exporting factors if logging."""
    hyperparameters = dict(PAPER_GRIDS[args.method][0] if args.hparams is None else args.hparams)
    try:
        return tfrs_clippy.build_optimizer(
            args.method, args.learning_rate, include_embeddings=args.include_embeddings,
            export_clipping_factors=args.log_dir is not None, **hyperparameters,
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"--method {args.method} --hparams {json.dumps(hyperparameters)}: {error}") from None


def build_model_and_optimizer(args: argparse.Namespace, spec: data.DatasetSpec,
                              strategy: tf.distribute.Strategy) -> tuple[models.Ranker, Any]:
    """The compiled ranker and its optimizer, slots built, all under `strategy`'s scope.

    Slots are built here rather than in the first step: with several workers tracing the first step at once, each
    would try to create them.
    """
    keras.utils.set_random_seed(args.seed)
    with strategy.scope():
        model = models.build_ranker(spec, models.RankerConfig.preset(args.preset, scale=args.scale))
        optimizer = build_optimizer(args)
        optimizer.build(model.trainable_variables)
        model.compile(optimizer=optimizer, steps_per_execution=args.steps_per_execution,
                      jit_compile=args.jit_compile)
    return model, optimizer


def make_checkpoint(model: models.Ranker, optimizer: Any) -> tf.train.Checkpoint:
    """What a checkpoint holds: the model, and the optimizer with its slots and step count (the data position)."""
    return tf.train.Checkpoint(model=model, optimizer=optimizer)


# Callbacks ------------------------------------------------------------------------------------------------------


def optimizer_step(optimizer: Any) -> int:
    """The optimizer's step count, read from any strategy's variable (a mirrored one has no `__int__`)."""
    return int(optimizer.iterations.numpy())


def _summary_tag(name: str) -> str:
    # Summary tags allow only these characters; Keras 2 variable names end in ":0".
    return re.sub(r"[^A-Za-z0-9_./-]", "_", name.split(":")[0])


class EpochCheckpointSaver(keras.callbacks.Callback):
    """Saves at each epoch end and at the end of training, numbered by the optimizer's step."""

    def __init__(self, manager: tf.train.CheckpointManager, every_n_steps: int) -> None:
        super().__init__()
        self.manager = manager
        self.every_n_steps = every_n_steps

    def _save(self, force: bool) -> None:
        step = optimizer_step(self.model.optimizer)
        last = self.manager.latest_checkpoint
        if last is not None and int(last.rsplit("-", 1)[1]) == step:
            return
        if force or step % self.every_n_steps == 0:
            self.manager.save(checkpoint_number=step)

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        self._save(force=True)

    def on_train_end(self, logs: Optional[dict] = None) -> None:
        self._save(force=True)


class CheckpointSaver(EpochCheckpointSaver):
    """Also saves every `every_n_steps` steps (batch hooks: not under ParameterServerStrategy, which forbids them)."""

    def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
        self._save(force=False)


class EpochScalarLogger(keras.callbacks.Callback):
    """Writes the epoch logs (losses, metrics) and the optimizer's clipping factors to TensorBoard.

    Keras's own TensorBoard callback needs the `tensorboard` package, which this project does not install.
    Factors are written as `clipping_factor/<variable>` and `clipping_factor/min` (the smallest).
    """

    def __init__(self, log_dir: str, every_n_steps: int) -> None:
        super().__init__()
        self.writer = tf.summary.create_file_writer(log_dir)
        self.every_n_steps = every_n_steps

    def _write(self, prefix: str, logs: Optional[dict]) -> None:
        step = optimizer_step(self.model.optimizer)
        factors = {
            name: float(value) for name, value in self.model.optimizer.clipping_factors_by_name().items()
        }
        with self.writer.as_default():
            for name, value in (logs or {}).items():
                write_scalar(f"{prefix}{name}", float(value), step)
            for name, value in factors.items():
                write_scalar(f"clipping_factor/{_summary_tag(name)}", value, step)
            if factors:
                write_scalar("clipping_factor/min", min(factors.values()), step)

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        self._write("epoch/", logs)
        self.writer.flush()


class ScalarLogger(EpochScalarLogger):
    """Also writes the batch logs and factors every `every_n_steps` steps (batch hooks: not under PS)."""

    def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
        if optimizer_step(self.model.optimizer) % self.every_n_steps == 0:
            self._write("batch/", logs)


# Training -------------------------------------------------------------------------------------------------------


def _check_resumable(directory: pathlib.Path, args: argparse.Namespace) -> None:
    """Records the data-stream flags, or raises if a resumed run changes them (the step would point elsewhere)."""
    stream = {flag: getattr(args, flag) for flag in _STREAM_FLAGS}
    stream = json.loads(json.dumps(stream))  # tuples as lists, as they come back from the file
    path = directory / RUN_FILE
    if path.exists():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        changed = {flag: (recorded.get(flag), value) for flag, value in stream.items() if recorded.get(flag) != value}
        if changed:
            details = ", ".join(f"--{f.replace('_', '-')} {new} (was {old})" for f, (old, new) in changed.items())
            raise ValueError(f"--checkpoint-dir {directory} holds a run over another data stream: {details}.")
    else:
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stream, indent=1), encoding="utf-8")


def training_input(args: argparse.Namespace, strategy: tf.distribute.Strategy, skip: int) -> Any:
    """The global batches after the first `skip`, as `fit` takes them under `strategy`."""

    def batches() -> tf.data.Dataset:
        train_examples = load_splits(args).train
        return data.make_pipeline(
            train_examples, args.batch_size, shuffle_window=args.shuffle_window, seed=args.seed, epochs=args.epochs,
            drop_remainder=True,
        ).skip(skip)

    if isinstance(strategy, tf.distribute.experimental.ParameterServerStrategy):
        # Each worker builds its own pipeline (a dataset made here could not be sent to it) and reads its shard,
        # repeated so that no worker runs dry while steps are still scheduled. Workers take steps as they come
        # free, so which examples a step reads is not fixed: a resumed run skips the same number of batches.
        def per_worker(context: tf.distribute.InputContext) -> tf.data.Dataset:
            return batches().shard(context.num_input_pipelines, context.input_pipeline_id).repeat()
        return keras.utils.experimental.DatasetCreator(per_worker)
    if args.strategy == "default":
        return batches()
    # Distributed explicitly, as `fit` would: each replica gets its contiguous slice of every global batch.
    return strategy.experimental_distribute_dataset(batches())


def train(args: argparse.Namespace) -> TrainingRun:
    """Builds, restores (if a checkpoint exists), trains and checkpoints the run of `args`."""
    strategy = make_strategy(args)
    splits = load_splits(args)
    model, optimizer = build_model_and_optimizer(args, splits.spec, strategy)
    steps_per_epoch = int(splits.train.cardinality()) // args.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"--batch-size {args.batch_size} exceeds the {int(splits.train.cardinality())} examples.")
    total_steps = min(steps_per_epoch * args.epochs, args.max_steps or sys.maxsize)
    # ParameterServerStrategy forbids batch-level callbacks: there, checkpoints and logs are per epoch.
    batch_hooks = not isinstance(strategy, tf.distribute.experimental.ParameterServerStrategy)

    callbacks: list[keras.callbacks.Callback] = []
    if args.checkpoint_dir:
        directory = pathlib.Path(args.checkpoint_dir)
        _check_resumable(directory, args)
        manager = tf.train.CheckpointManager(make_checkpoint(model, optimizer), str(directory), max_to_keep=3)
        if manager.latest_checkpoint:
            make_checkpoint(model, optimizer).restore(manager.latest_checkpoint).assert_existing_objects_matched()
        callbacks.append((CheckpointSaver if batch_hooks else EpochCheckpointSaver)(manager, args.checkpoint_every))
    if args.log_dir:
        callbacks.append((ScalarLogger if batch_hooks else EpochScalarLogger)(args.log_dir, args.log_every))

    done = optimizer_step(optimizer)
    history: dict[str, list[float]] = {}
    # One `fit` per run of whole epochs, one per part of an epoch (a resumed one's rest, a --max-steps one's start).
    while done < total_steps:
        epoch = done // steps_per_epoch
        epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
        whole_epochs = done % steps_per_epoch == 0 and epoch_end - done == steps_per_epoch
        last_epoch = total_steps // steps_per_epoch if whole_epochs else epoch + 1
        steps = steps_per_epoch if whole_epochs else epoch_end - done
        fitted = model.fit(
            training_input(args, strategy, done), epochs=last_epoch, initial_epoch=epoch,
            steps_per_epoch=steps, callbacks=callbacks, verbose=args.verbose,
        )
        for key, values in fitted.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
        if optimizer_step(optimizer) == done:
            raise RuntimeError(f"train.py: fit took no step at step {done}; the data stream ended early.")
        done = optimizer_step(optimizer)
    return TrainingRun(strategy, model, optimizer, history, done)


def main(argv: Optional[Sequence[str]] = None) -> TrainingRun:
    args = parse_args(argv)
    try:
        return train(args)
    except TPUUnavailableError as error:
        raise SystemExit(f"train.py: {error}") from None


if __name__ == "__main__":
    main()
