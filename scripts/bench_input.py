"""Input-pipeline throughput against the training throughput of the Large+DCN ranker on the same data.

For each dataset and shuffle window, reads the training pipeline alone (`tfrs_clippy.data.make_pipeline`, batched,
prefetched, nothing consuming but a Python loop) and reports examples/s. Then trains the paper's Large+DCN ranker
(`models.build_ranker(spec, "large_dcn")`, Adagrad) for a few steps on batches of the same data, cached in memory
so that only the model is timed, and reports its examples/s and the ratio. The input must be >= 5x faster: the
script exits with status 1, naming each pipeline below the target, if any measured ratio is lower.

Run under Keras 2 (the rankers need TFRS):

    TF_USE_LEGACY_KERAS=1 .venv/bin/python scripts/bench_input.py [--datasets movielens_100k ...] [--out DIR]

Writes DIR/bench_input.json and DIR/bench_input.md (default DIR: results/bench_input/), and the Markdown report,
with the command line that made it, also to --docs (default docs/bench_input.md).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shlex
import sys
import time
from typing import Any, Callable

import tensorflow as tf

from tfrs_clippy import data
from tfrs_clippy.keras_runtime import LEGACY_KERAS, keras

REQUIRED_RATIO = 5.0


def load_dataset(name: str, synthetic_examples: int) -> data.Splits:
    """The dataset called `name`; the synthetic one with `synthetic_examples` training examples."""
    loaders: dict[str, Callable[[], data.Splits]] = {
        "movielens_100k": data.movielens_100k,
        "census_income": data.census_income,
        "synthetic": lambda: data.synthetic(num_train=synthetic_examples, num_test=0),
    }
    return loaders[name]()


def input_throughput(splits: data.Splits, batch_size: int, shuffle_window: int) -> tuple[float, int]:
    """Examples/s of one pass of the training pipeline, and the number of examples read.

    The first batch is read before the clock starts: it includes building the pipeline's graph.
    """
    batches = iter(data.make_pipeline(splits.train, batch_size, shuffle_window=shuffle_window, seed=0))
    next(batches)
    examples, start = 0, time.perf_counter()
    for _, labels in batches:
        examples += int(tf.shape(next(iter(labels.values())))[0])
    return examples / (time.perf_counter() - start), examples


class _StepTimer(keras.callbacks.Callback):
    """Wall time at the end of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_end_times: list[float] = []

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.batch_end_times.append(time.perf_counter())


def model_throughput(
    splits: data.Splits, batch_size: int, warmup_steps: int, timed_steps: int, scale: float
) -> dict[str, Any]:
    """Training examples/s of the Large+DCN ranker with Adagrad on the first batches of the training split.

    The batches are cached in memory first, so the input pipeline does not count. The first `warmup_steps` steps
    (graph tracing, first sparse updates) are not timed.

    Returns:
        {"examples_per_second": float, "steps": int, "parameters": int} or, when the rankers cannot be
        built in this runtime, {"examples_per_second": None, "not_measured": reason}.
    """
    if not LEGACY_KERAS:
        return {"examples_per_second": None, "not_measured": "the rankers need Keras 2: set TF_USE_LEGACY_KERAS=1"}
    import tfrs_clippy_models as models  # pylint: disable=import-outside-toplevel  # imports TFRS, which needs Keras 2

    keras.utils.set_random_seed(0)
    model = models.build_ranker(splits.spec, models.RankerConfig.preset("large_dcn", scale=scale))
    model.compile(optimizer=keras.optimizers.Adagrad(learning_rate=0.05))
    steps = warmup_steps + timed_steps
    batches = data.make_pipeline(splits.train, batch_size, drop_remainder=True).take(steps).cache()
    for _ in batches:  # fills the cache
        pass
    timer = _StepTimer()
    model.fit(batches, epochs=1, verbose=0, callbacks=[timer])
    if len(timer.batch_end_times) < steps:
        raise ValueError(f"{splits.name}: only {len(timer.batch_end_times)} full batches, need {steps}.")
    seconds = timer.batch_end_times[-1] - timer.batch_end_times[warmup_steps - 1]
    return {
        "examples_per_second": timed_steps * batch_size / seconds,
        "steps": timed_steps,
        "parameters": model.parameter_counts().total,
    }


