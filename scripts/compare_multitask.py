"""Compares multitask balancing on MMoE and PLE rankers: plain, uncertainty, Nash-MTL, PUB (issue 9).

For every dataset (Census-Income: income_50k, never_married; MovieLens-100K: rating, like, love), backbone (MMoE,
PLE) and variant, trains `--seeds` seeds of the "small" preset scaled by `--scale` for `--epochs` passes, then
evaluates on the test split. Variants (base optimizer in brackets):

    plain (Adam)                      the sum of the task losses: TFRS's own train step
    uncertainty (Adam)                Kendall et al. 2018
    nash_mtl (Adam)                   Nash bargaining on the task gradients
    pub (Adam)                        PUB, alpha normalized to sum to K (the library default)
    pub_nash_scale (Adam)             PUB, alpha as the bargaining solution itself
    plain_clippy (ClippyAdagrad)      the sum of the task losses, ClippyAdagrad.from_paper
    pub_clippy (ClippyAdagrad)        PUB whose candidate updates are Clippy-clipped Adagrad updates
    pub_clippy_combined (ClippyAdagrad)   PUB on unclipped Adagrad candidates, Clippy applied once to the move
    plain_clippy_adam (ClippyAdam)    the sum of the task losses, ClippyAdam (the paper's thresholds)
    pub_clippy_adam (ClippyAdam)      PUB whose candidate updates are Clippy-clipped Adam updates
    pub_clippy_adam_combined (ClippyAdam)  PUB on unclipped Adam candidates, Clippy applied once to the move

ClippyAdam runs at `--clippy-adam-learning-rate` (default Adam's 1e-3). Its rule bounds a coordinate's move by
0.5 |w| + 1e-2, and an Adam step is at most ~7.3 lr per coordinate, so below lr ~1.4e-3 the rule cannot fire on
a single step: there plain_clippy_adam is Adam and pub_clippy_adam is pub, and only the "combined" variant, whose
balanced move can reach K times a step, can be clipped. Pass e.g. 1e-2 for a rate where the rule fires.

Reported per run: test AUC per binary task and their mean, test RMSE of regression tasks, and the median wall time
of a training step (after the first 5). Writes a JSON of every run and a Markdown table of mean +- std over seeds,
with step times relative to `plain` on the same dataset and backbone, headed by the command and commit.

    TF_USE_LEGACY_KERAS=1 .venv/bin/python scripts/compare_multitask.py --out docs/pub_results
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shlex
import statistics
import sys
import time
from typing import Any, Callable

import tensorflow as tf

import tfrs_clippy
import tfrs_clippy_models as models
from tfrs_clippy.data import census_income, make_pipeline, movielens_100k
from tfrs_clippy.keras_runtime import keras

DATASETS: dict[str, Callable[[], Any]] = {"census_income": census_income, "movielens_100k": movielens_100k}
BACKBONES = ("mmoe", "ple")
REPOSITORY = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Variant:
    """A training recipe: the base optimizer and the ranker's `multitask_balancing` (None: the summed loss)."""

    name: str
    optimizer: str  # a key of OPTIMIZERS
    balancing: dict[str, Any] | None


VARIANTS = (
    Variant("plain", "adam", None),
    Variant("uncertainty", "adam", {"method": "uncertainty"}),
    Variant("nash_mtl", "adam", {"method": "nash_mtl"}),
    Variant("pub", "adam", {"method": "pub"}),
    Variant("pub_nash_scale", "adam", {"method": "pub", "alpha_scaling": "nash"}),
    Variant("plain_clippy", "clippy", None),
    Variant("pub_clippy", "clippy", {"method": "pub"}),
    Variant("pub_clippy_combined", "clippy", {"method": "pub", "clip": "combined"}),
    Variant("plain_clippy_adam", "clippy_adam", None),
    Variant("pub_clippy_adam", "clippy_adam", {"method": "pub"}),
    Variant("pub_clippy_adam_combined", "clippy_adam", {"method": "pub", "clip": "combined"}),
)

OPTIMIZERS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "adam": lambda args: keras.optimizers.Adam(args.adam_learning_rate),
    "clippy": lambda args: tfrs_clippy.ClippyAdagrad.from_paper(args.clippy_learning_rate),
    "clippy_adam": lambda args: tfrs_clippy.ClippyAdam(args.clippy_adam_learning_rate),
}
"""The base optimizers, from the command line's learning rates."""


