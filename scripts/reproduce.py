"""Reproduces the Clippy paper's optimizer comparison (Tang et al., KDD 2023, Table 2) on public data.

Every run trains one ranker preset (Small, Large, Large+DCN) with one method (naive Adagrad, layer-wise gradient
clipping GC, adaptive gradient clipping AGC, LAMB on Adagrad, Clippy) at one learning-rate multiplier (1x, 2x of
the dataset's calibrated base rate) and one seed, for one pass over the training split in time order, and is
evaluated on the held-out newest data: AUC per binary task, RMSE per regression task. Each run's per-step loss is
watched for micro- and full divergence.

Two production practices apply to every method alike: each task's output bias starts at its training label prior
(`--output-bias label_prior`, `RankerConfig.output_bias`), and the learning rate ramps up linearly over the first
`--warmup-steps` steps (`tfrs_clippy.optimizers.LinearWarmup`; by default 10% of the run's steps, 16 of ML-100K's
157). `--output-bias zero --warmup-steps 0` is the setup of the first reproduction (docs/reproduction.md).

    TF_USE_LEGACY_KERAS=1 .venv/bin/python scripts/reproduce.py                      # ML-100K, ~10 min on 2 cores
    TF_USE_LEGACY_KERAS=1 .venv/bin/python scripts/reproduce.py --grid paper         # every grid point of the paper
    TF_USE_LEGACY_KERAS=1 .venv/bin/python scripts/reproduce.py --dataset census_income --scale 0.125

Outputs, in `<out>/<dataset>/`: `runs/<key>.json` (one record per run, keyed by a hash of its config: a run already
there is not recomputed, so an interrupted command resumes), `runs.json` (every record of this command),
`summary.json` (the same without the curves), `table.md` (the paper-shaped table, the per-learning-rate stability
table and the rollback comparison), `training_loss_<m>x.png` (Figure 5) and `clipping_factors_<m>x.png` (Figure 6).

Best learning rate per method: the paper reports each method at its best learning rate. Here each method runs at
every multiplier and, with `--grid paper`, every point of its hyper-parameter grid; the table shows per (model,
method) the setting with the highest mean AUC over seeds among the settings none of whose seeds diverged, and names
it in the "best lr" row. The selection reads the test split, as the paper's table does; it favours no method.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import pathlib
import platform
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf

import models
from tfrs_clippy.data import ChunkedExamples, Splits, census_income, make_pipeline, movielens_100k, synthetic
from tfrs_clippy.keras_runtime import LEGACY_KERAS, keras
from tfrs_clippy.optimizers import ADAGRAD_METHODS, DEFAULT_SETTINGS, PAPER_GRIDS, LinearWarmup, build_optimizer
from tfrs_clippy.optimizers.variable_names import matches_any
from tfrs_clippy.stability import ClippingFactorLogger, DivergenceMonitor, RollbackOnDivergence, classify_run

from experiments import paper_tables
from experiments.records import (
    config_key,
    format_duration,
    format_multiplier,
    metric_names,
    read_json,
    write_json_atomically,
)

RECORD_VERSION = 2
"""Part of every run's config, hence of its key: bump it when a change to this script changes results."""

FUSE_DENSE_UPDATES = False
"""The optimizers' XLA-fused dense step: at these scaled-down widths on CPU its per-run compile time (2-5 s)
exceeds what it saves in a 157-step pass, so the runs use the unfused step (same math, up to float rounding)."""

MODELS = ("small", "large", "large_dcn")
METHODS = tuple(ADAGRAD_METHODS)
OUTPUT_BIASES = ("label_prior", "zero")
EVAL_BATCH_SIZE = 4096

EMBEDDING_PATTERN = "embedding"
"""The regular expression naming the embedding tables, which every method leaves to plain Adagrad, as the paper
does (`build_optimizer(embedding_pattern=...)`). This script matches it as the optimizers do (`matches_any`: a
`re.search`) on the name they see (e.g. "ranker/embedding/table_user_id/embeddings:0"), to leave those tables' clipping
factors (always 1) out of the records and Figure 6. Changing it changes results: bump RECORD_VERSION."""

WARMUP_FRACTION = 0.1
"""The default --warmup-steps as a share of a run's steps (rounded): 16 of ML-100K's 157 steps at batch 512.
Long enough that Adagrad's first, largest steps (g / sqrt(G) ~ sign(g) while G is near its initial value) are
taken at lr / 16 to lr / 2, below the calibrated stable rate 0.04, while the accumulator fills; short enough that
90% of the pass runs at the peak rate the comparison is about. 10% is also the common choice in practice."""

