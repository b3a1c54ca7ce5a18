"""Step time of ClippyAdagrad against Adagrad (Keras 2 and 3), TFRS's ClippyAdagrad and TensorFlow's fused kernels.

One run measures both Keras runtimes (each in its own subprocess, since the runtime is fixed when TensorFlow is
imported) and reports every time as a ratio to Keras 2 Adagrad on the same problem:

- sparse: one `IndexedSlices` step on a table of --rows x --dim (default 2,000,000 x 32) with --ids Zipf-distributed
  ids (default 4,096, with repeats), and the same on a table --large-factor times larger;
- dense: one step on the variables of an MLP of about 8.4M parameters (1024-2048-2048-1024), gradients given.

Only the optimizer step is timed (gradients are precomputed), inside a `tf.function`, median of --steps steps after
warm-up. Writes results/bench_optimizer/bench_optimizer.{json,md} (or --out).

    python scripts/bench_optimizer.py            # the README's table
    python scripts/bench_optimizer.py --quick    # a smaller, faster run
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Callable

PEER = ("keras2", "Adagrad")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="embedding table rows")
    parser.add_argument("--dim", type=int, default=32, help="embedding width")
    parser.add_argument("--ids", type=int, default=4096, help="ids per sparse step (Zipf, with repeats)")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the ids")
    parser.add_argument("--large-factor", type=int, default=10, help="the large table has this many times the rows")
    parser.add_argument("--mlp", type=str, default="1024,2048,2048,1024", help="dense MLP widths")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per case (median reported)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/bench_optimizer"))
    parser.add_argument("--quick", action="store_true", help="rows/10, large factor 4, 10 steps")
    parser.add_argument("--worker", choices=["keras2", "keras3"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.large_factor, args.steps, args.warmup = args.rows // 10, 4, 10, 3
    for name in ("rows", "dim", "ids", "large_factor", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Worker: runs in a process whose Keras runtime is fixed, prints one JSON line per case.


def run_worker(args: argparse.Namespace) -> None:
    import numpy as np
    import tensorflow as tf

    import tfrs_clippy

    keras = tfrs_clippy.keras
    rng = np.random.default_rng(0)

    def zipf_batches(rows: int, count: int = 8):
        ranks = np.arange(1, rows + 1, dtype=np.float64)
        probabilities = ranks ** -args.zipf
        cdf = np.cumsum(probabilities / probabilities.sum())
        batches = []
        for _ in range(count):
            ids = np.minimum(np.searchsorted(cdf, rng.random(args.ids)), rows - 1)
            values = rng.normal(size=(args.ids, args.dim)).astype(np.float32)
            batches.append((tf.constant(values), tf.constant(ids, tf.int64)))
        return batches

    def time_steps(step: Callable, inputs) -> float:
        for i in range(args.warmup):
            step(*inputs[i % len(inputs)]).numpy()
        times = []
        for i in range(args.steps):
            start = time.perf_counter()
            step(*inputs[i % len(inputs)]).numpy()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    def report(case: str, optimizer_name: str, milliseconds: float, **extra) -> None:
        print(json.dumps(dict(runtime=args.worker, case=case, optimizer=optimizer_name, ms=milliseconds, **extra)),
              flush=True)

    def sparse_case(case: str, rows: int, name: str, make_optimizer: Callable) -> None:
        table = tf.Variable(tf.random.normal((rows, args.dim), stddev=0.05), name="table")
        optimizer = make_optimizer()
        dense_shape = tf.constant([rows, args.dim], tf.int64)

        @tf.function
        def step(values, indices):
            optimizer.apply_gradients([(tf.IndexedSlices(values, indices, dense_shape), table)])
            return optimizer.iterations

        report(case, name, time_steps(step, zipf_batches(rows)), rows=rows)

    def dense_case(name: str, make_optimizer: Callable) -> None:
        widths = [int(w) for w in args.mlp.split(",")]
        variables = [tf.Variable(tf.random.normal((a, b), stddev=0.02)) for a, b in zip(widths, widths[1:])]
        variables += [tf.Variable(tf.zeros((b,))) for b in widths[1:]]
        parameters = sum(int(np.prod(v.shape)) for v in variables)
        grads = [[tf.random.normal(v.shape, stddev=1e-2) for v in variables] for _ in range(4)]
        optimizer = make_optimizer()

        @tf.function
        def step(*gradients):
            optimizer.apply_gradients(zip(gradients, variables))
            return optimizer.iterations

        report("dense", name, time_steps(step, grads), parameters=parameters)

    clippy = lambda **kw: (lambda: tfrs_clippy.ClippyAdagrad(learning_rate=0.1, **kw))
    adagrad = lambda: keras.optimizers.Adagrad(learning_rate=0.1)
    optimizers = {"ClippyAdagrad": clippy(), "Adagrad": adagrad}
    if args.worker == "keras2":
        from tensorflow_recommenders.experimental.optimizers import ClippyAdagrad as TfrsClippyAdagrad

        optimizers["TFRS ClippyAdagrad"] = lambda: TfrsClippyAdagrad(learning_rate=0.1)

    for name, make in optimizers.items():
        sparse_case("sparse", args.rows, name, make)
    large_rows = args.rows * args.large_factor
    # Keras 3's Adagrad densifies and TFRS's reads the whole table: at 10x they only repeat what the small table shows.
    for name in ("ClippyAdagrad", "Adagrad") if args.worker == "keras2" else ("ClippyAdagrad",):
        sparse_case("sparse_large", large_rows, name, optimizers[name])
    for name, make in optimizers.items():
        dense_case(name, make)
    dense_case("ClippyAdagrad (unfused)", clippy(fuse_dense_updates=False))
    if args.worker == "keras2":
        run_fused_kernels(args, sparse_case_rows=args.rows, report=report, time_steps=time_steps,
                          zipf_batches=zipf_batches)


def run_fused_kernels(args, sparse_case_rows, report, time_steps, zipf_batches) -> None:
    """TensorFlow's own one-kernel Adagrad updates: the floor any Python-level optimizer is measured against."""
    import tensorflow as tf

    table = tf.Variable(tf.random.normal((sparse_case_rows, args.dim), stddev=0.05))
    accumulator = tf.Variable(tf.fill((sparse_case_rows, args.dim), 0.1))

    @tf.function
    def sparse_step(values, indices):
        unique, positions = tf.unique(indices)
        summed = tf.math.unsorted_segment_sum(values, positions, tf.shape(unique)[0])
        tf.raw_ops.ResourceSparseApplyAdagradV2(var=table.handle, accum=accumulator.handle, lr=0.1, epsilon=1e-7,
                                                grad=summed, indices=unique)
        return tf.shape(unique)[0]

    report("sparse", "fused kernel (ResourceSparseApplyAdagradV2)", time_steps(sparse_step, zipf_batches(args.rows)),
           rows=sparse_case_rows)
    widths = [int(w) for w in args.mlp.split(",")]
    variables = [tf.Variable(tf.random.normal((a, b), stddev=0.02)) for a, b in zip(widths, widths[1:])]
    variables += [tf.Variable(tf.zeros((b,))) for b in widths[1:]]
    accumulators = [tf.Variable(tf.fill(v.shape, 0.1)) for v in variables]
    grads = [[tf.random.normal(v.shape, stddev=1e-2) for v in variables] for _ in range(4)]

    @tf.function
    def dense_step(*gradients):
        for variable, accumulator_variable, gradient in zip(variables, accumulators, gradients):
            tf.raw_ops.ResourceApplyAdagradV2(var=variable.handle, accum=accumulator_variable.handle, lr=0.1,
                                              epsilon=1e-7, grad=gradient)
        return tf.constant(0)

    report("dense", "fused kernel (ResourceApplyAdagradV2)", time_steps(dense_step, grads))