def below_target(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows whose measured input/model ratio is below `REQUIRED_RATIO` (unmeasured rows are not judged)."""
    return [row for row in rows if row["ratio"] is not None and row["ratio"] < REQUIRED_RATIO]


def markdown_report(rows: list[dict[str, Any]], report: dict[str, Any], command: str) -> str:
    """The Markdown report: how it was made (command, options, machine), the table and the verdict."""
    failing = below_target(rows)
    measured = [row for row in rows if row["ratio"] is not None]
    if not measured:
        verdict = f"The {REQUIRED_RATIO:g}x target was not checked: the model throughput was not measured."
    elif failing:
        names = ", ".join(f"{row['dataset']} (window {row['shuffle_window']}, {row['ratio']:.1f}x)" for row in failing)
        verdict = f"**Below the {REQUIRED_RATIO:g}x target:** {names}."
    else:
        verdict = f"Every measured pipeline is at least {REQUIRED_RATIO:g}x faster than training."
    machine = report["machine"]
    return (
        "# Input pipeline vs Large+DCN training throughput\n\n"
        f"Generated by `{command}` (batch size {report['batch_size']}, {report['warmup_steps']} untimed and "
        f"{report['model_steps']} timed model steps, Large+DCN at scale {report['model_scale']:g}, "
        f"{report['optimizer']}; {report['synthetic_examples']:,} synthetic training examples) with Keras "
        f"{report['keras']}, TensorFlow {report['tensorflow']}, on {machine['processor']} with {machine['cpus']} "
        "CPUs shared with other jobs.\n\n"
        + markdown_table(rows)
        + f"\n{verdict}\n"
    )


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| dataset | shuffle window | input examples/s | Large+DCN train examples/s | input / model | >= 5x |",
        "|---|---:|---:|---:|---:|:---:|",
    ]
    for row in rows:
        if row["model_examples_per_second"] is None:
            model_columns = "not measured | - | -"
        else:
            passed = "yes" if row["ratio"] >= REQUIRED_RATIO else "NO"
            model_columns = f"{row['model_examples_per_second']:,.0f} | {row['ratio']:.1f}x | {passed}"
        lines.append(
            f"| {row['dataset']} | {row['shuffle_window']} | {row['input_examples_per_second']:,.0f} | "
            f"{model_columns} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    """Runs the benchmark, writes the reports; returns 1 if a measured input/model ratio is below the target."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = ["movielens_100k", "census_income", "synthetic"]
    parser.add_argument("--datasets", nargs="+", default=names, choices=names)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument(
        "--shuffle-windows", type=int, nargs="+", default=[0, 4096], help="windows measured (0: exact time order)"
    )
    parser.add_argument(
        "--synthetic-examples", type=int, default=1_000_000, help="training examples of the synthetic stream"
    )
    parser.add_argument("--warmup-steps", type=int, default=5, help="model steps not timed (>= 1)")
    parser.add_argument("--model-steps", type=int, default=30, help="model steps timed")
    parser.add_argument(
        "--model-scale", type=float, default=1.0, help="RankerConfig.scale of Large+DCN; 1.0: the 4096 x 4 bottom"
    )
    parser.add_argument("--skip-model", action="store_true", help="measure the input pipelines only")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/bench_input"))
    parser.add_argument(
        "--docs", type=pathlib.Path, default=pathlib.Path("docs/bench_input.md"), help="copy of the Markdown report"
    )
    args = parser.parse_args()

    rows = []
    for name in args.datasets:
        splits = load_dataset(name, args.synthetic_examples)
        if args.skip_model:
            model = {"examples_per_second": None, "not_measured": "--skip-model"}
        else:
            model = model_throughput(splits, args.batch_size, args.warmup_steps, args.model_steps, args.model_scale)
        for window in args.shuffle_windows:
            speed, examples = input_throughput(splits, args.batch_size, window)
            model_speed = model["examples_per_second"]
            row = {
                "dataset": name,
                "shuffle_window": window,
                "input_examples": examples,
                "input_examples_per_second": speed,
                "model_examples_per_second": model_speed,
                "ratio": speed / model_speed if model_speed else None,
                "model": model,
            }
            rows.append(row)
            if model_speed is None:
                model_text = f"model throughput not measured ({model['not_measured']})"
            else:
                model_text = f"Large+DCN {model_speed:,.0f} ex/s, input/model {row['ratio']:.1f}x"
            print(f"{name:15s} window {window:5d}: input {speed:10,.0f} ex/s ({examples:,} examples); {model_text}")

    report = {
        "batch_size": args.batch_size,
        "warmup_steps": args.warmup_steps,
        "model_steps": args.model_steps,
        "synthetic_examples": args.synthetic_examples,
        "model_preset": "large_dcn",
        "model_scale": args.model_scale,
        "optimizer": "Adagrad(0.05)",
        "keras": keras.__version__,
        "tensorflow": tf.__version__,
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "rows": rows,
    }
    command = shlex.join(["scripts/bench_input.py", *sys.argv[1:]])
    markdown = markdown_report(rows, report, command)
    args.out.mkdir(parents=True, exist_ok=True)
    args.docs.parent.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_input.json").write_text(json.dumps(report, indent=2) + "\n")
    for path in (args.out / "bench_input.md", args.docs):
        path.write_text(markdown)
    print(f"wrote {args.out / 'bench_input.json'}, {args.out / 'bench_input.md'} and {args.docs}")
    failing = below_target(rows)
    for row in failing:
        print(
            f"FAILED: {row['dataset']} (shuffle window {row['shuffle_window']}): input {row['ratio']:.1f}x the "
            f"Large+DCN training throughput, the target is >= {REQUIRED_RATIO:g}x.",
            file=sys.stderr,
        )
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