# One setting per method for the default (budgeted) run: the library's default, the middle of each grid.
MIDDLE_GRID = {method: [DEFAULT_SETTINGS[method]] for method in METHODS}
GRIDS = {"middle": MIDDLE_GRID, "paper": {method: PAPER_GRIDS[method] for method in METHODS}}


@dataclasses.dataclass(frozen=True)
class DatasetChoice:
    """A dataset the runner knows and its calibrated base (1x) learning rate.

    Attributes:
        load: Returns the splits.
        base_learning_rate: The 1x learning rate; see `docs/reproduction.md` and the sweep it cites.
        description: How the data is set up, for the output.
    """

    load: Callable[[], Splits]
    base_learning_rate: float
    description: str


DATASETS = {
    # 1x = 0.08, the "onset" of the factor-2 sweep (docs/calibration/movielens_100k.md, from
    # `scripts/calibrate_lr.py --dataset movielens_100k`, scale 1/16, batch 512, seed 0): the smallest rate at
    # which naive Adagrad diverged on some preset (Large+DCN; Small and Large stay stable up to 0.32 and 0.16).
    # As in the paper, 1x is already too large for naive Adagrad on the largest model and 2x more so.
    "movielens_100k": DatasetChoice(movielens_100k, 0.08, "MovieLens-100K, oldest 80% train, newest 20% test"),
    # NOT calibrated: Census-Income and the synthetic stream reuse ML-100K's 1x. Sweep them with
    # `scripts/calibrate_lr.py --dataset <name>` and pass the edge as --base-learning-rate.
    "census_income": DatasetChoice(census_income, 0.08, "Census-Income (KDD), official train file, test half"),
    "synthetic": DatasetChoice(
        lambda: synthetic(num_train=100_000, num_test=20_000, vocabulary_sizes=(1_000, 10_000, 100_000)),
        0.08,
        "synthetic drifting stream, 100k train then 20k test, vocabularies 1e3/1e4/1e5",
    ),
}


