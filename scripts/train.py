"""Trains one ranker with one optimizer on one dataset, on one device or under a `tf.distribute` strategy.

    .venv/bin/python scripts/train.py --dataset movielens_100k --preset small --scale 0.125 --method clippy \
        --learning-rate 0.05 --batch-size 256 --epochs 2 --strategy mirrored \
        --checkpoint-dir /tmp/run/ckpt --log-dir /tmp/run/logs
    .venv/bin/python scripts/train.py --dataset census_income --bottom mmoe --num-experts 4 --scale 0.125 \
        --metrics-out /tmp/run/metrics.json --export-dir /tmp/run/serving

The model: `--preset` (default small) or `--config FILE` (a `RankerConfig` YAML/JSON mapping, which may name a
"preset" to start from), then the model flags (`--bottom`, `--num-experts`, `--num-task-experts`, `--num-levels`,
`--bottom-units`, `--tower-units`, `--cross-layers`, ...) override single fields. The effective config is written
beside the checkpoints (`ranker_config.json`, loadable with `--config`); a rerun resumes with it (model flags, if
any, apply to it), and a rerun that would make another model is refused.

After each epoch and at the end, the ranker is evaluated on the held-out split (validation where the dataset has
one, else test): AUC per binary task and RMSE per regression task are printed, and every evaluated metric goes to
History and TensorBoard as `val_<metric>` / `test_<metric>` (see `train_eval.py`). `--metrics-out FILE` writes
them with the config, steps and wall time as JSON; the last line printed sums the run up. `--export-dir DIR`
writes the serving SavedModel (`serving_default`: raw features in, one prediction per task out).

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
import time
import urllib.parse
from typing import Any, Optional, Sequence

import yaml

os.environ["TF_USE_LEGACY_KERAS"] = "1"  # the rankers are tfrs.Models: Keras 2 only

import tensorflow as tf  # noqa: E402

import models  # noqa: E402
import tfrs_clippy  # noqa: E402
from tfrs_clippy import data  # noqa: E402
from tfrs_clippy.keras_runtime import keras  # noqa: E402
from tfrs_clippy.optimizers import (  # noqa: E402
    DEFAULT_SETTINGS,
    METHODS,
    LinearWarmup,  # noqa: E402
)
from tfrs_clippy.stability._summary import write_scalar  # noqa: E402

from experiments import train_eval  # noqa: E402

STRATEGIES = ("default", "mirrored", "multi_worker", "parameter_server", "tpu")
DATASETS = ("movielens_100k", "census_income", "synthetic")
RUN_FILE = "run.json"
"""Written beside the checkpoints: the flags that fix the data stream, which a resumed run must repeat."""
_STREAM_FLAGS = ("dataset", "batch_size", "shuffle_window", "seed", "epochs", "synthetic_examples",
                 "synthetic_vocabulary")
TPU_CONNECT_TIMEOUT_SECONDS = 10.0
CONFIG_FILE = "ranker_config.json"
"""Written beside the checkpoints: the effective `RankerConfig`, which a resumed run uses (a `--config` file)."""
MODEL_FLAGS = ("bottom", "num_experts", "num_task_experts", "num_levels", "bottom_units", "tower_units",
               "cross_layers", "cross_projection_dim", "cross_placement", "task_weights", "scale", "output_bias")
"""Flags that override the `RankerConfig` field of the same name (None: not given, the preset's or file's)."""


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
    config: models.RankerConfig
    held_out_split: str
    """"validation" or "test": the split `held_out` was measured on."""
    held_out: dict[str, float]
    """Every metric on the held-out split at the end (`train_eval.HeldOut.evaluate`): per-task AUC or RMSE, ..."""
    wall_seconds: float


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


def _non_negative_int(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 0:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer >= 0, got {text!r}")
        return value
    return parse


def _json_object(flag: str):
    def parse(text: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise argparse.ArgumentTypeError(f"{flag} must be a JSON object, got {text!r}: {error}") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{flag} must be a JSON object, got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--dataset", choices=DATASETS, default="movielens_100k")
    add("--synthetic-examples", type=_positive_int("--synthetic-examples"), default=100_000,
        help="training examples of the synthetic dataset")
    add("--synthetic-test-examples", type=_positive_int("--synthetic-test-examples"), default=10_000,
        help="held-out examples of the synthetic dataset (the stream after the training examples)")
    add("--synthetic-vocabulary", type=_int_list("--synthetic-vocabulary"), default=(1_000, 10_000, 100_000),
        help="vocabulary sizes of the synthetic dataset's categorical features, comma-separated")
    model = parser.add_argument_group("model", "override the preset's or --config file's RankerConfig fields")
    source = model.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=tuple(models.PRESETS), default=None, help="default: small")
    source.add_argument("--config", default=None, help="a RankerConfig .yaml/.yml/.json file")
    model.add_argument("--bottom", choices=models.BOTTOMS, default=None)
    model.add_argument("--num-experts", type=_positive_int("--num-experts"), default=None,
                       help="mmoe: experts; ple: shared experts per level")
    model.add_argument("--num-task-experts", type=_positive_int("--num-task-experts"), default=None,
                       help="ple: task-specific experts per task and level")
    model.add_argument("--num-levels", type=_positive_int("--num-levels"), default=None, help="ple: levels")
    model.add_argument("--bottom-units", type=_int_list("--bottom-units"), default=None,
                       help="widths of the bottom (of each expert), comma-separated")
    model.add_argument("--tower-units", type=_int_list("--tower-units"), default=None,
                       help="hidden widths of each task's tower, comma-separated")
    model.add_argument("--cross-layers", type=_non_negative_int("--cross-layers"), default=None,
                       help="DCN-v2 cross layers on the input (0: none)")
    model.add_argument("--cross-projection-dim", type=_positive_int("--cross-projection-dim"), default=None,
                       help="rank of low-rank cross layers (default: full rank)")
    model.add_argument("--cross-placement", choices=models.config.CROSS_PLACEMENTS, default=None)
    model.add_argument("--task-weights", type=_json_object("--task-weights"), default=None,
                       help='loss weight per task as JSON, e.g. \'{"income_50k": 2}\'')
    model.add_argument("--output-bias", choices=models.config.OUTPUT_BIASES, default=None)
    model.add_argument("--scale", type=_positive_float("--scale"), default=None,
                       help="multiplier of every hidden width (default: the preset's or file's, 1)")
    add("--method", choices=tuple(METHODS), default="clippy")
    add("--hparams", type=_json_object("--hparams"), default=None,
        help="the method's hyper-parameters as JSON (default: the middle of the paper's grid, "
             "tfrs_clippy.optimizers.DEFAULT_SETTINGS)")
    add("--include-embeddings", action="store_true", help="scale the embedding tables' updates too")
    add("--learning-rate", type=_positive_float("--learning-rate"), default=0.01)
    add("--warmup-steps", type=_non_negative_int("--warmup-steps"), default=0,
        help="ramp the learning rate linearly over this many first steps (LinearWarmup; 0: none)")
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
    add("--metrics-out", default=None, help="write the config, steps, wall time and held-out metrics as JSON")
    add("--export-dir", default=None, help="write the serving SavedModel (Ranker.export) here at the end")
    return parser


def ranker_config(args: argparse.Namespace) -> models.RankerConfig:
    """The preset (or `--config` file) with the model flags that were given applied.

    Raises:
        ValueError: the file cannot be read or holds an unknown key or a bad value, or a flag's value is invalid
            for the config; the message names the file or the flags.
    """
    if args.config:
        try:
            base = models.RankerConfig.load(args.config)
        except FileNotFoundError:
            raise ValueError(f"--config {args.config}: no such file") from None
        except (OSError, ValueError, yaml.YAMLError) as error:
            raise ValueError(f"--config {args.config}: {error}") from None
    else:
        base = models.RankerConfig.preset(args.preset or "small")
    overrides = model_flags(args)
    try:
        return dataclasses.replace(base, **overrides)
    except ValueError as error:
        given = " ".join(f"--{name.replace('_', '-')} {_flag_text(value)}" for name, value in overrides.items())
        raise ValueError(f"{given}: {error}") from None


def model_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The model flags given on the command line, by RankerConfig field."""
    return {name: getattr(args, name) for name in MODEL_FLAGS if getattr(args, name) is not None}


