"""Measures training stability the Clippy paper's way: run K seeds of a config and count how many diverged.

Each seed trains a small two-task model (a click-like binary head and a rating-like regression head on a shared
ReLU tower) on synthetic data of its own, for a fixed number of steps, watched by `DivergenceMonitor` (or, with
--rollback, by `RollbackOnDivergence`, which also survives the spikes). A run *diverged* if the monitor saw a full
divergence (NaN/Inf, or a spike that did not recover); a NaN step that a rollback undid is counted as *rescued*
instead. Example, naive Adagrad at a high learning rate with and without rollback:

    python scripts/stability_seeds.py --optimizer adagrad --learning-rate 0.5 --seeds 8
    python scripts/stability_seeds.py --optimizer adagrad --learning-rate 0.5 --seeds 8 --rollback

Runs in either Keras runtime (set TF_USE_LEGACY_KERAS=1 for Keras 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from typing import List

import numpy as np
import tensorflow as tf

from tfrs_clippy.keras_runtime import keras
from tfrs_clippy.stability import DivergenceMonitor, InstabilityScore, RollbackOnDivergence

FEATURES = 32


@dataclasses.dataclass(frozen=True)
class SeedResult:
    """One seed's outcome."""

    seed: int
    score: InstabilityScore
    rollbacks: int
    final_loss: float


def _synthetic_data(seed: int, examples: int):
    """Features with a few large-magnitude columns (as raw counts are), a click label and a rating target."""
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((examples, FEATURES)).astype(np.float32)
    features[:, :4] *= rng.lognormal(1.0, 1.0, (examples, 4)).astype(np.float32)  # heavy-tailed columns
    hidden = np.tanh(features @ rng.standard_normal((FEATURES, 8)).astype(np.float32) / np.sqrt(FEATURES))
    click = (hidden @ rng.standard_normal(8) + 0.3 * rng.standard_normal(examples) > 0).astype(np.float32)
    rating = (hidden @ rng.standard_normal(8) + 0.1 * rng.standard_normal(examples)).astype(np.float32)
    return features, {"click": click[:, None], "rating": rating[:, None]}


def _optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    if name == "adagrad":
        return keras.optimizers.Adagrad(learning_rate)
    if name == "clippy":
        from tfrs_clippy import ClippyAdagrad  # pylint: disable=import-outside-toplevel

        return ClippyAdagrad.from_paper(learning_rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate)
    raise ValueError(f"`optimizer` must be one of adagrad, clippy, sgd, got {name!r}.")


def _model(seed: int, optimizer: keras.optimizers.Optimizer) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((FEATURES,))
    tower = inputs
    for width in (128, 128, 64):
        tower = keras.layers.Dense(width, activation="relu")(tower)
    outputs = {
        "click": keras.layers.Dense(1, activation="sigmoid", name="click")(tower),
        "rating": keras.layers.Dense(1, name="rating")(tower),
    }
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=optimizer, loss={"click": "binary_crossentropy", "rating": "mse"})
    return model


def run_seed(seed: int, args: argparse.Namespace) -> SeedResult:
    """Trains one seed for `args.steps` steps and returns what the monitor measured."""
    features, targets = _synthetic_data(seed, args.steps * args.batch_size + 1024)
    train_targets = {name: values[:-1024] for name, values in targets.items()}
    model = _model(seed, _optimizer(args.optimizer, args.learning_rate))
    if args.rollback:
        monitor: DivergenceMonitor = RollbackOnDivergence(
            snapshot_every_n_steps=args.snapshot_every, skip_batches=args.skip_batches, lr_factor=args.lr_factor
        )
    else:
        monitor = DivergenceMonitor()
    model.fit(
        features[:-1024], train_targets, batch_size=args.batch_size, epochs=1, shuffle=False, verbose=0,
        callbacks=[monitor],
    )
    held_out = model.evaluate(
        features[-1024:], {name: values[-1024:] for name, values in targets.items()}, verbose=0, return_dict=True
    )
    rollbacks = monitor.rollbacks if isinstance(monitor, RollbackOnDivergence) else 0
    return SeedResult(seed, monitor.record.instability_score(), rollbacks, float(held_out["loss"]))


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", default="adagrad", choices=("adagrad", "clippy", "sgd"))
    parser.add_argument("--learning-rate", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, default=5, help="K: how many seeds to run")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rollback", action="store_true", help="train with RollbackOnDivergence")
    parser.add_argument("--snapshot-every", type=int, default=10)
    parser.add_argument("--skip-batches", type=int, default=10)
    parser.add_argument("--lr-factor", type=float, default=1.0)
    args = parser.parse_args(argv)
    for name in ("seeds", "steps", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    logging.getLogger("tfrs_clippy.stability.rollback").setLevel(logging.ERROR)  # the table reports them

    print(
        f"{args.optimizer} lr={args.learning_rate} steps={args.steps} batch={args.batch_size} "
        f"rollback={'on' if args.rollback else 'off'} ({'Keras 2' if keras.__name__ == 'tf_keras' else 'Keras 3'})"
    )
    print(
        f"{'seed':>4} {'micro':>5} {'full':>4} {'rescued':>7} {'rollbacks':>9} {'ev/1k':>6} {'in spike':>8} "
        f"{'worst':>9} {'held-out loss':>13}"
    )
    results = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        result = run_seed(seed, args)
        score = result.score
        print(
            f"{seed:>4} {score.micro_divergences:>5} {score.full_divergences:>4} {score.rescued_divergences:>7} "
            f"{result.rollbacks:>9} "
            f"{score.events_per_1000_steps:>6.1f} {score.fraction_steps_in_spike:>8.1%} "
            f"{score.worst_spike_ratio:>9.3g} {result.final_loss:>13.4g}"
        )
        results.append(result)
    diverged = sum(result.score.had_full_divergence for result in results)
    finite = [result.final_loss for result in results if math.isfinite(result.final_loss)]
    print(
        f"diverged: {diverged}/{len(results)} seeds; micro-divergences: "
        f"{sum(r.score.micro_divergences for r in results)}; rescued: "
        f"{sum(r.score.rescued_divergences for r in results)}; rollbacks: {sum(r.rollbacks for r in results)}; "
        f"median held-out loss (finite runs): {np.median(finite) if finite else math.nan:.4g}"
    )
    return 0


if __name__ == "__main__":
    tf.get_logger().setLevel("ERROR")
    sys.exit(main(sys.argv[1:]))
