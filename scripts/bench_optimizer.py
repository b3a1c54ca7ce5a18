"""Step time of ClippyAdagrad and ClippyAdam against their references, in both Keras runtimes, side by side.

One run measures both Keras runtimes (each in its own subprocess, since the runtime is fixed when TensorFlow is
imported). Every case is a *group* of variants measured in one process in interleaved rounds (each round runs
every variant for --steps steps, in a shuffled order; a variant's time is the median over rounds of its per-round
median), and each variant is reported as the median over rounds of its ratio to the group's named reference in
the same round. The groups:

- dense: one step on the variables of an MLP (default 1024-2048-2048-1024, 8.4M parameters), gradients given;
  reference TensorFlow's fused `ResourceApplyAdagradV2` kernel. Also Keras's Adagrad, our plain
  `tfrs_clippy.Adagrad`, ClippyAdagrad without XLA, and (Keras 2) TFRS's ClippyAdagrad.
- sparse: one `IndexedSlices` step on a --rows x --dim table (default 2,000,000 x 32) with --ids Zipf ids (default
  4,096, with repeats); reference `tf.unique` + segment sum + the fused `ResourceSparseApplyAdagradV2` kernel.
  Also `tfrs_clippy.Adagrad` (Keras 3's own Adagrad densifies the gradient: a full-table pass) and Keras's.
- sparse_scaling (Keras 2; the step is the same code in both runtimes): ClippyAdagrad on the table and on one
  10x larger (--dim wide), and on a --narrow-dim table and one 100x larger (100x at --dim would not fit in 24 GB).
- adam_dense / adam_sparse (issue #19): ClippyAdam (sparse: sparse_updates "dense" and "lazy") vs Keras's Adam.
- train_step (Keras 2, the rankers' runtime): a whole Keras train step of each ranker preset (Small, Large,
  Large+DCN at --scale) on MovieLens-100K batches of --batch, ClippyAdagrad.from_paper(exclude_from_clipping=
  ["embedding"]) and our `tfrs_clippy.Adagrad` vs Keras's Adagrad; with each optimizer's state size and the
  process's resident-memory growth when its model was built and warmed up.

Writes bench_optimizer.{json,md} to --out (default results/bench_optimizer): the command, the commit, the machine
load before and after, every record, and each target of issue #14 met or missed by how much.

    python scripts/bench_optimizer.py            # the committed table (docs/bench_optimizer.md)
    python scripts/bench_optimizer.py --quick    # a small smoke run (~4 min on a loaded 2-core machine)
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import time
from typing import Callable

from experiments.records import REPOSITORY as REPO
from experiments.records import commit
from experiments.timing import interleaved

DENSE_REFERENCE = "fused kernel (ResourceApplyAdagradV2)"
SPARSE_REFERENCE = "fused kernel + dedup (ResourceSparseApplyAdagradV2)"
TARGETS = {  # (group, variant, runtime or None for every runtime that has it): the largest ratio allowed
    "dense ClippyAdagrad <= 2.0x fused kernel": ("dense", "ClippyAdagrad", 2.0),
    "sparse ClippyAdagrad <= 1.05x fused kernel + dedup": ("sparse", "ClippyAdagrad", 1.05),
    "sparse 10x table <= 1.1x base table": ("sparse_scaling", "ClippyAdagrad, 10x rows", 1.1),
    "sparse 100x table <= 1.1x base table": ("sparse_scaling", "ClippyAdagrad, 100x rows (narrow)", 1.1),
    "Large+DCN train step: ClippyAdagrad <= 1.03x Keras Adagrad": ("train_step large_dcn", "ClippyAdagrad.from_paper",
                                                                   1.03),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="embedding table rows")
    parser.add_argument("--dim", type=int, default=32, help="embedding width")
    parser.add_argument("--narrow-dim", type=int, default=2, help="width of the 100x scaling tables")
    parser.add_argument("--ids", type=int, default=4096, help="ids per sparse step (Zipf, with repeats)")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the ids")
    parser.add_argument("--mlp", type=str, default="1024,2048,2048,1024", help="dense MLP widths")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds per group")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--presets", type=str, default="small,large,large_dcn", help="train_step presets ('' for none)")
    parser.add_argument("--scale", type=float, default=1.0, help="train_step ranker width scale")
    parser.add_argument("--batch", type=int, default=512, help="train_step batch size")
    parser.add_argument("--train-rounds", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--no-scaling", action="store_true", help="skip sparse_scaling")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/bench_optimizer"))
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 20,000-row tables, a small MLP, rankers at scale 1/64, batch 64, 2 rounds")
    parser.add_argument("--worker", choices=["keras2", "keras3"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.ids, args.mlp = 20_000, 256, "64,128,64"
        args.rounds, args.steps, args.warmup = 2, 3, 2
        args.scale, args.batch, args.train_rounds, args.train_steps = 1 / 64, 64, 2, 1
    for name in ("rows", "dim", "narrow_dim", "ids", "rounds", "steps", "batch", "train_rounds", "train_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Worker: runs in a process whose Keras runtime is fixed, prints one JSON line per variant.


def run_worker(args: argparse.Namespace) -> None:
    import numpy as np
    import tensorflow as tf

    import tfrs_clippy

    keras = tfrs_clippy.keras
    runtime = args.worker
    rng = np.random.default_rng(0)

    def report(group: str, results: dict, **extra) -> None:
        for name, result in results.items():
            record = dict(runtime=runtime, group=group, variant=name, **result, **extra.get(name, {}))
            print(json.dumps(record), flush=True)

    def zipf_batches(rows: int, dim: int, count: int = 8):
        # Zipf truncated to the table by rejection: no per-row array (1.6 GB for the 200M-row table).
        batches = []
        for _ in range(count):
            ids = np.empty(0, np.int64)
            while ids.size < args.ids:
                draws = rng.zipf(args.zipf, size=2 * args.ids) - 1
                ids = np.concatenate([ids, draws[draws < rows]])
            ids = ids[:args.ids]
            values = rng.normal(size=(args.ids, dim)).astype(np.float32)
            batches.append((tf.constant(values), tf.constant(ids, tf.int64)))
        return batches

    def table_variable(rows: int, dim: int, value: float = 0.05) -> tf.Variable:
        # Filled, not random: a 200M-row random table takes minutes to draw and the step does not depend on it.
        return tf.Variable(tf.fill((rows, dim), value))

    def sparse_optimizer_step(rows: int, dim: int, make_optimizer: Callable) -> Callable:
        table = table_variable(rows, dim)
        optimizer = make_optimizer()
        dense_shape = tf.constant([rows, dim], tf.int64)

        @tf.function
        def step(values, indices):
            optimizer.apply_gradients([(tf.IndexedSlices(values, indices, dense_shape), table)])
            return optimizer.iterations

        return step

    def sparse_kernel_step(rows: int, dim: int) -> Callable:
        table, accumulator = table_variable(rows, dim), table_variable(rows, dim, 0.1)

        @tf.function
        def step(values, indices):
            unique, positions = tf.unique(indices)
            summed = tf.math.unsorted_segment_sum(values, positions, tf.shape(unique)[0])
            tf.raw_ops.ResourceSparseApplyAdagradV2(var=table.handle, accum=accumulator.handle, lr=0.1,
                                                    epsilon=1e-7, grad=summed, indices=unique)
            return tf.shape(unique)[0]

        return step

    widths = [int(w) for w in args.mlp.split(",")]
    shapes = [(a, b) for a, b in zip(widths, widths[1:])] + [(b,) for b in widths[1:]]
    dense_grads = [[tf.random.normal(s, stddev=1e-2) for s in shapes] for _ in range(4)]
    dense_parameters = sum(int(np.prod(s)) for s in shapes)

    def dense_variables() -> list[tf.Variable]:
        return [tf.Variable(tf.random.normal(s, stddev=0.02)) if len(s) == 2 else tf.Variable(tf.zeros(s))
                for s in shapes]

    def dense_optimizer_step(make_optimizer: Callable) -> Callable:
        variables, optimizer = dense_variables(), make_optimizer()

        @tf.function
        def step(*gradients):
            optimizer.apply_gradients(zip(gradients, variables))
            return optimizer.iterations

        return step

    def dense_kernel_step() -> Callable:
        variables = dense_variables()
        accumulators = [tf.Variable(tf.fill(v.shape, 0.1)) for v in variables]

        @tf.function
        def step(*gradients):
            for variable, accumulator, gradient in zip(variables, accumulators, gradients):
                tf.raw_ops.ResourceApplyAdagradV2(var=variable.handle, accum=accumulator.handle, lr=0.1,
                                                  epsilon=1e-7, grad=gradient)
            return tf.constant(0)

        return step

    clippy = lambda **kw: (lambda: tfrs_clippy.ClippyAdagrad(learning_rate=0.1, **kw))
    ours_adagrad = lambda: tfrs_clippy.Adagrad(learning_rate=0.1)
    keras_adagrad = lambda: keras.optimizers.Adagrad(learning_rate=0.1)
    timing = dict(rounds=args.rounds, steps=args.steps, warmup=args.warmup)

    # dense -----------------------------------------------------------------------------------------------------
    makers = {"ClippyAdagrad": clippy(), "tfrs_clippy.Adagrad": ours_adagrad, "Keras Adagrad": keras_adagrad,
              "ClippyAdagrad (no XLA)": clippy(fuse_dense_updates=False)}
    if runtime == "keras2":
        from tensorflow_recommenders.experimental.optimizers import ClippyAdagrad as TfrsClippyAdagrad

        makers["TFRS ClippyAdagrad"] = lambda: TfrsClippyAdagrad(learning_rate=0.1)
    variants = {name: (dense_optimizer_step(make), dense_grads) for name, make in makers.items()}
    variants[DENSE_REFERENCE] = (dense_kernel_step(), dense_grads)
    report("dense", interleaved(variants, DENSE_REFERENCE, **timing),
           **{name: dict(parameters=dense_parameters) for name in variants})
    del variants
    gc.collect()

    # sparse ----------------------------------------------------------------------------------------------------
    batches = zipf_batches(args.rows, args.dim)
    sparse_makers = {"ClippyAdagrad": clippy(), "tfrs_clippy.Adagrad": ours_adagrad, "Keras Adagrad": keras_adagrad}
    if runtime == "keras2":
        sparse_makers["TFRS ClippyAdagrad"] = makers["TFRS ClippyAdagrad"]
    variants = {name: (sparse_optimizer_step(args.rows, args.dim, make), batches)
                for name, make in sparse_makers.items()}
    variants[SPARSE_REFERENCE] = (sparse_kernel_step(args.rows, args.dim), batches)
    distinct = statistics.mean(int(tf.size(tf.unique(ids)[0])) for _, ids in batches)
    report("sparse", interleaved(variants, SPARSE_REFERENCE, **timing),
           **{name: dict(rows=args.rows, dim=args.dim, distinct_ids=distinct) for name in variants})
    del variants
    gc.collect()

    # Adam (issue #19) ------------------------------------------------------------------------------------------
    keras_adam = lambda: keras.optimizers.Adam(learning_rate=1e-3)
    clippy_adam = lambda **kw: (lambda: tfrs_clippy.ClippyAdam(learning_rate=1e-3, **kw))
    variants = {"ClippyAdam": (dense_optimizer_step(clippy_adam()), dense_grads),
                "Keras Adam": (dense_optimizer_step(keras_adam), dense_grads)}
    report("adam_dense", interleaved(variants, "Keras Adam", **timing))
    del variants
    variants = {'ClippyAdam, sparse_updates="dense"': (
                    sparse_optimizer_step(args.rows, args.dim, clippy_adam(sparse_updates="dense")), batches),
                'ClippyAdam, sparse_updates="lazy"': (
                    sparse_optimizer_step(args.rows, args.dim, clippy_adam(sparse_updates="lazy")), batches),
                "Keras Adam": (sparse_optimizer_step(args.rows, args.dim, keras_adam), batches)}
    report("adam_sparse", interleaved(variants, "Keras Adam", **timing),
           **{name: dict(rows=args.rows, dim=args.dim) for name in variants})
    del variants
    gc.collect()

    if runtime != "keras2":
        return

    # sparse_scaling --------------------------------------------------------------------------------------------
    if not args.no_scaling:
        scalings = (("ClippyAdagrad, base rows", "ClippyAdagrad, 10x rows", args.dim, 10),
                    ("ClippyAdagrad, base rows (narrow)", "ClippyAdagrad, 100x rows (narrow)", args.narrow_dim, 100))
        for base_name, large_name, dim, factor in scalings:
            variants = {base_name: (sparse_optimizer_step(args.rows, dim, clippy()), zipf_batches(args.rows, dim)),
                        large_name: (sparse_optimizer_step(args.rows * factor, dim, clippy()),
                                     zipf_batches(args.rows * factor, dim))}
            report("sparse_scaling", interleaved(variants, base_name, **timing),
                   **{base_name: dict(rows=args.rows, dim=dim), large_name: dict(rows=args.rows * factor, dim=dim)})
            del variants
            gc.collect()

    # train_step ------------------------------------------------------------------------------------------------
    presets = [p for p in args.presets.split(",") if p]
    if presets:
        run_train_steps(args, presets, report)


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_train_steps(args: argparse.Namespace, presets: list[str], report: Callable) -> None:
    """A whole Keras train step (`train_on_batch`) of each preset, one model per optimizer from the same weights."""
    import numpy as np
    import tensorflow as tf

    import tfrs_clippy
    import tfrs_clippy_models as models
    from tfrs_clippy import data
    from tfrs_clippy_models import RankerConfig

    keras = tfrs_clippy.keras
    splits = data.movielens_100k()
    batches = [(features, labels) for features, labels in
               data.make_pipeline(splits.train, args.batch, drop_remainder=True).take(4)]
    makers = {
        "ClippyAdagrad.from_paper": lambda: tfrs_clippy.ClippyAdagrad.from_paper(
            learning_rate=0.1, exclude_from_clipping=["embedding"]),
        "tfrs_clippy.Adagrad": lambda: tfrs_clippy.Adagrad(learning_rate=0.1),
        "Keras Adagrad": lambda: keras.optimizers.Adagrad(learning_rate=0.1),
    }
    for preset in presets:
        config = RankerConfig.preset(preset, scale=args.scale)
        keras.utils.set_random_seed(0)
        weights = models.build_ranker(splits.spec, config).get_weights()
        variants, extra = {}, {}
        for name, make in makers.items():
            gc.collect()
            before = _rss_bytes()
            model = models.build_ranker(splits.spec, config)
            model.set_weights(weights)
            optimizer = make()
            model.compile(optimizer=optimizer)

            @tf.function
            def step(features, labels, model=model):  # Keras's train step, without fit's data handling
                return tf.nest.flatten(model.train_step((features, labels)))[0]

            for batch in batches[:2]:
                step(*batch)
            state = sum(int(np.prod(v.shape)) * v.dtype.size for v in optimizer.variables()
                        if v.shape.rank and v.shape.rank > 0)
            extra[name] = dict(
                parameters=int(sum(np.prod(w.shape) for w in model.trainable_variables)),
                optimizer_state_bytes=state,
                model_bytes=int(sum(np.prod(w.shape) * w.dtype.size for w in model.trainable_variables)),
                rss_growth_bytes=_rss_bytes() - before,
                preset=preset, scale=args.scale, batch=args.batch,
            )
            variants[name] = (step, batches)
        results = interleaved(variants, "Keras Adagrad", rounds=args.train_rounds, steps=args.train_steps, warmup=1)
        report(f"train_step {preset}", results, **extra)
        del variants
        gc.collect()
    report("memory", {"peak RSS of the Keras 2 worker": dict(ms=float("nan"), ratio=float("nan"),
                                                              ratio_min=float("nan"), ratio_max=float("nan"),
                                                              reference="")},
           **{"peak RSS of the Keras 2 worker": dict(peak_rss_bytes=_peak_rss_bytes())})


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------------------------
# Driver: one worker per runtime, then targets, JSON and a Markdown table.


def run_runtime(runtime: str, argv: list[str]) -> list[dict]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_USE_LEGACY_KERAS", None)
    if runtime == "keras2":
        env["TF_USE_LEGACY_KERAS"] = "1"
    print(f"[bench] {runtime}: running ...", flush=True)
    process = subprocess.run([sys.executable, __file__, *argv, "--worker", runtime], env=env, capture_output=True,
                             text=True, check=False, cwd=REPO)
    records = [json.loads(line) for line in process.stdout.splitlines() if line.startswith("{")]
    if process.returncode != 0:
        raise RuntimeError(f"the {runtime} worker failed:\n{process.stderr[-3000:]}")
    for r in records:
        if r["group"] == "memory":
            print(f"[bench] {runtime:6s} peak resident memory {r['peak_rss_bytes'] / 2**30:.1f} GiB", flush=True)
        else:
            print(f"[bench] {runtime:6s} {r['group']:22s} {r['variant']:52s} {r['ms']:9.2f} ms  x{r['ratio']:.2f}",
                  flush=True)
    return records


def targets(records: list[dict]) -> list[dict]:
    """Each target of issue #14 in each runtime that measured it: the ratio, met or missed by how much."""
    rows = []
    for label, (group, variant, limit) in TARGETS.items():
        for r in records:
            if r["group"] == group and r["variant"] == variant:
                rows.append(dict(target=label, runtime=r["runtime"], ratio=r["ratio"], limit=limit,
                                 met=r["ratio"] <= limit, by=r["ratio"] / limit - 1.0))
    return rows


