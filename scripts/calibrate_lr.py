"""Sweeps naive Adagrad's learning rate on a dataset to find where it starts to diverge: the basis of "1x".

For each learning rate of a factor-2 grid and each preset, trains naive Adagrad exactly as `reproduce.py` does
(one pass in time order, same scale and batch size; zero output biases and no warm-up, as
`reproduce.py --output-bias zero --warmup-steps 0` and as the recorded sweep, docs/calibration/, was run) and
reports the held-out metrics, the spikes and the verdict.
It names, per preset, the largest learning rate that did not diverge, and overall the largest rate stable on
every preset ("edge") and the smallest rate that diverged on some preset ("onset"). Runs are cached like
`reproduce.py`'s, in `<out>/calibration/<dataset>/runs/`.

    TF_USE_LEGACY_KERAS=1 .venv/bin/python scripts/calibrate_lr.py --dataset movielens_100k
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any, Optional, Sequence

from experiments import paper_tables
from experiments.flags import check_choices, comma_list
from experiments.records import format_duration, write_json_atomically
from experiments.runs import DATASETS, MODELS, preset_widths, run_all, run_config

DEFAULT_LEARNING_RATES = "0.005,0.01,0.02,0.04,0.08,0.16,0.32"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parses and checks the command line.

    Raises:
        ValueError: A flag's value is out of range; the message names the flag and the value.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="movielens_100k", help=f"one of {sorted(DATASETS)}")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--learning-rates", default=DEFAULT_LEARNING_RATES, help="comma-separated rates to sweep")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1 / 16)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument("--eval-examples", type=int, default=0)
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    args.models = comma_list(args.models)
    check_choices("--dataset", [args.dataset], DATASETS)
    check_choices("--models", args.models, MODELS)
    try:
        args.learning_rates = sorted(float(value) for value in comma_list(args.learning_rates))
    except ValueError:
        raise ValueError(f"--learning-rates must be comma-separated numbers, got {args.learning_rates!r}") from None
    if not args.learning_rates or min(args.learning_rates) <= 0:
        raise ValueError(f"--learning-rates must be positive numbers, got {args.learning_rates}")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if not args.scale > 0:
        raise ValueError(f"--scale must be > 0, got {args.scale}")
    return args


def sweep_configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One naive-Adagrad run per (preset, learning rate, seed), as `experiments.runs.run_config` makes them.

    The rate enters as the multiplier of a base rate of 1 (the records' `lr_multiplier` is the rate itself). Output
    biases start at zero and there is no warm-up: the setup 1x was calibrated with.
    """
    settings = argparse.Namespace(
        dataset=args.dataset, scale=args.scale, batch_size=args.batch_size, train_steps=args.train_steps,
        eval_examples=args.eval_examples, base_learning_rate=1.0, rollback_lr_factor=1.0, output_bias="zero",
    )
    return [
        run_config(settings, model, "naive", {}, rate, seed, warmup=0)
        for model in args.models
        for rate in args.learning_rates
        for seed in range(args.seeds)
    ]


def largest_stable(records: Sequence[dict[str, Any]], model: Optional[str] = None) -> Optional[float]:
    """The largest rate below which no run (of `model`, or of any preset) diverged; None if the smallest did."""
    rates = sorted({record["config"]["learning_rate"] for record in records})
    stable = None
    for rate in rates:
        runs = [r for r in records if r["config"]["learning_rate"] == rate and model in (None, r["config"]["model"])]
        if any(run["verdict"]["diverged"] for run in runs):
            break
        stable = rate
    return stable


def sweep_table(records: Sequence[dict[str, Any]], models: Sequence[str]) -> str:
    """Markdown: rows learning rate, one column per preset with mean AUC, final loss, spikes and verdict."""
    rates = sorted({record["config"]["learning_rate"] for record in records})
    header = ["lr", *(paper_tables.MODEL_TITLES[model] for model in models)]
    rows = []
    for rate in rates:
        row = [f"{rate:g}"]
        for model in models:
            runs = [r for r in records if r["config"]["learning_rate"] == rate and r["config"]["model"] == model]
            diverged = sum(run["verdict"]["diverged"] for run in runs)
            auc = sum(paper_tables.selection_score(run["metrics"]) for run in runs) / len(runs)
            final_loss = sum(run["losses"][-1] for run in runs) / len(runs)
            micro = sum(run["verdict"]["micro_divergences"] for run in runs)
            full = sum(run["verdict"]["full_divergences"] for run in runs)
            row.append(f"AUC {100 * auc:.2f}, last loss {final_loss:.3g}, {micro} micro / {full} full, "
                       f"{'**diverged**' if diverged else 'stable'} ({diverged}/{len(runs)})")
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def main(argv: Sequence[str]) -> int:
    try:
        args = parse_args(argv)
    except ValueError as error:
        print(f"calibrate_lr.py: error: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    out = pathlib.Path(args.out) / "calibration" / args.dataset
    splits = DATASETS[args.dataset].load()
    records = run_all(sweep_configs(args), splits, out / "runs")
    edge = largest_stable(records)
    diverging = sorted(r["config"]["learning_rate"] for r in records if r["verdict"]["diverged"])
    lines = [
        f"# Naive Adagrad learning-rate sweep on {args.dataset}",
        "",
        f"- Command: `{' '.join(['scripts/calibrate_lr.py', *argv])}`",
        f"- Presets scaled by {args.scale:g}: {preset_widths(args.scale, args.models)}; batch "
        f"{args.batch_size}; {args.seeds} seed(s); "
        f"wall time {format_duration(time.perf_counter() - started)}",
        "",
        sweep_table(records, args.models),
        *(f"- Largest stable rate, {paper_tables.MODEL_TITLES[m]}: {largest_stable(records, m)}" for m in args.models),
        f"- Edge (largest rate stable on every preset): {edge}",
        f"- Onset (smallest rate that diverged on some preset): {diverging[0] if diverging else None}",
        "",
    ]
    write_json_atomically(out / "sweep.json", [
        {key: value for key, value in record.items() if key != "clipping_factors"} for record in records
    ])
    (out / "sweep.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    print(f"wrote {out / 'sweep.md'} and {out / 'sweep.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
