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
import logging
import math
import os
import pathlib
import platform
import sys
import time
from typing import Any, Sequence

import tensorflow as tf

from tfrs_clippy.keras_runtime import LEGACY_KERAS
from tfrs_clippy.optimizers import ADAGRAD_METHODS, DEFAULT_SETTINGS, PAPER_GRIDS

from experiments import paper_tables
from experiments.flags import check_choices, comma_list
from experiments.records import (
    format_duration,
    format_multiplier,
    write_json_atomically,
)
from experiments.runs import (
    DATASETS,
    EMBEDDING_PATTERN,
    MODELS,
    preset_widths,
    run_all,
    run_config,
)

METHODS = tuple(ADAGRAD_METHODS)
OUTPUT_BIASES = ("label_prior", "zero")

WARMUP_FRACTION = 0.1
"""The default --warmup-steps as a share of a run's steps (rounded): 16 of ML-100K's 157 steps at batch 512.
Long enough that Adagrad's first, largest steps (g / sqrt(G) ~ sign(g) while G is near its initial value) are
taken at lr / 16 to lr / 2, below the calibrated stable rate 0.04, while the accumulator fills; short enough that
90% of the pass runs at the peak rate the comparison is about. 10% is also the common choice in practice."""

# One setting per method for the default (budgeted) run: the library's default, the middle of each grid.
MIDDLE_GRID = {method: [DEFAULT_SETTINGS[method]] for method in METHODS}
GRIDS = {"middle": MIDDLE_GRID, "paper": {method: PAPER_GRIDS[method] for method in METHODS}}


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