def state_check(records: list[dict]) -> list[str]:
    """Clippy's optimizer state against plain Adagrad's (one accumulator per variable)."""
    lines = []
    for r in records:
        if r["group"].startswith("train_step") and r["variant"] == "ClippyAdagrad.from_paper":
            plain = next(p for p in records if p["group"] == r["group"] and p["variant"] == "tfrs_clippy.Adagrad")
            keras_state = next(p for p in records if p["group"] == r["group"] and p["variant"] == "Keras Adagrad")
            lines.append(
                f"{r['group'].split()[1]}: {r['parameters'] / 1e6:.1f}M parameters "
                f"({r['model_bytes'] / 2**20:.0f} MiB); "
                f"optimizer state ClippyAdagrad {r['optimizer_state_bytes'] / 2**20:.0f} MiB, tfrs_clippy.Adagrad "
                f"{plain['optimizer_state_bytes'] / 2**20:.0f} MiB, Keras Adagrad "
                f"{keras_state['optimizer_state_bytes'] / 2**20:.0f} MiB (one accumulator per variable); resident "
                f"memory growth when built and warmed up {r['rss_growth_bytes'] / 2**20:.0f} / "
                f"{plain['rss_growth_bytes'] / 2**20:.0f} / {keras_state['rss_growth_bytes'] / 2**20:.0f} MiB")
    return lines


