"""Dense step time of ClippyAdagrad on Keras 3's JAX backend against `optax.adagrad` and Keras's Adagrad, side by side.

    python scripts/bench_backends.py              # the 8.4M-parameter MLP of bench_optimizer.py's dense case

Runs itself with KERAS_BACKEND=jax. Each variant is one `jax.jit`-compiled step over the MLP's weights with given
gradients (Keras optimizers through `stateless_apply`, as Keras's JAX trainer calls them; optax through
`update` + `apply_updates`), timed in interleaved rounds (`experiments.timing.interleaved`, as bench_optimizer.py
does); a variant's ratio is the median over rounds of its time over optax's in the same round. Writes
bench_backends.{json,md} to --out with the command, commit and load.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import shlex
import sys
import time

os.environ["KERAS_BACKEND"] = "jax"  # before Keras is imported
os.environ.pop("TF_USE_LEGACY_KERAS", None)

from experiments.records import commit, stderr_silenced  # noqa: E402
from experiments.timing import interleaved  # noqa: E402

with stderr_silenced():  # TensorFlow's C++ start-up lines (tfrs_clippy imports it)
    import jax
    import keras
    import numpy as np
    import optax

    import tfrs_clippy


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mlp", default="1024,2048,2048,1024", help="dense MLP widths")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/bench_backends"))
    return parser.parse_args(argv)


def mlp_shapes(widths: list[int]) -> list[tuple[int, ...]]:
    shapes = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
        shapes += [(fan_in, fan_out), (fan_out,)]
    return shapes


def keras_step(optimizer, shapes):
    """A jitted step (weights, optimizer state, grads) -> (weights, state) of a Keras optimizer, and its state."""
    variables = [keras.Variable(np.zeros(shape, np.float32), name=f"w{i}") for i, shape in enumerate(shapes)]
    optimizer.build(variables)
    state = [v.value for v in optimizer.variables]

    @jax.jit
    def step(weights, state, grads):
        return optimizer.stateless_apply(state, grads, weights)

    return step, state


def optax_step(transform):
    @jax.jit
    def step(weights, state, grads):
        updates, state = transform.update(grads, state, weights)
        return optax.apply_updates(weights, updates), state

    return step


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.time()
    load_before = [round(x, 2) for x in os.getloadavg()]
    shapes = mlp_shapes([int(w) for w in args.mlp.split(",")])
    rng = np.random.default_rng(0)
    weights = [jax.numpy.asarray(rng.normal(0, 0.05, s).astype(np.float32)) for s in shapes]
    grads = [jax.numpy.asarray(rng.normal(0, 1.0, s).astype(np.float32)) for s in shapes]
    transform = optax.adagrad(0.1, initial_accumulator_value=0.1, eps=1e-7)
    variants = {"optax.adagrad": (optax_step(transform), transform.init(weights))}
    for name, optimizer in [("Keras Adagrad", keras.optimizers.Adagrad(0.1)),
                            ("tfrs_clippy.Adagrad", tfrs_clippy.Adagrad(0.1)),
                            ("ClippyAdagrad.from_paper", tfrs_clippy.ClippyAdagrad.from_paper(learning_rate=0.1))]:
        variants[name] = keras_step(optimizer, shapes)
    timed = {name: (step, [(weights, state, grads)]) for name, (step, state) in variants.items()}
    results = interleaved(timed, "optax.adagrad", rounds=args.rounds, steps=args.steps, warmup=2,
                          block=jax.block_until_ready)
    records = [{"variant": name, **result} for name, result in results.items()]
    for r in records:
        print(f"[bench_backends] {r['variant']:26s} {r['ms']:8.2f} ms  x{r['ratio']:.2f}", flush=True)
    parameters = sum(int(np.prod(s)) for s in shapes)
    meta = {"command": " ".join(["python", "scripts/bench_backends.py", *map(shlex.quote, argv)]), "commit": commit(),
            "jax": jax.__version__, "keras": keras.__version__, "optax": importlib.metadata.version("optax"),
            "cpus": os.cpu_count(), "parameters": parameters, "load_before": load_before,
            "load_after": [round(x, 2) for x in os.getloadavg()], "seconds": time.time() - started}
    lines = [f"Command: `{meta['command']}` at commit `{meta['commit']}`; JAX {meta['jax']}, Keras {meta['keras']}, "
             f"optax {meta['optax']}, {meta['cpus']} CPUs; a dense step of an MLP {args.mlp} ({parameters / 1e6:.1f}M "
             f"parameters); load average (1, 5, 15 min) {load_before} before, {meta['load_after']} after; "
             f"{meta['seconds']:.0f} s.", "",
             "| variant | ms / step | ratio | ratio range | reference |", "|---|---:|---:|---:|---|"]
    lines += [f"| {r['variant']} | {r['ms']:.2f} | {r['ratio']:.2f} | {r['ratio_min']:.2f}-{r['ratio_max']:.2f} | "
              f"{r['reference']} |" for r in records]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_backends.json").write_text(json.dumps({**meta, "records": records}, indent=2))
    (args.out / "bench_backends.md").write_text(text)
    print(text)
    print(f"[bench_backends] wrote {args.out}/bench_backends.json and .md")


if __name__ == "__main__":
    main()