# ---------------------------------------------------------------------------------------------------------------
# Driver: one worker per runtime, then ratios, JSON and a Markdown table.


def run_runtime(runtime: str, argv: list[str]) -> list[dict]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_USE_LEGACY_KERAS", None)
    if runtime == "keras2":
        env["TF_USE_LEGACY_KERAS"] = "1"
    print(f"[bench] {runtime}: running ...", flush=True)
    process = subprocess.run([sys.executable, __file__, *argv, "--worker", runtime], env=env, capture_output=True,
                             text=True, check=False)
    records = [json.loads(line) for line in process.stdout.splitlines() if line.startswith("{")]
    if process.returncode != 0:
        raise RuntimeError(f"the {runtime} worker failed:\n{process.stderr[-3000:]}")
    for record in records:
        print(f"[bench] {runtime:6s} {record['case']:12s} {record['optimizer']:45s} {record['ms']:9.2f} ms", flush=True)
    return records


def table(records: list[dict]) -> str:
    peer = {r["case"]: r["ms"] for r in records if (r["runtime"], r["optimizer"]) == PEER}
    lines = [
        "| case | runtime | optimizer | ms / step | x Keras 2 Adagrad |",
        "|---|---|---|---:|---:|",
    ]
    for r in records:
        ratio = r["ms"] / peer[r["case"]] if r["case"] in peer else float("nan")
        lines.append(f"| {r['case']} | {r['runtime']} | {r['optimizer']} | {r['ms']:.2f} | {ratio:.2f} |")
    return "\n".join(lines)


def summary(records: list[dict]) -> dict:
    """The issue's targets, as ratios measured in this run."""
    ms = {(r["runtime"], r["case"], r["optimizer"]): r["ms"] for r in records}
    get = lambda runtime, case, name: ms.get((runtime, case, name), float("nan"))
    result = {}
    for runtime in ("keras2", "keras3"):
        ours_sparse = get(runtime, "sparse", "ClippyAdagrad")
        result[runtime] = {
            "sparse_vs_keras2_adagrad": ours_sparse / get("keras2", "sparse", "Adagrad"),
            "tfrs_sparse_vs_ours": get("keras2", "sparse", "TFRS ClippyAdagrad") / ours_sparse,
            "large_table_vs_table": get(runtime, "sparse_large", "ClippyAdagrad") / ours_sparse,
            "dense_vs_keras2_adagrad": get(runtime, "dense", "ClippyAdagrad") / get("keras2", "dense", "Adagrad"),
            "dense_unfused_vs_keras2_adagrad": get(runtime, "dense", "ClippyAdagrad (unfused)")
            / get("keras2", "dense", "Adagrad"),
            "dense_vs_fused_kernel": get(runtime, "dense", "ClippyAdagrad")
            / get("keras2", "dense", "fused kernel (ResourceApplyAdagradV2)"),
        }
    result["keras2"]["tfrs_dense_vs_keras2_adagrad"] = get("keras2", "dense", "TFRS ClippyAdagrad") / get(
        "keras2", "dense", "Adagrad")
    return result


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    started = time.time()
    records = run_runtime("keras2", argv) + run_runtime("keras3", argv)
    markdown = table(records)
    targets = summary(records)
    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "worker")}
    (args.out / "bench_optimizer.json").write_text(
        json.dumps({"config": config, "records": records, "ratios": targets, "seconds": time.time() - started},
                   indent=2))
    (args.out / "bench_optimizer.md").write_text(markdown + "\n")
    print(markdown)
    print(json.dumps(targets, indent=2))
    print(f"[bench] wrote {args.out}/bench_optimizer.json and .md in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
