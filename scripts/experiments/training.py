"""The training loop of `scripts/train.py`: build or resume the run, fit it, evaluate it, report and export it.

`train(args)` takes the flags of `experiments.train_flags.parse_args`. With `--checkpoint-dir`, the directory also
records the data-stream flags (`RUN_FILE`) and the effective ranker config (`CONFIG_FILE`): a rerun resumes from
the latest checkpoint only over the same stream and model. Importers set TF_USE_LEGACY_KERAS=1 before TensorFlow
is imported (the rankers need Keras 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from typing import Any

import tensorflow as tf

import tfrs_clippy_models as models
from tfrs_clippy.keras_runtime import keras

from experiments import train_eval
from experiments.callbacks import CheckpointSaver, EpochCheckpointSaver, EpochScalarLogger, ScalarLogger, optimizer_step
from experiments.run_setup import build_model_and_optimizer, load_splits, make_checkpoint, training_input
from experiments.strategies import make_strategy
from experiments.train_flags import model_flags

RUN_FILE = "run.json"
"""Written beside the checkpoints: the flags that fix the data stream, which a resumed run must repeat."""
_STREAM_FLAGS = ("dataset", "batch_size", "shuffle_window", "seed", "epochs", "synthetic_examples",
                 "synthetic_vocabulary")
CONFIG_FILE = "ranker_config.json"
"""Written beside the checkpoints: the effective `RankerConfig`, which a resumed run uses (a `--config` file)."""


@dataclasses.dataclass
class TrainingRun:
    """What `train` built and did: for callers that inspect the result (tests, notebooks)."""

    strategy: tf.distribute.Strategy
    model: models.Ranker
    optimizer: Any
    history: dict[str, list[float]]
    steps: int
    """Optimizer steps taken in total, including those of the runs this one resumed."""
    config: models.RankerConfig
    held_out_split: str
    """"validation" or "test": the split `held_out` was measured on."""
    held_out: dict[str, float]
    """Every metric on the held-out split at the end (`train_eval.HeldOut.evaluate`): per-task AUC or RMSE, ..."""
    wall_seconds: float


def _resolve_resumed_config(directory: pathlib.Path, args: argparse.Namespace) -> None:
    """Records the effective ranker config beside the checkpoints, or takes the recorded one on a resume.

    On a resume without --preset or --config, the model flags given apply to the recorded config (so the same
    command, or one with no model flags, resumes the same model); the resulting model must be the recorded one,
    else the rerun is refused, naming the fields (the checkpoint would not restore into another model).
    """
    path = directory / CONFIG_FILE
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(args.ranker_config.to_dict(), indent=1) + "\n", encoding="utf-8")
        return
    recorded = models.RankerConfig.load(path)
    wanted = args.ranker_config
    if not (args.preset or args.config):
        try:
            wanted = dataclasses.replace(recorded, **model_flags(args))
        except ValueError as error:
            raise ValueError(f"--checkpoint-dir {directory}: the model flags do not apply to {path}: {error}") from None
    if recorded != wanted:
        ours, theirs = wanted.to_dict(), recorded.to_dict()
        changed = ", ".join(f"{name} {ours[name]} (was {theirs[name]})" for name in ours if ours[name] != theirs[name])
        raise ValueError(
            f"--checkpoint-dir {directory} holds a run of another ranker: {changed}. Rerun with the same model, "
            f"or with no model flags to resume with {path}."
        )
    args.ranker_config = recorded


def _check_resumable(directory: pathlib.Path, args: argparse.Namespace) -> None:
    """Records the data-stream flags, or raises if a resumed run changes them (the step would point elsewhere)."""
    stream = {flag: getattr(args, flag) for flag in _STREAM_FLAGS}
    stream = json.loads(json.dumps(stream))  # tuples as lists, as they come back from the file
    path = directory / RUN_FILE
    if path.exists():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        changed = {flag: (recorded.get(flag), value) for flag, value in stream.items() if recorded.get(flag) != value}
        if changed:
            details = ", ".join(f"--{f.replace('_', '-')} {new} (was {old})" for f, (old, new) in changed.items())
            raise ValueError(f"--checkpoint-dir {directory} holds a run over another data stream: {details}.")
    else:
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stream, indent=1), encoding="utf-8")


def train(args: argparse.Namespace) -> TrainingRun:
    """Builds, restores (if a checkpoint exists), trains, evaluates, checkpoints and exports the run of `args`."""
    started = time.monotonic()
    strategy = make_strategy(args)
    directory = pathlib.Path(args.checkpoint_dir) if args.checkpoint_dir else None
    if directory is not None:
        _check_resumable(directory, args)
        _resolve_resumed_config(directory, args)  # before building: a resumed run may take the recorded model
    splits = load_splits(args)
    model, optimizer = build_model_and_optimizer(args, splits.spec, strategy)
    steps_per_epoch = int(splits.train.cardinality()) // args.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"--batch-size {args.batch_size} exceeds the {int(splits.train.cardinality())} examples.")
    total_steps = min(steps_per_epoch * args.epochs, args.max_steps or sys.maxsize)
    parameter_server = isinstance(strategy, tf.distribute.experimental.ParameterServerStrategy)
    # ParameterServerStrategy forbids batch-level callbacks (checkpoints and logs are per epoch there) and a
    # per-step progress bar (Keras refuses verbose=1).
    batch_hooks = not parameter_server
    verbose = 2 if parameter_server and args.verbose == 1 else args.verbose
    chief = train_eval.is_chief(strategy)
    held_out = train_eval.HeldOut(
        splits, args.batch_size, strategy, args.ranker_config,
        drop_remainder=isinstance(strategy, tf.distribute.TPUStrategy),
    )
    evaluation = train_eval.HeldOutEvaluation(held_out, lambda: optimizer_step(optimizer), chief)

    # Our own progress bar (Keras then adds none), so that the evaluation's line follows the epoch's; the
    # evaluation comes before the loggers, which write the held-out results it adds to the epoch logs.
    callbacks: list[keras.callbacks.Callback] = [keras.callbacks.ProgbarLogger(count_mode="steps"), evaluation]
    if directory is not None:
        manager = tf.train.CheckpointManager(make_checkpoint(model, optimizer), str(directory), max_to_keep=3)
        if manager.latest_checkpoint:
            make_checkpoint(model, optimizer).restore(manager.latest_checkpoint).assert_existing_objects_matched()
        callbacks.append((CheckpointSaver if batch_hooks else EpochCheckpointSaver)(manager, args.checkpoint_every))
    scalar_logger = None
    if args.log_dir:
        scalar_logger = (ScalarLogger if batch_hooks else EpochScalarLogger)(args.log_dir, args.log_every)
        callbacks.append(scalar_logger)

    first_step = done = optimizer_step(optimizer)
    history: dict[str, list[float]] = {}
    # One `fit` per run of whole epochs, one per part of an epoch (a resumed one's rest, a --max-steps one's start);
    # under ParameterServerStrategy one per epoch, evaluated in between (see train_eval.py).
    while done < total_steps:
        epoch = done // steps_per_epoch
        epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
        whole_epochs = done % steps_per_epoch == 0 and epoch_end - done == steps_per_epoch
        last_epoch = total_steps // steps_per_epoch if whole_epochs and not parameter_server else epoch + 1
        steps = steps_per_epoch if whole_epochs else epoch_end - done
        fitted = model.fit(
            training_input(args, strategy, done, splits.train), epochs=last_epoch, initial_epoch=epoch,
            steps_per_epoch=steps, callbacks=callbacks, verbose=verbose,
        )
        for key, values in fitted.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
        if optimizer_step(optimizer) == done:
            raise RuntimeError(f"train.py: fit took no step at step {done}; the data stream ended early.")
        done = optimizer_step(optimizer)
        if parameter_server:
            held_out_logs = evaluation.after_fit(model, epoch + 1)
            for key, value in held_out_logs.items():
                history.setdefault(key, []).append(value)
            if scalar_logger is not None:
                scalar_logger.write_scalars("epoch/", held_out_logs)

    # The last epoch's evaluation when it was at this step; a fresh one when no step was taken (a finished run).
    final = evaluation.evaluate_now(model, epoch=None)
    wall_seconds = time.monotonic() - started
    if args.export_dir:
        train_eval.export(model, held_out, args.export_dir, chief)
    if chief and args.metrics_out:
        train_eval.write_metrics(args.metrics_out, held_out, evaluation, final, {
            "dataset": args.dataset,
            "strategy": args.strategy,
            "replicas": int(strategy.num_replicas_in_sync),
            "steps": done,
            "steps_this_run": done - first_step,
            "wall_seconds": round(wall_seconds, 3),
            "ranker_config": args.ranker_config.to_dict(),
            "flags": _flags_record(args),
        })
    if chief:
        print(
            f"train.py: {args.dataset}, {args.ranker_config.bottom}, {args.method}: {done} steps "
            f"({done - first_step} in this run) in {wall_seconds:.1f} s; held-out {held_out.describe(final)}",
            flush=True,
        )
    return TrainingRun(strategy, model, optimizer, history, done, args.ranker_config, held_out.split, final,
                       wall_seconds)


def _flags_record(args: argparse.Namespace) -> dict[str, Any]:
    """Every flag's value as JSON (the resolved config is recorded on its own)."""
    flags = {name: value for name, value in vars(args).items() if name != "ranker_config"}
    return json.loads(json.dumps(flags, default=str))