def _flag_text(value: Any) -> str:
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


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
    # Checked now, not after hours of training.
    if args.metrics_out and pathlib.Path(args.metrics_out).is_dir():
        parser.error(f"--metrics-out must name a file, got the directory {args.metrics_out!r}")
    if args.export_dir and pathlib.Path(args.export_dir).is_file():
        parser.error(f"--export-dir must name a directory, got the file {args.export_dir!r}")
    try:
        args.ranker_config = ranker_config(args)
    except ValueError as error:
        parser.error(str(error))
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
        # The test split is the stream after the training examples: its size changes no training example.
        return data.synthetic(
            num_train=args.synthetic_examples, num_test=args.synthetic_test_examples,
            vocabulary_sizes=args.synthetic_vocabulary, seed=args.seed,
        )
    return getattr(data, args.dataset)()


def build_optimizer(args: argparse.Namespace) -> Any:
    """The method with `--hparams` (default: `DEFAULT_SETTINGS`, the middle of the paper's grid), exporting factors
    if logging."""
    hyperparameters = dict(DEFAULT_SETTINGS[args.method] if args.hparams is None else args.hparams)
    learning_rate = LinearWarmup(args.learning_rate, args.warmup_steps) if args.warmup_steps else args.learning_rate
    try:
        return tfrs_clippy.build_optimizer(
            args.method, learning_rate, include_embeddings=args.include_embeddings,
            export_clipping_factors=args.log_dir is not None, **hyperparameters,
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"--method {args.method} --hparams {json.dumps(hyperparameters)}: {error}") from None