def comma_list(text: str) -> list[str]:
    """"a,b" -> ["a", "b"]."""
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parses and checks the command line.

    Raises:
        ValueError: A flag's value is out of range; the message names the flag and the value.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="movielens_100k", help=f"one of {sorted(DATASETS)}")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated presets")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--lr-multipliers", default="1,2", help="comma-separated multipliers of the base rate")
    parser.add_argument("--base-learning-rate", type=float, default=None,
                        help="the 1x rate; default: the dataset's calibrated one")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--grid", default="middle", help="'middle' (one point per method) or 'paper' (the full grids)")
    parser.add_argument("--scale", type=float, default=1 / 16, help="width multiplier of every preset")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--train-steps", type=int, default=0,
                        help="stop each pass after this many steps; 0: one full pass")
    parser.add_argument("--eval-examples", type=int, default=0, help="evaluate on the first N test examples; 0: all")
    parser.add_argument("--rollback-model", default="large_dcn",
                        help="also run naive Adagrad at the highest multiplier with RollbackOnDivergence on this "
                             "preset ('none': skip)")
    parser.add_argument("--rollback-lr-factor", type=float, default=0.5,
                        help="RollbackOnDivergence's learning-rate factor per rollback")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="linear learning-rate warm-up (LinearWarmup) of every method over this many steps; "
                             f"default: {WARMUP_FRACTION:.0%}% of a run's steps, rounded; 0: none")
    parser.add_argument("--output-bias", default="label_prior",
                        help=f"initial bias of each task's logit layer, one of {list(OUTPUT_BIASES)} "
                             "(RankerConfig.output_bias)")
    parser.add_argument("--out", default="results", help="output folder")
    args = parser.parse_args(argv)
    args.models, args.methods = comma_list(args.models), comma_list(args.methods)
    check_choices("--dataset", [args.dataset], DATASETS)
    check_choices("--models", args.models, MODELS)
    check_choices("--methods", args.methods, METHODS)
    check_choices("--grid", [args.grid], GRIDS)
    check_choices("--rollback-model", [args.rollback_model], (*MODELS, "none"))
    check_choices("--output-bias", [args.output_bias], OUTPUT_BIASES)
    try:
        args.lr_multipliers = sorted(float(value) for value in comma_list(args.lr_multipliers))
    except ValueError:
        raise ValueError(f"--lr-multipliers must be comma-separated numbers, got {args.lr_multipliers!r}") from None
    if not args.lr_multipliers or min(args.lr_multipliers) <= 0:
        raise ValueError(f"--lr-multipliers must be positive numbers, got {args.lr_multipliers}")
    for flag, value, minimum in (("--seeds", args.seeds, 1), ("--batch-size", args.batch_size, 1),
                                 ("--train-steps", args.train_steps, 0), ("--eval-examples", args.eval_examples, 0)):
        if value < minimum:
            raise ValueError(f"{flag} must be >= {minimum}, got {value}")
    if not (math.isfinite(args.scale) and args.scale > 0):
        raise ValueError(f"--scale must be a finite number > 0, got {args.scale}")
    if args.base_learning_rate is not None and not args.base_learning_rate > 0:
        raise ValueError(f"--base-learning-rate must be > 0, got {args.base_learning_rate}")
    if not 0 < args.rollback_lr_factor <= 1:
        raise ValueError(f"--rollback-lr-factor must be in (0, 1], got {args.rollback_lr_factor}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    return args


def run_steps(args: argparse.Namespace, train_examples: int) -> int:
    """The steps of each run: one pass over `train_examples` at the batch size, or --train-steps if fewer."""
    steps = math.ceil(train_examples / args.batch_size)
    return min(steps, args.train_steps) if args.train_steps else steps


def warmup_steps(args: argparse.Namespace, train_examples: int) -> int:
    """--warmup-steps, or by default `WARMUP_FRACTION` of the run's steps rounded (half up)."""
    if args.warmup_steps is not None:
        return args.warmup_steps
    return int(math.floor(WARMUP_FRACTION * run_steps(args, train_examples) + 0.5))


def check_choices(flag: str, values: Sequence[str], choices: Sequence[str]) -> None:
    """Raises a ValueError naming `flag` if `values` is empty or holds a value not in `choices`."""
    unknown = [value for value in values if value not in choices]
    if unknown or not values:
        raise ValueError(f"{flag} must be among {sorted(choices)}, got {list(values)}")


def run_config(args: argparse.Namespace, model: str, method: str, hyperparameters: dict, multiplier: float,
               seed: int, warmup: int, rollback: bool = False) -> dict[str, Any]:
    """The config of one run: everything its result depends on (its key is `config_key` of it).

    `warmup` is the run's resolved warm-up steps (`warmup_steps`).
    """
    base = args.base_learning_rate or DATASETS[args.dataset].base_learning_rate
    return {
        "version": RECORD_VERSION,
        "dataset": args.dataset,
        "model": model,
        "scale": args.scale,
        "method": method,
        "hyperparameters": hyperparameters,
        "lr_multiplier": multiplier,
        "learning_rate": base * multiplier,
        "warmup_steps": warmup,
        "output_bias": args.output_bias,
        "seed": seed,
        "batch_size": args.batch_size,
        "train_steps": args.train_steps,
        "eval_examples": args.eval_examples,
        "rollback": {"lr_factor": args.rollback_lr_factor} if rollback else None,
        "fuse_dense_updates": FUSE_DENSE_UPDATES,
    }


def plan_runs(args: argparse.Namespace, train_examples: int) -> list[dict[str, Any]]:
    """Every run of the command: model x method x grid point x multiplier x seed, then the rollback stage.

    `train_examples` is the size of the training split (it sets the default warm-up).
    """
    grid = GRIDS[args.grid]
    warmup = warmup_steps(args, train_examples)
    configs = [
        run_config(args, model, method, hyperparameters, multiplier, seed, warmup)
        for model in args.models
        for method in args.methods
        for hyperparameters in grid[method]
        for multiplier in args.lr_multipliers
        for seed in range(args.seeds)
    ]
    if args.rollback_model != "none" and "naive" in args.methods and args.rollback_model in args.models:
        configs += [
            run_config(args, args.rollback_model, "naive", {}, args.lr_multipliers[-1], seed, warmup, rollback=True)
            for seed in range(args.seeds)
        ]
    return configs


def readable_variable_names(model: models.Ranker) -> dict[str, str]:
    """Variable name -> "<part>/<layer>/<weight>" with part "embedding", "cross", "bottom" or "tower_<task>"."""
    parts = [("embedding", model.embedding), ("cross", model.cross_network), ("bottom", model.bottom),
             *((f"tower_{task}", tower) for task, tower in model.towers.items())]
    names = {}
    for part, layer in parts:
        for variable in layer.trainable_variables if layer is not None else []:
            layer_and_weight = variable.name.split(":")[0].split("/")[-2:]
            names[variable.name] = "/".join([part, *layer_and_weight])
    return names


def clipped_factors(factors: dict[str, list[float]], names: dict[str, str],
                    embedding_pattern: str = EMBEDDING_PATTERN) -> dict[str, list[float]]:
    """The recorded factors of the variables the optimizer clips, under their readable names.

    Args:
        factors: `ClippingFactorLogger.record.factors`, keyed by the optimizer's variable names.
        names: `readable_variable_names` of the model; a name it lacks is kept as it is.
        embedding_pattern: The `embedding_pattern` the optimizer was built with: a variable whose name it matches
            (`variable_names.matches_any`, the optimizers' rule) is an embedding table and is left out.
    """
    return {names.get(name, name): values for name, values in factors.items()
            if not matches_any([embedding_pattern], name)}


def held_out(splits: Splits, eval_examples: int) -> ChunkedExamples:
    """The test split, or its first `eval_examples` examples when that is not 0 (still in chunks: batched fast)."""
    return splits.test.take(eval_examples) if eval_examples else splits.test


def constant_prediction_rmse(splits: Splits, eval_examples: int) -> dict[str, float]:
    """Per regression task, "<task>_rmse" of always predicting the task's training mean on the held-out data.

    The reference against which `classify_run` judges a regression task dead.
    """
    regression = [task for task in splits.spec.tasks if task.kind == "regression"]

    def label_columns(dataset: ChunkedExamples) -> dict[str, np.ndarray]:
        batches = [labels for _, labels in make_pipeline(dataset, EVAL_BATCH_SIZE, prefetch=False)]
        return {task.name: np.concatenate([batch[task.label_key].numpy() for batch in batches]) for task in regression}

    train, test = label_columns(splits.train), label_columns(held_out(splits, eval_examples))
    # nanmean: a NaN label means "unlabeled" (the data convention).
    return {f"{name}_rmse": float(np.sqrt(np.nanmean((test[name] - np.nanmean(train[name])) ** 2))) for name in train}


def train_and_evaluate(config: dict[str, Any], splits: Splits, constant_rmse: dict[str, float]) -> dict[str, Any]:
    """Trains and evaluates the run `config` (see `run_config`) and returns its record (see `tfrs_clippy.reporting`).

    `constant_rmse` is `constant_prediction_rmse(splits, ...)`, the reference for dead regression tasks.
    """
    started = time.perf_counter()
    keras.backend.clear_session()  # fresh layer names (the plots use them) and no graphs of earlier runs
    keras.utils.set_random_seed(config["seed"])
    ranker = models.build_ranker(splits.spec, models.RankerConfig.preset(
        config["model"], scale=config["scale"], output_bias=config["output_bias"]))
    logs_factors = config["method"] == "clippy"
    # No warm-up: the plain constant rate, exactly as before LinearWarmup existed.
    learning_rate = (LinearWarmup(config["learning_rate"], config["warmup_steps"]) if config["warmup_steps"]
                     else config["learning_rate"])
    optimizer = build_optimizer(config["method"], learning_rate, embedding_pattern=EMBEDDING_PATTERN,
                                export_clipping_factors=logs_factors, fuse_dense_updates=config["fuse_dense_updates"],
                                **config["hyperparameters"])
    ranker.compile(optimizer=optimizer)
    if config["rollback"]:
        monitor = RollbackOnDivergence(lr_factor=config["rollback"]["lr_factor"])
    else:
        monitor = DivergenceMonitor()
    callbacks: list[keras.callbacks.Callback] = [monitor]
    factor_logger = ClippingFactorLogger() if logs_factors else None
    if factor_logger is not None:
        callbacks.append(factor_logger)
    train = make_pipeline(splits.train, config["batch_size"])
    if config["train_steps"]:
        train = train.take(config["train_steps"])
    ranker.fit(train, epochs=1, verbose=0, callbacks=callbacks)
    test = make_pipeline(held_out(splits, config["eval_examples"]), EVAL_BATCH_SIZE)
    evaluation = ranker.evaluate(test, return_dict=True, verbose=0)
    tasks = {task.name: task.kind for task in splits.spec.tasks}
    metrics = {name: float(evaluation[name]) for name in metric_names(tasks)}
    losses = list(monitor.record.losses)
    record: dict[str, Any] = {
        "key": config_key(config),
        "config": config,
        "tasks": tasks,
        "metrics": metrics,
        "losses": losses,
        "constant_rmse": constant_rmse,
        "verdict": classify_run(losses, metrics, constant_rmse=constant_rmse).to_dict(),
        "nonfinite_steps_skipped": int(optimizer.nonfinite_steps.numpy()),
        "seconds": time.perf_counter() - started,
    }
    if isinstance(monitor, RollbackOnDivergence):
        record["rollbacks"] = monitor.rollbacks
    if factor_logger is not None:
        record["clipping_factors"] = {
            "steps": factor_logger.record.steps,
            "factors": clipped_factors(factor_logger.record.factors, readable_variable_names(ranker)),
        }
    return record


def describe(config: dict[str, Any]) -> str:
    """E.g. "large_dcn gc(threshold=0.01) lr=2x (0.04) seed=1" (+ " rollback")."""
    settings = ",".join(f"{name}={value:g}" for name, value in sorted(config["hyperparameters"].items()))
    method = f"{config['method']}({settings})" if settings and config["method"] != "clippy" else config["method"]
    multiplier = format_multiplier(config["lr_multiplier"])
    text = f"{config['model']} {method} lr={multiplier} ({config['learning_rate']:g}) seed={config['seed']}"
    return text + (" rollback" if config["rollback"] else "")


def summarize_run(record: dict[str, Any]) -> str:
    """The metrics and verdict of a run, for its progress line."""
    metrics = " ".join(f"{name}={value:.4f}" for name, value in record["metrics"].items())
    verdict = record["verdict"]
    state = f"DIVERGED({verdict['reason']})" if verdict["diverged"] else "ok"
    return f"{metrics} micro={verdict['micro_divergences']} full={verdict['full_divergences']} {state}"


def run_all(configs: list[dict[str, Any]], splits: Splits, runs_dir: pathlib.Path) -> list[dict[str, Any]]:
    """Runs (or reads back) every config, printing a progress line per run; returns the records in config order."""
    # Every config of one command shares dataset and eval_examples, hence the reference.
    constant_rmse = constant_prediction_rmse(splits, configs[0]["eval_examples"])
    keys = [config_key(config) for config in configs]
    cached = {key for key in keys if (runs_dir / f"{key}.json").exists()}
    to_compute = sum(key not in cached for key in keys)
    started, computed, records = time.perf_counter(), 0, []
    for index, (config, key) in enumerate(zip(configs, keys), start=1):
        path = runs_dir / f"{key}.json"
        prefix = f"[run {index}/{len(configs)}] {describe(config)}"
        if key in cached:
            record = read_json(path)
            # The verdict is re-derived, so a change of the divergence rule needs no rerun.
            record["constant_rmse"] = constant_rmse
            record["verdict"] = classify_run(
                record["losses"], record["metrics"], constant_rmse=constant_rmse).to_dict()
            records.append(record)
            print(f"{prefix} ... cached: {summarize_run(record)}", flush=True)
            continue
        record = train_and_evaluate(config, splits, constant_rmse)
        write_json_atomically(path, record)
        records.append(record)
        computed += 1
        elapsed = time.perf_counter() - started
        remaining = elapsed / computed * (to_compute - computed)
        print(f"{prefix} ... {summarize_run(record)} {record['seconds']:.1f}s "
              f"(elapsed {format_duration(elapsed)}, remaining ~{format_duration(remaining)})", flush=True)
    return records


def preset_widths(scale: float, names: Sequence[str]) -> str:
    """E.g. "small 32x2, large 256x4, large_dcn 1 cross + 256x4" at `scale`."""
    parts = []
    for name in names:
        config = models.RankerConfig.preset(name, scale=scale)
        widths = config.scaled(config.bottom_units)
        bottom = f"{widths[0]}x{len(widths)}" if len(set(widths)) == 1 else "-".join(map(str, widths))
        parts.append(f"{name} {f'{config.cross_layers} cross + ' if config.cross_layers else ''}{bottom}")
    return ", ".join(parts)


def write_reports(records: list[dict[str, Any]], args: argparse.Namespace, out: pathlib.Path,
                  wall_seconds: float) -> list[pathlib.Path]:
    """Writes runs.json, summary.json, table.md and the plots; returns the paths written."""
    written = [
        write_json_atomically(out / "runs.json", records),
        write_json_atomically(
            out / "summary.json",
            [{key: value for key, value in record.items() if key not in ("losses", "clipping_factors")}
             for record in records],
        ),
    ]
    base = args.base_learning_rate or DATASETS[args.dataset].base_learning_rate
    header = [
        f"# Optimizer comparison on {args.dataset}",
        "",
        f"- Command: `{' '.join(['scripts/reproduce.py', *args.argv])}`",
        f"- Data: {DATASETS[args.dataset].description}; one pass in time order, batch {args.batch_size}"
        + (f", first {args.train_steps} steps only" if args.train_steps else ""),
        f"- Presets scaled by {args.scale:g} (every preset by the same factor, so the widths keep the paper's "
        f"Small : Large : Large+DCN ratios): {preset_widths(args.scale, MODELS)}",
        f"- 1x learning rate {base:g}; multipliers {', '.join(map(format_multiplier, args.lr_multipliers))}; "
        f"{args.seeds} seeds; grid '{args.grid}'",
        f"- Every method: linear learning-rate warm-up over the first {records[0]['config']['warmup_steps']} steps "
        f"(0: none); output biases '{args.output_bias}'",
        f"- {len(records)} runs, {sum(r['verdict']['diverged'] for r in records)} diverged; wall time of this "
        f"command {format_duration(wall_seconds)}, of all runs (incl. cached) "
        f"{format_duration(sum(r['seconds'] for r in records))}",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"TensorFlow {tf.__version__}",
        "",
        "## Table 2 (mean ± std over seeds at the best stable setting; AUC in %)",
        "",
        paper_tables.paper_table(records),
        "## Every learning rate (mean AUC % · seeds diverged · micro-divergences)",
        "",
        paper_tables.stability_table(records),
    ]
    rollback = paper_tables.rollback_table(records)
    if rollback:
        header += ["## Naive Adagrad with and without RollbackOnDivergence", "", rollback]
    written.append(out / "table.md")
    written[-1].write_text("\n".join(header), encoding="utf-8")
    top = args.lr_multipliers[-1]
    main_records = [record for record in records if not record["config"]["rollback"]]
    written.append(pathlib.Path(paper_tables.plot_training_loss(
        main_records, str(out / f"training_loss_{top:g}x.png"), top)))
    clippy_runs = [record for record in main_records
                   if record["config"]["method"] == "clippy" and record["config"]["lr_multiplier"] == top]
    if clippy_runs:
        # Figure 6 shows the largest model: prefer Large+DCN, then Large, then Small; the first seed.
        shown = min(clippy_runs, key=lambda r: (-MODELS.index(r["config"]["model"]), r["config"]["seed"]))
        path = out / f"clipping_factors_{top:g}x.png"
        # The pattern drops the tables from records written before `clipped_factors` left them out.
        written.append(pathlib.Path(paper_tables.plot_run_clipping_factors(shown, str(path), EMBEDDING_PATTERN)))
    return written


def main(argv: Sequence[str]) -> int:
    try:
        args = parse_args(argv)
    except ValueError as error:
        print(f"reproduce.py: error: {error}", file=sys.stderr)
        return 2
    args.argv = list(argv)
    if not LEGACY_KERAS:
        print("reproduce.py: error: TFRS and the rankers need Keras 2; run with TF_USE_LEGACY_KERAS=1.",
              file=sys.stderr)
        return 2
    logging.getLogger("tfrs_clippy.stability.rollback").setLevel(logging.ERROR)  # the table reports rollbacks
    started = time.perf_counter()
    out = pathlib.Path(args.out) / args.dataset
    splits = DATASETS[args.dataset].load()
    configs = plan_runs(args, splits.sizes["train"])
    print(f"{len(configs)} runs on {args.dataset}; presets scaled by {args.scale:g}: "
          f"{preset_widths(args.scale, args.models)}; warm-up {configs[0]['warmup_steps']} steps, output biases "
          f"'{args.output_bias}'", flush=True)
    records = run_all(configs, splits, out / "runs")
    for path in write_reports(records, args, out, time.perf_counter() - started):
        print(f"wrote {path}")
    print(f"wall time {format_duration(time.perf_counter() - started)}")
    return 0


if __name__ == "__main__":
    tf.get_logger().setLevel("ERROR")
    sys.exit(main(sys.argv[1:]))
