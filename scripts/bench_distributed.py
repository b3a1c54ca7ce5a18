"""Training examples/s of a ranker on 1 and 2 replicas (MirroredStrategy on logical CPUs), per optimizer.

Each configuration runs in its own process (logical devices must be set before TensorFlow starts) with the
flags of scripts/train.py, at the same global batch: epoch 1 compiles and warms up, epoch 2 is timed.

    .venv/bin/python scripts/bench_distributed.py [--methods clippy naive] [--out DIR]

Writes DIR/bench_distributed.json and DIR/bench_distributed.md (default DIR: results/bench_distributed/).
On a host with one CPU socket, 2 logical CPUs share the same cores: the numbers measure the strategy's overhead
(splitting the batch, all-reducing the gradients), not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from typing import Optional

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_FLAGS = [
    "--dataset", "synthetic", "--synthetic-examples", "32768", "--synthetic-vocabulary", "1000,10000,100000",
    "--preset", "small", "--scale", "0.25", "--batch-size", "1024", "--learning-rate", "0.05", "--verbose", "0",
]
REPLICA_FLAGS = {1: ["--strategy", "default"], 2: ["--strategy", "mirrored", "--virtual-cpus", "2"]}


def measure(argv: list[str]) -> dict:
    """In this (child) process: trains 2 epochs with train.py's pieces; examples/s of the second."""
    # Here, not at the top: the parent process needs no TensorFlow (its children get TF_USE_LEGACY_KERAS=1).
    # pylint: disable=import-outside-toplevel
    from tfrs_clippy.keras_runtime import keras

    from experiments.run_setup import build_model_and_optimizer, load_splits, training_input
    from experiments.strategies import make_strategy
    from experiments.train_flags import parse_args

    args = parse_args(argv)
    strategy = make_strategy(args)
    splits = load_splits(args)
    model, _ = build_model_and_optimizer(args, splits.spec, strategy)
    steps = int(splits.train.cardinality()) // args.batch_size
    times: list[float] = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: Optional[dict] = None) -> None:
            times.append(time.perf_counter())

        def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
            times.append(time.perf_counter())

    args.epochs = 2
    model.fit(training_input(args, strategy, 0), epochs=2, steps_per_epoch=steps, callbacks=[EpochTimer()],
              verbose=0)
    return {"replicas": strategy.num_replicas_in_sync, "steps": steps,
            "examples_per_second": steps * args.batch_size / (times[3] - times[2])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["naive", "clippy"])
    parser.add_argument("--out", default=str(ROOT / "results" / "bench_distributed"))
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child)))
        return
    rows = []
    for method in args.methods:
        for replicas, flags in REPLICA_FLAGS.items():
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_USE_LEGACY_KERAS="1")
            process = subprocess.run(
                [sys.executable, __file__, "--child", *TRAIN_FLAGS, "--method", method, *flags],
                env=env, capture_output=True, text=True, timeout=600, check=False,
            )
            if process.returncode:
                raise RuntimeError(f"{method} on {replicas} replica(s) failed:\n{process.stderr[-3000:]}")
            result = json.loads(process.stdout.strip().splitlines()[-1])
            rows.append({"method": method, **result})
            print(rows[-1], flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "train_flags": TRAIN_FLAGS,
              "rows": rows}
    (out / "bench_distributed.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    lines = ["| method | replicas | examples/s | vs 1 replica |", "|---|---|---|---|"]
    for row in rows:
        single = next(r for r in rows if r["method"] == row["method"] and r["replicas"] == 1)
        lines.append(f"| {row['method']} | {row['replicas']} | {row['examples_per_second']:,.0f} | "
                     f"{row['examples_per_second'] / single['examples_per_second']:.2f}x |")
    (out / "bench_distributed.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