def build_model_and_optimizer(args: argparse.Namespace, spec: data.DatasetSpec,
                              strategy: tf.distribute.Strategy) -> tuple[models.Ranker, Any]:
    """The compiled ranker of `args.ranker_config` and its optimizer, slots built, all under `strategy`'s scope.

    Slots are built here rather than in the first step: with several workers tracing the first step at once, each
    would try to create them.

    Raises:
        ValueError: the config does not fit the dataset (e.g. `task_weights` names a task it lacks).
    """
    keras.utils.set_random_seed(args.seed)
    with strategy.scope():
        try:
            model = models.build_ranker(spec, args.ranker_config)
        except ValueError as error:
            source = f"--config {args.config}" if args.config else "the model flags"
            raise ValueError(f"{source} on --dataset {args.dataset}: {error}") from None
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

    def write_scalars(self, prefix: str, values: dict[str, float]) -> None:
        """Writes `values` at the current step (results computed outside `fit`: the held-out metrics under PS)."""
        step = optimizer_step(self.model.optimizer)
        with self.writer.as_default():
            for name, value in values.items():
                write_scalar(f"{prefix}{name}", float(value), step)
        self.writer.flush()


class ScalarLogger(EpochScalarLogger):
    """Also writes the batch logs and factors every `every_n_steps` steps (batch hooks: not under PS)."""

    def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
        if optimizer_step(self.model.optimizer) % self.every_n_steps == 0:
            self._write("batch/", logs)


# Training -------------------------------------------------------------------------------------------------------


