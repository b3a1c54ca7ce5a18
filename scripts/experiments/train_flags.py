"""The flags of `scripts/train.py`: the parser, the checks between flags, and the `RankerConfig` they name.

`parse_args` returns the flags with `ranker_config` added: the preset (or `--config` file) with the model flags
applied. Importers set TF_USE_LEGACY_KERAS=1 before TensorFlow is imported (the rankers need Keras 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
from typing import Any, Optional, Sequence

import yaml

import tfrs_clippy_models as models
from tfrs_clippy.optimizers import METHODS

from experiments.flags import int_list, json_object, non_negative_int, positive_float, positive_int
from experiments.strategies import STRATEGIES

DATASETS = ("movielens_100k", "census_income", "synthetic")
MODEL_FLAGS = ("bottom", "num_experts", "num_task_experts", "num_levels", "bottom_units", "tower_units",
               "cross_layers", "cross_projection_dim", "cross_placement", "task_weights", "scale", "output_bias")
"""Flags that override the `RankerConfig` field of the same name (None: not given, the preset's or file's)."""


def build_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    """Every flag of train.py; `description` heads `--help`."""
    parser = argparse.ArgumentParser(description=description)
    add = parser.add_argument
    add("--dataset", choices=DATASETS, default="movielens_100k")
    add("--synthetic-examples", type=positive_int("--synthetic-examples"), default=100_000,
        help="training examples of the synthetic dataset")
    add("--synthetic-test-examples", type=positive_int("--synthetic-test-examples"), default=10_000,
        help="held-out examples of the synthetic dataset (the stream after the training examples)")
    add("--synthetic-vocabulary", type=int_list("--synthetic-vocabulary"), default=(1_000, 10_000, 100_000),
        help="vocabulary sizes of the synthetic dataset's categorical features, comma-separated")
    model = parser.add_argument_group("model", "override the preset's or --config file's RankerConfig fields")
    source = model.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=tuple(models.PRESETS), default=None, help="default: small")
    source.add_argument("--config", default=None, help="a RankerConfig .yaml/.yml/.json file")
    model.add_argument("--bottom", choices=models.BOTTOMS, default=None)
    model.add_argument("--num-experts", type=positive_int("--num-experts"), default=None,
                       help="mmoe: experts; ple: shared experts per level")
    model.add_argument("--num-task-experts", type=positive_int("--num-task-experts"), default=None,
                       help="ple: task-specific experts per task and level")
    model.add_argument("--num-levels", type=positive_int("--num-levels"), default=None, help="ple: levels")
    model.add_argument("--bottom-units", type=int_list("--bottom-units"), default=None,
                       help="widths of the bottom (of each expert), comma-separated")
    model.add_argument("--tower-units", type=int_list("--tower-units"), default=None,
                       help="hidden widths of each task's tower, comma-separated")
    model.add_argument("--cross-layers", type=non_negative_int("--cross-layers"), default=None,
                       help="DCN-v2 cross layers on the input (0: none)")
    model.add_argument("--cross-projection-dim", type=positive_int("--cross-projection-dim"), default=None,
                       help="rank of low-rank cross layers (default: full rank)")
    model.add_argument("--cross-placement", choices=models.config.CROSS_PLACEMENTS, default=None)
    model.add_argument("--task-weights", type=json_object("--task-weights"), default=None,
                       help='loss weight per task as JSON, e.g. \'{"income_50k": 2}\'')
    model.add_argument("--output-bias", choices=models.config.OUTPUT_BIASES, default=None)
    model.add_argument("--scale", type=positive_float("--scale"), default=None,
                       help="multiplier of every hidden width (default: the preset's or file's, 1)")
    add("--method", choices=tuple(METHODS), default="clippy")
    add("--hparams", type=json_object("--hparams"), default=None,
        help="the method's hyper-parameters as JSON (default: the middle of the paper's grid, "
             "tfrs_clippy.optimizers.DEFAULT_SETTINGS)")
    add("--include-embeddings", action="store_true", help="scale the embedding tables' updates too")
    add("--learning-rate", type=positive_float("--learning-rate"), default=0.01)
    add("--warmup-steps", type=non_negative_int("--warmup-steps"), default=0,
        help="ramp the learning rate linearly over this many first steps (LinearWarmup; 0: none)")
    add("--batch-size", type=positive_int("--batch-size"), default=256, help="the global batch")
    add("--epochs", type=positive_int("--epochs"), default=1)
    add("--shuffle-window", type=int, default=0, help="examples shuffled together; 0 keeps time order")
    add("--seed", type=int, default=0)
    add("--max-steps", type=positive_int("--max-steps"), default=None,
        help="stop after this many steps in total (the rest of the data is left for a resumed run)")
    add("--strategy", choices=STRATEGIES, default="default")
    add("--virtual-cpus", type=positive_int("--virtual-cpus"), default=None,
        help="split the CPU into this many logical devices (mirrored replicas on a CPU-only host)")
    add("--local-cluster", type=int_list("--local-cluster", length=2), default=None,
        help="parameter_server: WORKERS,PS servers started in this process on 127.0.0.1")
    add("--ps-min-shard-bytes", type=positive_int("--ps-min-shard-bytes"), default=256 << 10,
        help="parameter_server: variables are cut into shards of at least this size, one per server at most")
    add("--tpu", default=os.environ.get("TPU_NAME"), help="TPU name or grpc:// address (default: $TPU_NAME)")
    add("--steps-per-execution", type=positive_int("--steps-per-execution"), default=1)
    add("--jit-compile", action="store_true", help="compile the train step with XLA")
    add("--checkpoint-dir", default=None)
    add("--checkpoint-every", type=positive_int("--checkpoint-every"), default=1000, help="steps")
    add("--log-dir", default=None, help="TensorBoard logs")
    add("--log-every", type=positive_int("--log-every"), default=10, help="steps")
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


def parse_args(argv: Optional[Sequence[str]] = None, description: Optional[str] = None) -> argparse.Namespace:
    """The flags, checked against each other (errors name the flags and their values)."""
    parser = build_parser(description)
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
