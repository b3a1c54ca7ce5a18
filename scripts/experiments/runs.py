"""One run of the optimizer comparison: its config, training and evaluation, its record, and the cached runner.

A run trains one ranker preset with one method at one learning rate and seed, for one pass over the training split
in time order, and is evaluated on the held-out newest data; its record (see `experiments.records`) is cached
under its config's key. `scripts/reproduce.py` plans the comparison's runs and `scripts/calibrate_lr.py` the
learning-rate sweep; both run them with `run_all`. Importers run under Keras 2 (TF_USE_LEGACY_KERAS=1: the rankers
are tfrs.Models).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time
from typing import Any, Callable, Sequence

import numpy as np

import tfrs_clippy_models as models
from tfrs_clippy.data import ChunkedExamples, Splits, census_income, make_pipeline, movielens_100k, synthetic
from tfrs_clippy.keras_runtime import keras
from tfrs_clippy.optimizers import LinearWarmup, build_optimizer
from tfrs_clippy.optimizers.variable_names import matches_any
from tfrs_clippy.stability import ClippingFactorLogger, DivergenceMonitor, RollbackOnDivergence, classify_run

from experiments.records import (
    config_key,
    format_duration,
    format_multiplier,
    metric_names,
    read_json,
    write_json_atomically,
)

RECORD_VERSION = 2
"""Part of every run's config, hence of its key: bump it when a change to a run (here or in a script's config)
changes results."""

FUSE_DENSE_UPDATES = False
"""The optimizers' XLA-fused dense step: at these scaled-down widths on CPU its per-run compile time (2-5 s)
exceeds what it saves in a 157-step pass, so the runs use the unfused step (same math, up to float rounding)."""

MODELS = ("small", "large", "large_dcn")
EVAL_BATCH_SIZE = 4096

EMBEDDING_PATTERN = "embedding"
"""The regular expression naming the embedding tables, which every method leaves to plain Adagrad, as the paper
does (`build_optimizer(embedding_pattern=...)`). This module matches it as the optimizers do (`matches_any`: a
`re.search`) on the name they see (e.g. "ranker/embedding/table_user_id/embeddings:0"), to leave those tables' clipping
factors (always 1) out of the records and Figure 6. Changing it changes results: bump RECORD_VERSION."""


@dataclasses.dataclass(frozen=True)
class DatasetChoice:
    """A dataset the runner knows and its calibrated base (1x) learning rate.

    Attributes:
        load: Returns the splits.
        base_learning_rate: The 1x learning rate; see `docs/reproduction.md` and the sweep it cites.
        description: How the data is set up, for the output.
    """

    load: Callable[[], Splits]
    base_learning_rate: float
    description: str


DATASETS = {
    # 1x = 0.08, the "onset" of the factor-2 sweep (docs/calibration/movielens_100k.md, from
    # `scripts/calibrate_lr.py --dataset movielens_100k`, scale 1/16, batch 512, seed 0): the smallest rate at
    # which naive Adagrad diverged on some preset (Large+DCN; Small and Large stay stable up to 0.32 and 0.16).
    # As in the paper, 1x is already too large for naive Adagrad on the largest model and 2x more so.
    "movielens_100k": DatasetChoice(movielens_100k, 0.08, "MovieLens-100K, oldest 80% train, newest 20% test"),
    # NOT calibrated: Census-Income and the synthetic stream reuse ML-100K's 1x. Sweep them with
    # `scripts/calibrate_lr.py --dataset <name>` and pass the edge as --base-learning-rate.
    "census_income": DatasetChoice(census_income, 0.08, "Census-Income (KDD), official train file, test half"),
    "synthetic": DatasetChoice(
        lambda: synthetic(num_train=100_000, num_test=20_000, vocabulary_sizes=(1_000, 10_000, 100_000)),
        0.08,
        "synthetic drifting stream, 100k train then 20k test, vocabularies 1e3/1e4/1e5",
    ),
}


def run_config(args: argparse.Namespace, model: str, method: str, hyperparameters: dict, multiplier: float,
               seed: int, warmup: int, rollback: bool = False) -> dict[str, Any]:
    """The config of one run: everything its result depends on (its key is `config_key` of it).

    `warmup` is the run's resolved warm-up steps (`warmup_steps`).
    """
    base = args.base_learning_rate or DATASETS[args.dataset].base_learning_rate
    return {
        "version": RECORD_VERSION,
        "dataset": args.dataset,
        "model": model,
        "scale": args.scale,
        "method": method,
        "hyperparameters": hyperparameters,
        "lr_multiplier": multiplier,
        "learning_rate": base * multiplier,
        "warmup_steps": warmup,
        "output_bias": args.output_bias,
        "seed": seed,
        "batch_size": args.batch_size,
        "train_steps": args.train_steps,
        "eval_examples": args.eval_examples,
        "rollback": {"lr_factor": args.rollback_lr_factor} if rollback else None,
        "fuse_dense_updates": FUSE_DENSE_UPDATES,
    }


def readable_variable_names(model: models.Ranker) -> dict[str, str]:
    """Variable name -> "<part>/<layer>/<weight>" with part "embedding", "cross", "bottom" or "tower_<task>"."""
    parts = [("embedding", model.embedding), ("cross", model.cross_network), ("bottom", model.bottom),
             *((f"tower_{task}", tower) for task, tower in model.towers.items())]
    names = {}
    for part, layer in parts:
        for variable in layer.trainable_variables if layer is not None else []:
            layer_and_weight = variable.name.split(":")[0].split("/")[-2:]
            names[variable.name] = "/".join([part, *layer_and_weight])
    return names


def clipped_factors(factors: dict[str, list[float]], names: dict[str, str],
                    embedding_pattern: str = EMBEDDING_PATTERN) -> dict[str, list[float]]:
    """The recorded factors of the variables the optimizer clips, under their readable names.

    Args:
        factors: `ClippingFactorLogger.record.factors`, keyed by the optimizer's variable names.
        names: `readable_variable_names` of the model; a name it lacks is kept as it is.
        embedding_pattern: The `embedding_pattern` the optimizer was built with: a variable whose name it matches
            (`variable_names.matches_any`, the optimizers' rule) is an embedding table and is left out.
    """
    return {names.get(name, name): values for name, values in factors.items()
            if not matches_any([embedding_pattern], name)}


def held_out(splits: Splits, eval_examples: int) -> ChunkedExamples:
    """The test split, or its first `eval_examples` examples when that is not 0 (still in chunks: batched fast)."""
    return splits.test.take(eval_examples) if eval_examples else splits.test


def constant_prediction_rmse(splits: Splits, eval_examples: int) -> dict[str, float]:
    """Per regression task, "<task>_rmse" of always predicting the task's training mean on the held-out data.

    The reference against which `classify_run` judges a regression task dead.
    """
    regression = [task for task in splits.spec.tasks if task.kind == "regression"]

    def label_columns(dataset: ChunkedExamples) -> dict[str, np.ndarray]:
        batches = [labels for _, labels in make_pipeline(dataset, EVAL_BATCH_SIZE, prefetch=False)]
        return {task.name: np.concatenate([batch[task.label_key].numpy() for batch in batches]) for task in regression}

    train, test = label_columns(splits.train), label_columns(held_out(splits, eval_examples))
    # nanmean: a NaN label means "unlabeled" (the data convention).
    return {f"{name}_rmse": float(np.sqrt(np.nanmean((test[name] - np.nanmean(train[name])) ** 2))) for name in train}


def train_and_evaluate(config: dict[str, Any], splits: Splits, constant_rmse: dict[str, float]) -> dict[str, Any]:
    """Trains and evaluates the run `config` (see `run_config`) and returns its record (see `experiments.records`).

    `constant_rmse` is `constant_prediction_rmse(splits, ...)`, the reference for dead regression tasks.
    """
    started = time.perf_counter()
    keras.backend.clear_session()  # fresh layer names (the plots use them) and no graphs of earlier runs
    keras.utils.set_random_seed(config["seed"])
    ranker = models.build_ranker(splits.spec, models.RankerConfig.preset(
        config["model"], scale=config["scale"], output_bias=config["output_bias"]))
    logs_factors = config["method"] == "clippy"
    # No warm-up: the plain constant rate, exactly as before LinearWarmup existed.
    learning_rate = (LinearWarmup(config["learning_rate"], config["warmup_steps"]) if config["warmup_steps"]
                     else config["learning_rate"])
    optimizer = build_optimizer(config["method"], learning_rate, embedding_pattern=EMBEDDING_PATTERN,
                                export_clipping_factors=logs_factors, fuse_dense_updates=config["fuse_dense_updates"],
                                **config["hyperparameters"])
    ranker.compile(optimizer=optimizer)
    if config["rollback"]:
        monitor = RollbackOnDivergence(lr_factor=config["rollback"]["lr_factor"])
    else:
        monitor = DivergenceMonitor()
    callbacks: list[keras.callbacks.Callback] = [monitor]
    factor_logger = ClippingFactorLogger() if logs_factors else None
    if factor_logger is not None:
        callbacks.append(factor_logger)
    train = make_pipeline(splits.train, config["batch_size"])
    if config["train_steps"]:
        train = train.take(config["train_steps"])
    ranker.fit(train, epochs=1, verbose=0, callbacks=callbacks)
    test = make_pipeline(held_out(splits, config["eval_examples"]), EVAL_BATCH_SIZE)
    evaluation = ranker.evaluate(test, return_dict=True, verbose=0)
    tasks = {task.name: task.kind for task in splits.spec.tasks}
    metrics = {name: float(evaluation[name]) for name in metric_names(tasks)}
    losses = list(monitor.record.losses)
    record: dict[str, Any] = {
        "key": config_key(config),
        "config": config,
        "tasks": tasks,
        "metrics": metrics,
        "losses": losses,
        "constant_rmse": constant_rmse,
        "verdict": classify_run(losses, metrics, constant_rmse=constant_rmse).to_dict(),
        "nonfinite_steps_skipped": int(optimizer.nonfinite_steps.numpy()),
        "seconds": time.perf_counter() - started,
    }
    if isinstance(monitor, RollbackOnDivergence):
        record["rollbacks"] = monitor.rollbacks
    if factor_logger is not None:
        record["clipping_factors"] = {
            "steps": factor_logger.record.steps,
            "factors": clipped_factors(factor_logger.record.factors, readable_variable_names(ranker)),
        }
    return record


def describe(config: dict[str, Any]) -> str:
    """E.g. "large_dcn gc(threshold=0.01) lr=2x (0.04) seed=1" (+ " rollback")."""
    settings = ",".join(f"{name}={value:g}" for name, value in sorted(config["hyperparameters"].items()))
    method = f"{config['method']}({settings})" if settings and config["method"] != "clippy" else config["method"]
    multiplier = format_multiplier(config["lr_multiplier"])
    text = f"{config['model']} {method} lr={multiplier} ({config['learning_rate']:g}) seed={config['seed']}"
    return text + (" rollback" if config["rollback"] else "")


def summarize_run(record: dict[str, Any]) -> str:
    """The metrics and verdict of a run, for its progress line."""
    metrics = " ".join(f"{name}={value:.4f}" for name, value in record["metrics"].items())
    verdict = record["verdict"]
    state = f"DIVERGED({verdict['reason']})" if verdict["diverged"] else "ok"
    return f"{metrics} micro={verdict['micro_divergences']} full={verdict['full_divergences']} {state}"


def run_all(configs: list[dict[str, Any]], splits: Splits, runs_dir: pathlib.Path) -> list[dict[str, Any]]:
    """Runs (or reads back) every config, printing a progress line per run; returns the records in config order."""
    # Every config of one command shares dataset and eval_examples, hence the reference.
    constant_rmse = constant_prediction_rmse(splits, configs[0]["eval_examples"])
    keys = [config_key(config) for config in configs]
    cached = {key for key in keys if (runs_dir / f"{key}.json").exists()}
    to_compute = sum(key not in cached for key in keys)
    started, computed, records = time.perf_counter(), 0, []
    for index, (config, key) in enumerate(zip(configs, keys), start=1):
        path = runs_dir / f"{key}.json"
        prefix = f"[run {index}/{len(configs)}] {describe(config)}"
        if key in cached:
            record = read_json(path)
            # The verdict is re-derived, so a change of the divergence rule needs no rerun.
            record["constant_rmse"] = constant_rmse
            record["verdict"] = classify_run(
                record["losses"], record["metrics"], constant_rmse=constant_rmse).to_dict()
            records.append(record)
            print(f"{prefix} ... cached: {summarize_run(record)}", flush=True)
            continue
        record = train_and_evaluate(config, splits, constant_rmse)
        write_json_atomically(path, record)
        records.append(record)
        computed += 1
        elapsed = time.perf_counter() - started
        remaining = elapsed / computed * (to_compute - computed)
        print(f"{prefix} ... {summarize_run(record)} {record['seconds']:.1f}s "
              f"(elapsed {format_duration(elapsed)}, remaining ~{format_duration(remaining)})", flush=True)
    return records


def preset_widths(scale: float, names: Sequence[str]) -> str:
    """E.g. "small 32x2, large 256x4, large_dcn 1 cross + 256x4" at `scale`."""
    parts = []
    for name in names:
        config = models.RankerConfig.preset(name, scale=scale)
        widths = config.scaled(config.bottom_units)
        bottom = f"{widths[0]}x{len(widths)}" if len(set(widths)) == 1 else "-".join(map(str, widths))
        parts.append(f"{name} {f'{config.cross_layers} cross + ' if config.cross_layers else ''}{bottom}")
    return ", ".join(parts)