def _resolve_resumed_config(directory: pathlib.Path, args: argparse.Namespace) -> None:
    """Records the effective ranker config beside the checkpoints, or takes the recorded one on a resume.

    On a resume without --preset or --config, the model flags given apply to the recorded config (so the same
    command, or one with no model flags, resumes the same model); the resulting model must be the recorded one,
    else the rerun is refused, naming the fields (the checkpoint would not restore into another model).
    """
    path = directory / CONFIG_FILE
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(args.ranker_config.to_dict(), indent=1) + "\n", encoding="utf-8")
        return
    recorded = models.RankerConfig.load(path)
    wanted = args.ranker_config
    if not (args.preset or args.config):
        try:
            wanted = dataclasses.replace(recorded, **model_flags(args))
        except ValueError as error:
            raise ValueError(f"--checkpoint-dir {directory}: the model flags do not apply to {path}: {error}") from None
    if recorded != wanted:
        ours, theirs = wanted.to_dict(), recorded.to_dict()
        changed = ", ".join(f"{name} {ours[name]} (was {theirs[name]})" for name in ours if ours[name] != theirs[name])
        raise ValueError(
            f"--checkpoint-dir {directory} holds a run of another ranker: {changed}. Rerun with the same model, "
            f"or with no model flags to resume with {path}."
        )
    args.ranker_config = recorded


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


def training_input(args: argparse.Namespace, strategy: tf.distribute.Strategy, skip: int,
                   train_examples: Optional[data.ChunkedExamples] = None) -> Any:
    """The global batches after the first `skip`, as `fit` takes them under `strategy`.

    `train_examples` is the training split if already loaded (else it is loaded: Census-Income takes ~20 s);
    under ParameterServerStrategy each worker loads its own.
    """

    def batches(examples: data.ChunkedExamples) -> tf.data.Dataset:
        return data.make_pipeline(
            examples, args.batch_size, shuffle_window=args.shuffle_window, seed=args.seed, epochs=args.epochs,
            drop_remainder=True,
        ).skip(skip)

    if isinstance(strategy, tf.distribute.experimental.ParameterServerStrategy):
        # Each worker builds its own pipeline (a dataset made here could not be sent to it) and reads its shard,
        # repeated so that no worker runs dry while steps are still scheduled. Workers take steps as they come
        # free, so which examples a step reads is not fixed: a resumed run skips the same number of batches.
        def per_worker(context: tf.distribute.InputContext) -> tf.data.Dataset:
            own = batches(load_splits(args).train)
            return own.shard(context.num_input_pipelines, context.input_pipeline_id).repeat()
        return keras.utils.experimental.DatasetCreator(per_worker)
    if train_examples is None:
        train_examples = load_splits(args).train
    if args.strategy == "default":
        return batches(train_examples)
    # Distributed explicitly, as `fit` would: each replica gets its contiguous slice of every global batch.
    return strategy.experimental_distribute_dataset(batches(train_examples))