def markdown(meta: dict, records: list[dict], target_rows: list[dict]) -> str:
    lines = [
        f"Command: `{meta['command']}` at commit `{meta['commit']}`; TensorFlow {meta['tensorflow']}, "
        f"{meta['cpus']} CPUs; load average (1, 5, 15 min) {meta['load_before']} before, {meta['load_after']} after; "
        f"{meta['seconds']:.0f} s.",
        "",
        "| group | runtime | variant | ms / step | ratio | ratio range | reference |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in records:
        if r["group"] == "memory":
            continue
        lines.append(f"| {r['group']} | {r['runtime']} | {r['variant']} | {r['ms']:.2f} | {r['ratio']:.2f} | "
                     f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f} | {r['reference']} |")
    lines += ["", "| target | runtime | ratio | met |", "|---|---|---:|---|"]
    for t in target_rows:
        verdict = "met" if t["met"] else f"missed by {100 * t['by']:.1f}%"
        lines.append(f"| {t['target']} | {t['runtime']} | {t['ratio']:.2f} | {verdict} |")
    state = state_check(records)
    peak = [r for r in records if r["group"] == "memory"]
    if state or peak:
        lines += ["", "Memory:"] + [f"- {line}" for line in state]
        lines += [f"- peak resident memory of the Keras 2 worker: {r['peak_rss_bytes'] / 2**30:.1f} GiB" for r in peak]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    started = time.time()
    load_before = [round(x, 2) for x in os.getloadavg()]
    records = run_runtime("keras2", argv) + run_runtime("keras3", argv)
    meta = dict(command=" ".join(["python", "scripts/bench_optimizer.py", *map(shlex.quote, argv)]), commit=commit(),
                tensorflow=importlib.metadata.version("tensorflow"), cpus=os.cpu_count(), load_before=load_before,
                load_after=[round(x, 2) for x in os.getloadavg()], seconds=time.time() - started)
    target_rows = targets(records)
    text = markdown(meta, records, target_rows)
    args.out.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items() if k != "worker"}
    (args.out / "bench_optimizer.json").write_text(
        json.dumps({**meta, "config": config, "records": records, "targets": target_rows}, indent=2))
    (args.out / "bench_optimizer.md").write_text(text)
    print(text)
    print(f"[bench] wrote {args.out}/bench_optimizer.json and .md in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