class StepTimer(keras.callbacks.Callback):
    """Wall time of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_begin(self, batch, logs=None) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def commit() -> str:
    """The checked-out commit, read from .git (the run may have uncommitted changes on top), or "unknown"."""
    git = REPOSITORY / ".git"
    try:
        head = (git / "HEAD").read_text(encoding="utf-8").strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head.removeprefix("ref: ")
        if (git / ref).exists():
            return (git / ref).read_text(encoding="utf-8").strip()[:12]
        for line in (git / "packed-refs").read_text(encoding="utf-8").splitlines():
            if line.endswith(" " + ref):
                return line.split()[0][:12]
    except OSError:
        pass
    return "unknown"


def run(splits, backbone: str, variant: Variant, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Trains and evaluates one model; returns its metrics and median step time."""
    keras.utils.set_random_seed(seed)
    config = models.RankerConfig.preset(
        "small", bottom=backbone, scale=args.scale, multitask_balancing=variant.balancing
    )
    model = models.build_ranker(splits.spec, config)
    model.compile(optimizer=OPTIMIZERS[variant.optimizer](args))
    train = make_pipeline(splits.train, args.batch_size, shuffle_window=args.shuffle_window, seed=seed,
                          epochs=args.epochs)
    timer = StepTimer()
    history = model.fit(train, verbose=0, callbacks=[timer])
    results = model.evaluate(make_pipeline(splits.test, 4096), verbose=0, return_dict=True)
    tasks = splits.spec.tasks
    auc = {task.name: float(results[f"{task.name}_auc"]) for task in tasks if task.kind == "binary"}
    rmse = {task.name: float(results[f"{task.name}_rmse"]) for task in tasks if task.kind == "regression"}
    final_weights = {key: float(values[-1]) for key, values in history.history.items() if key.startswith("weight_")}
    return {
        "backbone": backbone,
        "variant": variant.name,
        "seed": seed,
        "auc": auc,
        "mean_auc": statistics.fmean(auc.values()),
        "rmse": rmse,
        "steps": len(timer.seconds),
        "median_step_seconds": statistics.median(timer.seconds[5:]),
        "final_weights": final_weights,
    }


def mean_std(values: list[float], digits: int = 4) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def markdown_table(dataset: str, runs: list[dict[str, Any]]) -> str:
    """Mean +- std over seeds per (backbone, variant); step time relative to plain."""
    binary = sorted(runs[0]["auc"])
    regression = sorted(runs[0]["rmse"])
    header = (["backbone", "variant"] + [f"AUC {t}" for t in binary] + ["mean AUC"] + [f"RMSE {t}" for t in regression]
              + ["step time vs plain"])
    lines = [f"**{dataset}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for backbone in BACKBONES:
        plain_times = [r["median_step_seconds"] for r in runs if r["backbone"] == backbone and r["variant"] == "plain"]
        for variant in VARIANTS:
            group = [r for r in runs if r["backbone"] == backbone and r["variant"] == variant.name]
            if not group:
                continue
            cells = [backbone, variant.name]
            cells += [mean_std([r["auc"][t] for r in group]) for t in binary]
            cells.append(mean_std([r["mean_auc"] for r in group]))
            cells += [mean_std([r["rmse"][t] for r in group]) for t in regression]
            step_time = statistics.fmean(r["median_step_seconds"] for r in group)
            cells.append(f"{step_time / statistics.fmean(plain_times):.2f}x" if plain_times else "n/a")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--variants", nargs="+", default=[v.name for v in VARIANTS],
                        choices=[v.name for v in VARIANTS])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1 / 8)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--shuffle-window", type=int, default=8192)
    parser.add_argument("--adam-learning-rate", type=float, default=1e-3)
    parser.add_argument("--clippy-learning-rate", type=float, default=0.05, help="ClippyAdagrad's")
    parser.add_argument("--clippy-adam-learning-rate", type=float, default=1e-3,
                        help="ClippyAdam's (its rule cannot fire below ~1.4e-3; see above)")
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow intra- and inter-op threads")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/pub_results"))
    args = parser.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    variants = [v for v in VARIANTS if v.name in args.variants]
    command = "TF_USE_LEGACY_KERAS=1 .venv/bin/python " + shlex.join(["scripts/compare_multitask.py", *sys.argv[1:]])
    report: dict[str, Any] = {"command": command, "commit": commit(),
                              "settings": {k: str(v) if isinstance(v, pathlib.Path) else v
                                           for k, v in vars(args).items()}, "runs": {}}
    tables = [f"Generated by `{command}` at commit {report['commit']} (learning rates: Adam "
              f"{args.adam_learning_rate:g}, ClippyAdagrad {args.clippy_learning_rate:g}, ClippyAdam "
              f"{args.clippy_adam_learning_rate:g})."]
    total, done = len(args.datasets) * len(args.backbones) * len(variants) * args.seeds, 0
    for dataset in args.datasets:
        splits = DATASETS[dataset]()
        runs = []
        for backbone in args.backbones:
            for variant in variants:
                for seed in range(args.seeds):
                    start = time.perf_counter()
                    result = run(splits, backbone, variant, seed, args)
                    runs.append(result)
                    done += 1
                    print(f"[{done}/{total}] "
                          f"{dataset} {backbone} {variant.name} seed {seed}: mean AUC {result['mean_auc']:.4f} "
                          f"AUC {result['auc']} RMSE {result['rmse']} "
                          f"step {result['median_step_seconds'] * 1e3:.1f} ms "
                          f"({time.perf_counter() - start:.0f} s)", flush=True)
        report["runs"][dataset] = runs
        tables.append(markdown_table(dataset, runs))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text("\n\n".join(tables) + "\n", encoding="utf-8")
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