def train(args: argparse.Namespace) -> TrainingRun:
    """Builds, restores (if a checkpoint exists), trains, evaluates, checkpoints and exports the run of `args`."""
    started = time.monotonic()
    strategy = make_strategy(args)
    directory = pathlib.Path(args.checkpoint_dir) if args.checkpoint_dir else None
    if directory is not None:
        _check_resumable(directory, args)
        _resolve_resumed_config(directory, args)  # before building: a resumed run may take the recorded model
    splits = load_splits(args)
    model, optimizer = build_model_and_optimizer(args, splits.spec, strategy)
    steps_per_epoch = int(splits.train.cardinality()) // args.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"--batch-size {args.batch_size} exceeds the {int(splits.train.cardinality())} examples.")
    total_steps = min(steps_per_epoch * args.epochs, args.max_steps or sys.maxsize)
    parameter_server = isinstance(strategy, tf.distribute.experimental.ParameterServerStrategy)
    # ParameterServerStrategy forbids batch-level callbacks (checkpoints and logs are per epoch there) and a
    # per-step progress bar (Keras refuses verbose=1).
    batch_hooks = not parameter_server
    verbose = 2 if parameter_server and args.verbose == 1 else args.verbose
    chief = train_eval.is_chief(strategy)
    held_out = train_eval.HeldOut(
        splits, args.batch_size, strategy, args.ranker_config,
        drop_remainder=isinstance(strategy, tf.distribute.TPUStrategy),
    )
    evaluation = train_eval.HeldOutEvaluation(held_out, lambda: optimizer_step(optimizer), chief)

    # Our own progress bar (Keras then adds none), so that the evaluation's line follows the epoch's; the
    # evaluation comes before the loggers, which write the held-out results it adds to the epoch logs.
    callbacks: list[keras.callbacks.Callback] = [keras.callbacks.ProgbarLogger(count_mode="steps"), evaluation]
    if directory is not None:
        manager = tf.train.CheckpointManager(make_checkpoint(model, optimizer), str(directory), max_to_keep=3)
        if manager.latest_checkpoint:
            make_checkpoint(model, optimizer).restore(manager.latest_checkpoint).assert_existing_objects_matched()
        callbacks.append((CheckpointSaver if batch_hooks else EpochCheckpointSaver)(manager, args.checkpoint_every))
    scalar_logger = None
    if args.log_dir:
        scalar_logger = (ScalarLogger if batch_hooks else EpochScalarLogger)(args.log_dir, args.log_every)
        callbacks.append(scalar_logger)

    first_step = done = optimizer_step(optimizer)
    history: dict[str, list[float]] = {}
    # One `fit` per run of whole epochs, one per part of an epoch (a resumed one's rest, a --max-steps one's start);
    # under ParameterServerStrategy one per epoch, evaluated in between (see train_eval.py).
    while done < total_steps:
        epoch = done // steps_per_epoch
        epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
        whole_epochs = done % steps_per_epoch == 0 and epoch_end - done == steps_per_epoch
        last_epoch = total_steps // steps_per_epoch if whole_epochs and not parameter_server else epoch + 1
        steps = steps_per_epoch if whole_epochs else epoch_end - done
        fitted = model.fit(
            training_input(args, strategy, done, splits.train), epochs=last_epoch, initial_epoch=epoch,
            steps_per_epoch=steps, callbacks=callbacks, verbose=verbose,
        )
        for key, values in fitted.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
        if optimizer_step(optimizer) == done:
            raise RuntimeError(f"train.py: fit took no step at step {done}; the data stream ended early.")
        done = optimizer_step(optimizer)
        if parameter_server:
            held_out_logs = evaluation.after_fit(model, epoch + 1)
            for key, value in held_out_logs.items():
                history.setdefault(key, []).append(value)
            if scalar_logger is not None:
                scalar_logger.write_scalars("epoch/", held_out_logs)

    # The last epoch's evaluation when it was at this step; a fresh one when no step was taken (a finished run).
    final = evaluation.evaluate_now(model, epoch=None)
    wall_seconds = time.monotonic() - started
    if args.export_dir:
        train_eval.export(model, held_out, args.export_dir, chief)
    if chief and args.metrics_out:
        train_eval.write_metrics(args.metrics_out, held_out, evaluation, final, {
            "dataset": args.dataset,
            "strategy": args.strategy,
            "replicas": int(strategy.num_replicas_in_sync),
            "steps": done,
            "steps_this_run": done - first_step,
            "wall_seconds": round(wall_seconds, 3),
            "ranker_config": args.ranker_config.to_dict(),
            "flags": _flags_record(args),
        })
    if chief:
        print(
            f"train.py: {args.dataset}, {args.ranker_config.bottom}, {args.method}: {done} steps "
            f"({done - first_step} in this run) in {wall_seconds:.1f} s; held-out {held_out.describe(final)}",
            flush=True,
        )
    return TrainingRun(strategy, model, optimizer, history, done, args.ranker_config, held_out.split, final,
                       wall_seconds)


def _flags_record(args: argparse.Namespace) -> dict[str, Any]:
    """Every flag's value as JSON (the resolved config is recorded on its own)."""
    flags = {name: value for name, value in vars(args).items() if name != "ranker_config"}
    return json.loads(json.dumps(flags, default=str))


def main(argv: Optional[Sequence[str]] = None) -> TrainingRun:
    args = parse_args(argv)
    try:
        return train(args)
    except TPUUnavailableError as error:
        raise SystemExit(f"train.py: {error}") from None


if __name__ == "__main__":
    main()
