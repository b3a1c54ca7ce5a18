"""The stress benchmark: a multitask ranker that trains fine until the data shifts mid-run, with every method.

Each run trains a shared-bottom ranker (2 x 256 ReLU, one 64-unit tower per task, output biases at the label
prior) for one pass in time order over `tfrs_clippy.data.shock_stream` (6 days, batch 512, 300 steps, a 50-step
linear learning-rate warm-up, Adagrad with accumulator start 0.1), with one method of the Clippy paper on the
non-embedding parameters: naive Adagrad, layer-wise gradient clipping (GC), adaptive gradient clipping (AGC),
LAMB on Adagrad, or Clippy (the paper's setting, untuned). The shock starts at step 150; the control stream is
identical without it. Every run is also judged for divergence (docs/stress.md gives the rules).

Stages (`--stage`):
- `evaluate` (default): `--methods` x `--lr-multipliers` x (`--shock` and its control) x `--seeds` seeds from
  `--seed-offset`. Baselines use the grid point `tune` chose (`--tuning`). Writes summary.json, table.md, the
  loss around the shock (Fig. 5), per-layer step sizes and factors at the shock (Fig. 4), Clippy's factors
  (Fig. 6) and, with several multipliers, the learning-rate sensitivity (final loss and AUC against the rate).
- `calibrate`: naive Adagrad on the control stream over a learning-rate grid, on the tuning seeds: 1x is the
  largest rate at which naive survives in >= 4 of 5 seeds. Writes calibration.json.
- `tune`: GC, AGC and LAMB on the paper's grids, at each multiplier, on the shock stream and the tuning seeds;
  picks per (method, multiplier) the point with the best mean held-out AUC. Writes tuning.json.
- `rollback`: naive Adagrad with and without `RollbackOnDivergence` (snapshot, skip batches, halve the rate).
- `ablation`: naive Adagrad at `--lr-multipliers` on variants of the model and tasks (the paper's Table 3).
- `sharpness`: `--methods` with a `SharpnessMonitor` every 25 steps on a fixed batch of the first post-shock day:
  the plain and the Adagrad-preconditioned sharpness against 2 / learning rate, before and after the shock.

    TF_USE_LEGACY_KERAS=1 .venv/bin/python scripts/stress.py --seeds 3 --out results/stress   # the demo
    TF_USE_LEGACY_KERAS=1 .venv/bin/python scripts/stress.py --stage calibrate --out results/stress

Runs are cached in `<out>/runs/<key>.json` (key: a hash of the run's config), so an interrupted command resumes.
"""

from __future__ import annotations

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"  # the rankers are tfrs.Models: Keras 2 only
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Sequence  # noqa: E402

from experiments.flags import comma_list  # noqa: E402
from experiments.records import (  # noqa: E402
    commit,
    config_key,
    format_duration,
    format_multiplier,
    markdown,
    metric_names,
    read_json,
    stderr_silenced,
    write_json_atomically,
)

with stderr_silenced():
    import numpy as np
    import tensorflow as tf

    import tfrs_clippy_models as models
    from tfrs_clippy.data import make_pipeline, shock_stream
    from tfrs_clippy.data.shock import SHOCKS
    from tfrs_clippy.keras_runtime import keras
    from tfrs_clippy.optimizers import PAPER_GRIDS, LinearWarmup, ScaledAdagrad, build_optimizer
    from tfrs_clippy.stability import (
        AdagradStepLogger,
        DivergenceMonitor,
        RollbackOnDivergence,
        SharpnessMonitor,
        VerdictConfig,
        _plotting,
        classify_run,
    )

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
tf.get_logger().setLevel("ERROR")  # each run's new evaluate function is a retrace Keras warns about
RECORD_VERSION = 2
"""Part of every run's config, hence of its key: bump it when a change to this script changes results."""

STAGES = ("evaluate", "calibrate", "tune", "rollback", "ablation", "sharpness")


@dataclasses.dataclass(frozen=True)
class Family:
    """The methods compared on one base optimizer (`--optimizer`), and how its 1x is found.

    Attributes:
        methods: The methods of `--methods`, in table order: keys of `tfrs_clippy.optimizers.METHODS`, or of
            `VARIANTS`.
        tuned: The methods whose threshold is tuned on the paper's grid (`tune`).
        reference: The unscaled method: `calibrate` sweeps it, `rollback` and `ablation` train it.
        calibration_rates: The absolute learning rates `calibrate` sweeps.
        stages: The stages this family runs.
    """

    methods: tuple[str, ...]
    tuned: tuple[str, ...]
    reference: str
    calibration_rates: tuple[float, ...]
    stages: tuple[str, ...]


VARIANTS = {
    # StableAdamW's test alone (Wortsman et al. 2023: d = 1), and with Clippy's bound (the smaller scale wins).
    "stable_adam": ("clippy_adam", {"variable_relative_threshold": math.inf, "absolute_threshold": math.inf,
                                    "update_rms_threshold": 1.0}),
    "clippy_adam_rms": ("clippy_adam", {"update_rms_threshold": 1.0}),
}
"""Stress methods that are a library method with fixed arguments: name -> (method, arguments)."""
FAMILIES = {
    "adagrad": Family(methods=("naive", "gc", "agc", "lamb", "clippy"), tuned=("gc", "agc", "lamb"),
                      reference="naive", calibration_rates=(0.05, 0.1, 0.2, 0.4, 0.8, 1.6), stages=STAGES),
    "adam": Family(methods=("adam", "gc_adam", "agc_adam", "lamb_adam", "clippy_adam", "stable_adam",
                            "clippy_adam_rms"), tuned=("gc_adam", "agc_adam", "lamb_adam"), reference="adam",
                   calibration_rates=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1), stages=("evaluate", "calibrate", "tune")),
}
TUNED_METHODS = tuple(method for family in FAMILIES.values() for method in family.tuned)
STREAM = {"num_days": 6, "examples_per_day": 25_600, "shock_day": 3}
BATCH_SIZE = 512
SHOCK_STEP = STREAM["shock_day"] * STREAM["examples_per_day"] // BATCH_SIZE
WARMUP_STEPS = 50
RANKER = {"bottom": "shared_bottom", "bottom_units": (256, 256), "tower_units": (64,)}
PRE_SHOCK_STEPS = 20
"""The pre-shock loss level is the median of the losses of this many steps before the shock."""
STEP_WINDOW = range(SHOCK_STEP - 5, SHOCK_STEP + 30)
"""The steps whose per-layer ||g||_2, ||lr r||_inf and clipping factors are recorded."""


def set_examples_per_day(examples_per_day: int) -> None:
    """Resizes the stream's days (tests use tiny ones); the shock stays at the start of day 3."""
    global SHOCK_STEP, STEP_WINDOW  # pylint: disable=global-statement
    STREAM["examples_per_day"] = examples_per_day
    SHOCK_STEP = STREAM["shock_day"] * examples_per_day // BATCH_SIZE
    STEP_WINDOW = range(max(SHOCK_STEP - 5, 0), SHOCK_STEP + 30)
TUNING_SEEDS = range(1000, 1005)
"""Seeds of `calibrate` and `tune`; evaluation seeds start at --seed-offset (0) and must not overlap them."""
SURVIVAL_SEEDS_NEEDED = 4
ABLATIONS = {
    "base": {},
    "smaller (64 x 2)": {"ranker": {"bottom_units": (64, 64)}},
    "wider (512 x 2)": {"ranker": {"bottom_units": (512, 512)}},
    "deeper (256 x 4)": {"ranker": {"bottom_units": (256,) * 4}},
    "+DCN": {"ranker": {"cross_layers": 1}},
    "one task fewer": {"tasks": {"base_rates": (0.3, 0.1, 0.03), "regression": False}},
    "two tasks fewer": {"tasks": {"base_rates": (0.3, 0.1), "regression": False}},
}
COMMITTED = REPOSITORY / "docs" / "stress"
"""The committed results of `make stress` (`--out docs/stress`), which later commands read by default."""


def stage_root(out: pathlib.Path, optimizer: str) -> pathlib.Path:
    """Where a family's stages write: `<out>/<stage>` for Adagrad (the paper's), `<out>/adam/<stage>` for Adam."""
    return out if optimizer == "adagrad" else out / optimizer


def default_calibration(optimizer: str) -> pathlib.Path:
    return stage_root(COMMITTED, optimizer) / "calibrate" / "calibration.json"


def default_tuning(optimizer: str) -> pathlib.Path:
    return stage_root(COMMITTED, optimizer) / "tune" / "dormant_features" / "tuning.json"
ROLLBACK = {"lr_factor": 0.5, "skip_batches": 10, "snapshot_every_n_steps": 5}
SHARPNESS = {"every_n_steps": 25, "max_batch_size": 256, "max_iterations": 20}


# Plans --------------------------------------------------------------------------------------------------------


def run_config(method: str, multiplier: float, base_learning_rate: float, shock: str, seed: int,
               hyperparameters: dict | None = None, variant: str = "base", rollback: bool = False,
               sharpness: bool = False) -> dict[str, Any]:
    """Everything a run's result depends on (its key is `config_key` of it)."""
    return {
        "version": RECORD_VERSION,
        "shock": shock,
        "method": method,
        "hyperparameters": hyperparameters or {},
        "lr_multiplier": multiplier,
        "learning_rate": base_learning_rate * multiplier,
        "seed": seed,
        "variant": variant,
        "rollback": dict(ROLLBACK) if rollback else None,
        "examples_per_day": STREAM["examples_per_day"],
        **({"sharpness": dict(SHARPNESS)} if sharpness else {}),
    }


def tuned_hyperparameters(tuning: dict, method: str, multiplier: float) -> dict:
    """The grid point `tune` chose for (method, multiplier); a variant's arguments; else the method's one point."""
    if method in VARIANTS:
        return dict(VARIANTS[method][1])
    if method not in TUNED_METHODS:
        return dict(PAPER_GRIDS[method][0])
    chosen = tuning.get(method, {}).get(format_multiplier(multiplier))
    if chosen is None:
        raise ValueError(
            f"--tuning has no tuned setting for {method} at {format_multiplier(multiplier)}: run "
            f"`scripts/stress.py --stage tune --lr-multipliers {multiplier:g}` (with the same --optimizer) first."
        )
    return chosen


def plan(args: argparse.Namespace, base: float, tuning: dict) -> list[dict[str, Any]]:
    """The runs of the command's stage, ordered seed by seed so each stream is generated once."""
    seeds = range(args.seed_offset, args.seed_offset + args.seeds)
    shocks = [args.shock] if args.shock == "none" or args.no_control else [args.shock, "none"]
    family = FAMILIES[args.optimizer]
    configs = []
    if args.stage == "evaluate":
        for seed in seeds:
            for shock in shocks:
                for method in args.methods:
                    for multiplier in args.lr_multipliers:
                        hyperparameters = tuned_hyperparameters(tuning, method, multiplier)
                        configs.append(run_config(method, multiplier, base, shock, seed, hyperparameters))
    elif args.stage == "calibrate":
        configs = [run_config(family.reference, rate / base, base, "none", seed)
                   for seed in TUNING_SEEDS for rate in family.calibration_rates]
    elif args.stage == "tune":
        configs = [run_config(method, multiplier, base, args.shock, seed, point)
                   for seed in list(TUNING_SEEDS)[:args.seeds] for method in family.tuned
                   for point in PAPER_GRIDS[method] for multiplier in args.lr_multipliers]
    elif args.stage == "rollback":
        configs = [run_config(family.reference, multiplier, base, args.shock, seed, rollback=rollback)
                   for seed in seeds for multiplier in args.lr_multipliers for rollback in (False, True)]
    elif args.stage == "ablation":
        configs = [run_config(family.reference, multiplier, base, shock, seed, variant=variant)
                   for seed in seeds for variant in ABLATIONS for shock in shocks for multiplier in args.lr_multipliers]
    elif args.stage == "sharpness":
        configs = [run_config(method, multiplier, base, args.shock, seed,
                              tuned_hyperparameters(tuning, method, multiplier), sharpness=True)
                   for seed in seeds for method in args.methods for multiplier in args.lr_multipliers]
    return configs


# One run ------------------------------------------------------------------------------------------------------


class StreamCache:
    """The latest (shock, seed, tasks) streams: the spec, the batched train data in memory, the held-out batch."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._entries: dict[tuple, tuple] = {}

    def get(self, shock: str, seed: int, tasks: dict) -> tuple:
        key = (shock, seed, tuple(sorted((name, str(value)) for name, value in tasks.items())))
        if key not in self._entries:
            if len(self._entries) >= self.size:
                self._entries.pop(next(iter(self._entries)))
            splits = shock_stream(shock=shock, seed=seed, **STREAM, **tasks)
            train = make_pipeline(splits.train, BATCH_SIZE, prefetch=False).cache()
            test = next(iter(make_pipeline(splits.test, splits.sizes["test"], prefetch=False)))
            for _ in train:  # fill the cache once, so every method reads the same tensors
                pass
            self._entries[key] = (splits.spec, train, test)
        return self._entries[key]


def readable_names(ranker: models.Ranker) -> dict[str, str]:
    """Variable name -> "bottom/dense/kernel", "tower_binary_0/dense_3/bias", "cross/...", "embedding/..."."""
    parts = [("embedding", ranker.embedding), ("cross", ranker.cross_network), ("bottom", ranker.bottom),
             *((f"tower_{task}", tower) for task, tower in ranker.towers.items())]
    names = {}
    for part, layer in parts:
        for variable in layer.trainable_variables if layer is not None else []:
            names[variable.name] = "/".join([part, *variable.name.split(":")[0].split("/")[-2:]])
    return names


def dead_unit_fraction(ranker: models.Ranker, features: dict) -> float:
    """The share of the shared bottom's ReLU units that output 0 on every example of `features`."""
    inputs = ranker.embedding(features)
    if ranker.cross_network is not None:
        inputs = ranker.cross_network(inputs)
    dead, total = 0, 0
    for layer in ranker.bottom.mlp.layers:
        inputs = layer(inputs)
        active = tf.reduce_max(inputs, axis=0) > 0
        dead += int(tf.reduce_sum(tf.cast(~active, tf.int32)))
        total += int(active.shape[0])
    return dead / total


def peak_loss_ratio(losses: Sequence[float]) -> float:
    """The largest loss from the shock on over the median of the `PRE_SHOCK_STEPS` losses before it (inf: NaN)."""
    after = np.asarray(losses[SHOCK_STEP:], dtype=np.float64)
    if not np.all(np.isfinite(after)):
        return math.inf
    return float(after.max() / np.median(losses[max(SHOCK_STEP - PRE_SHOCK_STEPS, 0):SHOCK_STEP]))


def train_run(config: dict[str, Any], cache: StreamCache) -> dict[str, Any]:
    """Trains and evaluates one run and returns its record."""
    started = time.perf_counter()
    variant = ABLATIONS[config["variant"]]
    spec, train, test = cache.get(config["shock"], config["seed"], variant.get("tasks", {}))
    keras.backend.clear_session()
    keras.utils.set_random_seed(config["seed"])
    ranker = models.build_ranker(spec, models.RankerConfig(**{**RANKER, **variant.get("ranker", {})}))
    names = readable_names(ranker)
    # Unfused dense steps: at these widths XLA's compile time per run exceeds what it saves in 300 steps.
    method = VARIANTS[config["method"]][0] if config["method"] in VARIANTS else config["method"]
    optimizer = build_optimizer(method, LinearWarmup(config["learning_rate"], WARMUP_STEPS),
                                export_clipping_factors=True, fuse_dense_updates=False, **config["hyperparameters"])
    ranker.compile(optimizer=optimizer)
    if config["rollback"]:
        rollback = config["rollback"]
        monitor = RollbackOnDivergence(lr_factor=rollback["lr_factor"], skip_batches=rollback["skip_batches"],
                                       snapshot_every_n_steps=rollback["snapshot_every_n_steps"])
    else:
        monitor = DivergenceMonitor()
    callbacks = [monitor]
    steps = None
    if isinstance(optimizer, ScaledAdagrad):  # the logger reads Adagrad's accumulators
        steps = AdagradStepLogger(steps=STEP_WINDOW, name_of=lambda variable: names.get(variable.name, variable.name))
        callbacks.append(steps)
    if "sharpness" in config:
        # A fixed batch of the first post-shock day: how sharp the loss the shock brings is, at every point of training.
        post_shock_batch = next(iter(train.skip(SHOCK_STEP)))
        sharpness = SharpnessMonitor(
            post_shock_batch, every_n_steps=config["sharpness"]["every_n_steps"],
            loss_fn=lambda model, batch: tf.add_n(list(model.task_losses(batch).values())),
            max_batch_size=config["sharpness"]["max_batch_size"], max_iterations=config["sharpness"]["max_iterations"])
        callbacks.append(sharpness)
    ranker.fit(train, epochs=1, verbose=0, callbacks=callbacks)
    evaluation = ranker.evaluate(tf.data.Dataset.from_tensors(test), return_dict=True, verbose=0)
    tasks = {task.name: task.kind for task in spec.tasks}
    metrics = {name: float(evaluation[name]) for name in metric_names(tasks)}
    held_out_features, held_out_labels = test
    constant_rmse = {
        f"{task.name}_rmse": float(np.sqrt(np.mean((held_out_labels[task.name].numpy() - task.label_mean) ** 2)))
        for task in spec.tasks if task.kind == "regression"
    }
    losses = [float(loss) for loss in monitor.record.losses]
    verdict = classify_run(losses, metrics, constant_rmse=constant_rmse)
    finite = [loss if math.isfinite(loss) else math.inf for loss in losses]
    record = {
        "key": config_key(config),
        "config": config,
        "tasks": tasks,
        "metrics": metrics,
        "constant_rmse": constant_rmse,
        "losses": losses,
        "verdict": verdict.to_dict(),
        "diverged": verdict.diverged,
        "micro_after_shock": sum(event.kind == "micro" and event.start_step >= SHOCK_STEP
                                 for event in monitor.record.events),
        "peak_loss_ratio": peak_loss_ratio(losses),
        "peak_step": int(np.argmax(finite)),
        "dead_unit_fraction": dead_unit_fraction(ranker, held_out_features),
        "steps": {"steps": steps.record.steps, **steps.record.values} if steps else None,
        "nonfinite_steps_skipped": int(optimizer.nonfinite_steps.numpy()),
        "rollbacks": monitor.rollbacks if isinstance(monitor, RollbackOnDivergence) else None,
        # Steps a rollback undid: from the restored snapshot to the spike, then the skipped batches.
        "steps_undone": sum(event.step - event.restored_step + config["rollback"]["skip_batches"]
                            for event in monitor.rollback_events if event.restored_step is not None)
        if isinstance(monitor, RollbackOnDivergence) else None,
        "seconds": time.perf_counter() - started,
    }
    if "sharpness" in config:
        record["sharpness"] = dataclasses.asdict(sharpness.record)
    return record


# Running ------------------------------------------------------------------------------------------------------


def describe(config: dict[str, Any]) -> str:
    """E.g. "dormant_features gc(threshold=0.01) lr=2x (0.4) seed=1" (+ variant, + " rollback")."""
    settings = ",".join(f"{name}={value:g}" for name, value in sorted(config["hyperparameters"].items()))
    shown = settings and config["method"] in TUNED_METHODS
    method = f"{config['method']}({settings})" if shown else config["method"]
    text = (f"{config['shock']} {method} lr={format_multiplier(config['lr_multiplier'])} "
            f"({config['learning_rate']:g}) seed={config['seed']}")
    if config["variant"] != "base":
        text += f" [{config['variant']}]"
    return text + (" rollback" if config["rollback"] else "")




def outcome(record: dict[str, Any]) -> str:
    """The progress line's summary of a run."""
    aucs = [value for name, value in record["metrics"].items() if name.endswith("_auc")]
    state = f"DIVERGED({record['verdict']['reason']})" if record["diverged"] else "ok"
    return (f"mean AUC {np.mean(aucs):.4f} peak x{record['peak_loss_ratio']:.3g} "
            f"dead {100 * record['dead_unit_fraction']:.0f}% {state}")


def run_all(configs: list[dict[str, Any]], runs_dir: pathlib.Path) -> list[dict[str, Any]]:
    """Runs (or reads back) every config with a progress line each; returns the records in config order."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    keys = [config_key(config) for config in configs]
    to_compute = sum(not (runs_dir / f"{key}.json").exists() for key in keys)
    cache, started, computed, records = StreamCache(), time.perf_counter(), 0, []
    for index, (config, key) in enumerate(zip(configs, keys), start=1):
        path = runs_dir / f"{key}.json"
        prefix = f"[run {index}/{len(configs)}] {describe(config)}"
        if path.exists():
            record = read_json(path)
            print(f"{prefix} ... cached: {outcome(record)}", flush=True)
        else:
            record = train_run(config, cache)
            write_json_atomically(path, record)
            computed += 1
            elapsed = time.perf_counter() - started
            remaining = elapsed / computed * (to_compute - computed)
            print(f"{prefix} ... {outcome(record)} {record['seconds']:.1f}s "
                  f"(elapsed {format_duration(elapsed)}, remaining ~{format_duration(remaining)})", flush=True)
        records.append(record)
    return records


def summary_entry(record: dict[str, Any]) -> dict[str, Any]:
    """A run's line of summary.json: its setting, verdict and measures, without the curves."""
    config = record["config"]
    return {
        "method": config["method"], "hyperparameters": config["hyperparameters"],
        "lr_multiplier": config["lr_multiplier"], "learning_rate": config["learning_rate"], "seed": config["seed"],
        "shock": config["shock"], "variant": config["variant"], "rollback": config["rollback"] is not None,
        "diverged": record["diverged"], "reason": record["verdict"]["reason"],
        "micro_after_shock": record["micro_after_shock"], "peak_loss_ratio": record["peak_loss_ratio"],
        "peak_step": record["peak_step"], "dead_unit_fraction": record["dead_unit_fraction"],
        "rollbacks": record["rollbacks"], "steps_undone": record.get("steps_undone"), "metrics": record["metrics"],
        "key": record["key"],
    }


# Tables -------------------------------------------------------------------------------------------------------


def mean_auc(record: dict[str, Any]) -> float:
    return float(np.mean([value for name, value in record["metrics"].items() if name.endswith("_auc")]))


def group(records: Sequence[dict[str, Any]], *fields: str) -> dict[tuple, list[dict[str, Any]]]:
    """Records grouped by config fields, in first-seen order."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(tuple(str(record["config"][field]) for field in fields), []).append(record)
    return groups




def mean_std(values: Sequence[float], digits: int = 3) -> str:
    values = [value for value in values if math.isfinite(value)]
    if not values:
        return "-"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def ratio_text(values: Sequence[float]) -> str:
    """Median and worst peak-loss ratio, e.g. "1.9 (4.2)"."""
    return f"{np.median(values):.3g} ({max(values):.3g})"


def diverged_text(runs: Sequence[dict[str, Any]]) -> str:
    """E.g. "4/5 (1 before the shock)": diverged runs, and how many of them peaked before the shock."""
    diverged = [run for run in runs if run["diverged"]]
    early = sum(run["peak_step"] < SHOCK_STEP for run in diverged)
    return f"{len(diverged)}/{len(runs)}" + (f" ({early} before the shock)" if early else "")


def setting_text(records: Sequence[dict[str, Any]]) -> str:
    config = records[0]["config"]
    settings = ", ".join(f"{name} {value:g}" for name, value in sorted(config["hyperparameters"].items()))
    return f"{config['method']}" + (f" ({settings})" if settings and config["method"] in TUNED_METHODS else "")


def at_chance(record: dict[str, Any]) -> bool:
    """Every binary task's held-out AUC is within the verdict's chance margin of 0.5: the model ranks nothing.

    A run can end there without "diverging" (no loss blow-up, see `classify_run`): e.g. Adam's too-large steps
    kill the ReLUs and the loss settles at the constant prediction's level. The table counts both.
    """
    margin = VerdictConfig().chance_auc_margin
    return all(abs(value - 0.5) <= margin for name, value in record["metrics"].items() if name.endswith("_auc"))


def comparison_table(records: Sequence[dict[str, Any]]) -> str:
    """Per (method, multiplier): on the shock stream and on its control, divergence, peak, dead units, metrics."""
    by_setting = group(records, "method", "lr_multiplier", "shock")
    shocks = list(dict.fromkeys(record["config"]["shock"] for record in records))
    regression = [name for name in records[0]["metrics"] if name.endswith("_rmse")]
    header = ["method", "lr"]
    for shock in shocks:
        header += [f"{shock}: diverged", "at chance", "micro", "peak loss ratio, median (worst)", "dead units",
                   "mean AUC"]
        header += [f"{name[:-5]} RMSE" for name in regression]
    rows = []
    for (method, multiplier) in dict.fromkeys((key[0], key[1]) for key in by_setting):
        row = None
        for shock in shocks:
            runs = by_setting.get((method, multiplier, shock), [])
            if not runs:
                continue
            if row is None:
                row = [setting_text(runs), format_multiplier(float(multiplier))]
            row += [diverged_text(runs),
                    f"{sum(at_chance(run) for run in runs)}/{len(runs)}",
                    f"{np.mean([run['micro_after_shock'] for run in runs]):.1f}",
                    ratio_text([run["peak_loss_ratio"] for run in runs]),
                    f"{100 * np.mean([run['dead_unit_fraction'] for run in runs]):.0f}%",
                    mean_std([mean_auc(run) for run in runs])]
            row += [mean_std([run["metrics"][name] for run in runs]) for name in regression]
        rows.append(row)
    return markdown(header, rows)


def plot_losses(records: Sequence[dict[str, Any]], path: pathlib.Path, multiplier: float, shock: str) -> str:
    """The median (over seeds) training loss per method around the shock (the paper's Figure 5), to a PNG."""
    runs = [record for record in records
            if record["config"]["lr_multiplier"] == multiplier and record["config"]["shock"] == shock]
    figure, axes = _plotting.pyplot().subplots(figsize=(8, 4.5))
    steps = np.arange(len(runs[0]["losses"]))
    for (method, _), group_runs in group(runs, "method", "lr_multiplier").items():
        losses = np.array([run["losses"] for run in group_runs], dtype=np.float64)
        losses[~np.isfinite(losses)] = np.nan
        diverged = sum(run["diverged"] for run in group_runs)
        axes.plot(steps, np.nanmedian(losses, axis=0), linewidth=1.0,
                  label=f"{setting_text(group_runs)}: {diverged}/{len(group_runs)} diverged")
    axes.axvline(SHOCK_STEP, color="black", linestyle=":", linewidth=1, label=f"shock ({shock})")
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("training loss (median over seeds)")
    axes.set_title(f"Loss around the shock, lr {format_multiplier(multiplier)}")
    axes.legend(fontsize=7)
    return _plotting.save_png(figure, str(path))


def layer_values(record: dict[str, Any], quantity: str, step: int) -> dict[str, float]:
    """{variable: value} of one recorded quantity at `step`, kernels only (biases have no width to compare)."""
    index = record["steps"]["steps"].index(step)
    return {name: values[index] for name, values in record["steps"].get(quantity, {}).items()
            if name.endswith("kernel")}


def plot_shock_layers(records: Sequence[dict[str, Any]], path: pathlib.Path, multiplier: float, shock: str) -> str:
    """Per layer at the shock's step (the first update on new data): ||g||_2, ||lr r||_inf and each factor (Fig. 4)."""
    runs = [record for record in records if record["config"]["lr_multiplier"] == multiplier
            and record["config"]["shock"] == shock and record["config"]["seed"] == records[0]["config"]["seed"]]
    step = SHOCK_STEP  # the first update on post-shock data
    quantities = (("grad_norm", "||g||_2"), ("max_update", "||lr r||_inf"), ("clipping_factor", "clipping factor"))
    figure, axes = _plotting.pyplot().subplots(1, 3, figsize=(15, 4.5))
    for axis, (quantity, title) in zip(axes, quantities):
        for position, run in enumerate(runs):
            values = layer_values(run, quantity, step)
            layers = list(values)
            offsets = np.arange(len(layers)) + position / (len(runs) + 1)
            axis.bar(offsets, [values[layer] for layer in layers], width=1 / (len(runs) + 1),
                     label=setting_text([run]))
        axis.set_xticks(np.arange(len(layers)) + 0.4)
        axis.set_xticklabels([layer.rsplit("/", 1)[0] for layer in layers], rotation=60, fontsize=6, ha="right")
        axis.set_yscale("log")
        axis.set_title(f"{title} at step {step}")
    axes[0].legend(fontsize=7)
    figure.suptitle(f"Per layer at the shock ({shock}), lr {format_multiplier(multiplier)}, "
                    f"seed {runs[0]['config']['seed']}")
    figure.tight_layout()
    return _plotting.save_png(figure, str(path))


def plot_clippy_factors(records: Sequence[dict[str, Any]], path: pathlib.Path, multiplier: float, shock: str) -> str:
    """Clippy's clipping factor per layer over the recorded window around the shock (the paper's Figure 6)."""
    run = next(record for record in records if record["config"]["method"] == "clippy"
               and record["config"]["lr_multiplier"] == multiplier and record["config"]["shock"] == shock)
    figure, axes = _plotting.pyplot().subplots(figsize=(8, 4.5))
    for name, values in run["steps"]["clipping_factor"].items():
        if name.endswith("kernel"):
            axes.plot(run["steps"]["steps"], values, label=name.rsplit("/", 1)[0])
    axes.axvline(SHOCK_STEP, color="black", linestyle=":", linewidth=1)
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("clipping factor")
    axes.set_title(f"Clippy's factors by layer, {shock}, lr {format_multiplier(multiplier)}, "
                   f"seed {run['config']['seed']}")
    axes.legend(fontsize=7)
    return _plotting.save_png(figure, str(path))


def calibration_report(records: Sequence[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The sweep's table and its result: 1x, the largest rate naive survives on the control in >= 4 of 5 seeds."""
    rows, survived = [], {}
    for (rate,), runs in group(records, "learning_rate").items():
        survived[float(rate)] = sum(not run["diverged"] for run in runs)
        rows.append([f"{float(rate):g}", f"{survived[float(rate)]}/{len(runs)}",
                     mean_std([mean_auc(run) for run in runs]), ratio_text([run["peak_loss_ratio"] for run in runs])])
    stable = [rate for rate, count in survived.items() if count >= SURVIVAL_SEEDS_NEEDED]
    result = {"base_learning_rate": max(stable) if stable else None, "survived": survived,
              "seeds": list(TUNING_SEEDS), "rule": f"largest rate with >= {SURVIVAL_SEEDS_NEEDED} of "
                                                    f"{len(TUNING_SEEDS)} seeds not diverged on the control"}
    table = markdown(["learning rate", "survived", "mean AUC", "peak loss ratio, median (worst)"], rows)
    return table, result


def tuning_report(records: Sequence[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Per (method, multiplier) each grid point's outcome on the tuning seeds, and the chosen point.

    The choice: the point with the highest mean held-out AUC over the tuning seeds (a diverged run counts with its
    AUC, so a setting that diverges is rarely chosen).
    """
    chosen: dict[str, dict[str, dict]] = {}
    rows = []
    for (method, multiplier), runs in group(records, "method", "lr_multiplier").items():
        points = group(runs, "hyperparameters")
        scores = {key: float(np.mean([mean_auc(run) for run in point])) for key, point in points.items()}
        best = max(scores, key=scores.get)
        label = format_multiplier(float(multiplier))
        chosen.setdefault(method, {})[label] = points[best][0]["config"]["hyperparameters"]
        for key, point in points.items():
            rows.append([method, label, setting_text(point), f"{sum(run['diverged'] for run in point)}/{len(point)}",
                         mean_std([mean_auc(run) for run in point]), "chosen" if key == best else ""])
    return markdown(["method", "lr", "setting", "diverged", "mean AUC", ""], rows), chosen


def rollback_table(records: Sequence[dict[str, Any]]) -> str:
    rows = []
    for (multiplier, rollback), runs in group(records, "lr_multiplier", "rollback").items():
        rows.append([format_multiplier(float(multiplier)), "yes" if rollback != "None" else "no",
                     diverged_text(runs),
                     f"{np.mean([run['rollbacks'] or 0 for run in runs]):.1f}",
                     f"{np.mean([run.get('steps_undone') or 0 for run in runs]):.0f}",
                     ratio_text([run["peak_loss_ratio"] for run in runs]),
                     f"{100 * np.mean([run['dead_unit_fraction'] for run in runs]):.0f}%",
                     mean_std([mean_auc(run) for run in runs])])
    return markdown(["lr", "rollback", "diverged", "rollbacks per run", "steps undone per run (of 300)",
                     "peak loss ratio, median (worst)",
                     "dead units", "mean AUC"], rows)


def ablation_table(records: Sequence[dict[str, Any]]) -> str:
    rows = []
    for (variant, shock, multiplier), runs in group(records, "variant", "shock", "lr_multiplier").items():
        rows.append([variant, shock, format_multiplier(float(multiplier)),
                     diverged_text(runs),
                     ratio_text([run["peak_loss_ratio"] for run in runs]),
                     f"{100 * np.mean([run['dead_unit_fraction'] for run in runs]):.0f}%",
                     mean_std([mean_auc(run) for run in runs])])
    return markdown(["variant", "stream", "lr", "diverged", "peak loss ratio, median (worst)", "dead units",
                     "mean AUC"], rows)


def sharpness_table(records: Sequence[dict[str, Any]]) -> str:
    """Per run: the preconditioned sharpness of the post-shock batch before the shock and after it, vs 2 / lr."""
    steps = np.asarray(records[0]["sharpness"]["steps"])
    shown = [int(steps[steps < SHOCK_STEP].max()), *(int(step) for step in steps[steps >= SHOCK_STEP][:3])]
    rows = []
    for record in records:
        measured = record["sharpness"]
        index = {int(step): i for i, step in enumerate(measured["steps"])}
        rows.append([setting_text([record]), format_multiplier(record["config"]["lr_multiplier"]),
                     str(record["config"]["seed"]), f"{measured['stability_threshold'][index[shown[0]]]:.3g}",
                     *(f"{measured['preconditioned_sharpness'][index[step]]:.3g}" for step in shown if step in index),
                     "yes" if record["diverged"] else "no"])
    header = ["method", "lr", "seed", "2 / lr", *(f"after step {step}" for step in shown), "diverged"]
    return markdown(header, rows)


def plot_sharpness_runs(records: Sequence[dict[str, Any]], path: pathlib.Path) -> str:
    """The preconditioned sharpness of the post-shock batch over training, per run, against 2 / learning rate."""
    figure, axes = _plotting.pyplot().subplots(figsize=(8, 4.5))
    for record in records:
        measured = record["sharpness"]
        label = f"{setting_text([record])} {format_multiplier(record['config']['lr_multiplier'])} " \
                f"seed {record['config']['seed']}"
        line, = axes.plot(measured["steps"], measured["preconditioned_sharpness"], marker=".", label=label)
        axes.plot(measured["steps"], measured["stability_threshold"], linestyle="--", color=line.get_color(),
                  linewidth=0.8)
    axes.axvline(SHOCK_STEP, color="black", linestyle=":", linewidth=1)
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("preconditioned sharpness (dashed: 2 / lr)")
    axes.set_title("Sharpness of a post-shock batch over training")
    axes.legend(fontsize=7)
    return _plotting.save_png(figure, str(path))


def final_loss(record: dict[str, Any]) -> float:
    """The median loss of the last 10% of the steps (inf if any loss was non-finite)."""
    losses = np.asarray(record["losses"], dtype=np.float64)
    return float(np.median(losses[-len(losses) // 10:])) if np.all(np.isfinite(losses)) else math.inf


def plot_sensitivity(records: Sequence[dict[str, Any]], path: pathlib.Path) -> str:
    """Final training loss and mean held-out AUC against the learning rate, per method and stream (Wortsman et al.
    2023: a method that widens the range of good rates is a method that makes training stable)."""
    figure, (loss_axis, auc_axis) = _plotting.pyplot().subplots(1, 2, figsize=(12, 4.5))
    for (method, shock), runs in group(records, "method", "shock").items():
        by_rate = group(runs, "learning_rate")
        rates = [float(rate) for (rate,) in by_rate]
        style = dict(marker="o", linestyle="-" if shock != "none" else ":", label=f"{method}, {shock}")
        loss_axis.plot(rates, [np.median([final_loss(run) for run in rate_runs]) for rate_runs in by_rate.values()],
                       **style)
        auc_axis.plot(rates, [np.mean([mean_auc(run) for run in rate_runs]) for rate_runs in by_rate.values()],
                      **style)
    for axis, label in ((loss_axis, "final training loss (median over seeds)"), (auc_axis, "mean held-out AUC")):
        axis.set_xscale("log")
        axis.set_xlabel("learning rate")
        axis.set_ylabel(label)
        axis.legend(fontsize=6)
    loss_axis.set_yscale("log")
    figure.suptitle("Learning-rate sensitivity (solid: shock stream, dotted: control)")
    figure.tight_layout()
    return _plotting.save_png(figure, str(path))


# Command line -------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parses and checks the command line; a bad value exits with a message naming the flag."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", default="evaluate", choices=STAGES)
    parser.add_argument("--shock", default="dormant_features", choices=SHOCKS)
    parser.add_argument("--no-control", action="store_true", help="do not also run the control stream")
    parser.add_argument("--optimizer", default="adagrad", choices=tuple(FAMILIES),
                        help="the base optimizer whose methods are compared (Adagrad: the paper's)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated; default: all of the optimizer's, "
                             + "; ".join(f"{name}: {','.join(family.methods)}" for name, family in FAMILIES.items()))
    parser.add_argument("--lr-multipliers", default="1,2", help="comma-separated multipliers of 1x")
    parser.add_argument("--seeds", type=int, default=5, help="number of evaluation seeds")
    parser.add_argument("--seed-offset", type=int, default=0, help="the first evaluation seed")
    parser.add_argument("--base-learning-rate", type=float, default=None,
                        help="1x; default: the calibrated rate in "
                             f"{default_calibration('adagrad').relative_to(REPOSITORY)} (Adam: "
                             f"{default_calibration('adam').relative_to(REPOSITORY)})")
    parser.add_argument("--tuning", default=None,
                        help="tuning.json of the tune stage; default: "
                             f"{default_tuning('adagrad').relative_to(REPOSITORY)} "
                             f"(Adam: {default_tuning('adam').relative_to(REPOSITORY)})")
    parser.add_argument("--out", default="results/stress", help="output folder (tables, plots, summaries)")
    parser.add_argument("--runs-dir", default=None, help="where run records are cached (default: <out>/runs)")
    parser.add_argument("--examples-per-day", type=int, default=STREAM["examples_per_day"],
                        help="examples per day of the 6-day stream (the shock starts on day 3)")
    args = parser.parse_args(argv)
    family = FAMILIES[args.optimizer]
    args.methods = list(family.methods) if args.methods is None else comma_list(args.methods)
    unknown = [method for method in args.methods if method not in family.methods]
    if unknown or not args.methods:
        parser.error(f"--methods must be among {family.methods} (--optimizer {args.optimizer}), got {args.methods}")
    if args.stage not in family.stages:
        parser.error(f"--stage {args.stage} is not run for --optimizer {args.optimizer} (its stages: {family.stages})")
    args.tuning = args.tuning or str(default_tuning(args.optimizer))
    try:
        args.lr_multipliers = [float(value) for value in comma_list(args.lr_multipliers)]
    except ValueError:
        parser.error(f"--lr-multipliers must be comma-separated numbers, got {args.lr_multipliers!r}")
    if not args.lr_multipliers or not all(value > 0 and math.isfinite(value) for value in args.lr_multipliers):
        parser.error(f"--lr-multipliers must be positive numbers, got {args.lr_multipliers}")
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    evaluation_seeds = range(args.seed_offset, args.seed_offset + args.seeds)
    if args.stage not in ("calibrate", "tune") and set(evaluation_seeds) & set(TUNING_SEEDS):
        parser.error(f"--seed-offset {args.seed_offset} with --seeds {args.seeds} overlaps the tuning seeds "
                     f"{TUNING_SEEDS.start}..{TUNING_SEEDS.stop - 1}")
    if args.examples_per_day < BATCH_SIZE:
        parser.error(f"--examples-per-day must be >= the batch size {BATCH_SIZE}, got {args.examples_per_day}")
    if args.base_learning_rate is not None and not args.base_learning_rate > 0:
        parser.error(f"--base-learning-rate must be > 0, got {args.base_learning_rate}")
    return args


def base_learning_rate(args: argparse.Namespace) -> float:
    """--base-learning-rate, else the calibrated 1x (the calibrate stage sweeps absolute rates: 1x is 1)."""
    if args.stage == "calibrate":
        return 1.0
    if args.base_learning_rate is not None:
        return args.base_learning_rate
    calibration = default_calibration(args.optimizer)
    if not calibration.exists():
        raise SystemExit(f"No {calibration}: run `scripts/stress.py --optimizer {args.optimizer} --stage calibrate` "
                         "or pass --base-learning-rate.")
    return float(read_json(calibration)["base_learning_rate"])




def write_reports(args: argparse.Namespace, records: list[dict[str, Any]], out: pathlib.Path, base: float,
                  seconds: float) -> str:
    """Writes summary.json, table.md and the stage's plots and JSON; returns the Markdown report."""
    write_json_atomically(out / "summary.json", [summary_entry(record) for record in records])
    command = "scripts/stress.py " + " ".join(sys.argv[1:])
    rates = "absolute learning rates" if args.stage == "calibrate" else f"1x = {base:g}"
    lines = [f"Generated by `TF_USE_LEGACY_KERAS=1 python {command}` at commit {commit()}: "
             f"{len(records)} runs of {format_duration(sum(record['seconds'] for record in records))} in all "
             f"(this command {format_duration(seconds)}; runs already in the cache are read back) on "
             f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}, "
             f"load average {os.getloadavg()[0]:.1f} at the end). "
             f"{rates}; shock at step {SHOCK_STEP} of "
             f"{len(records[0]['losses'])}; batch {BATCH_SIZE}; {WARMUP_STEPS}-step warm-up.", ""]
    if args.stage == "evaluate":
        lines.append(comparison_table(records))
        if len(args.lr_multipliers) > 2:
            plot_sensitivity(records, out / "sensitivity.png")
        for multiplier in args.lr_multipliers:
            label = format_multiplier(multiplier)
            plot_losses(records, out / f"loss_{label}.png", multiplier, args.shock)
            if args.shock != "none" and args.optimizer == "adagrad":  # Adam runs log no per-layer Adagrad steps
                plot_shock_layers(records, out / f"layers_at_shock_{label}.png", multiplier, args.shock)
                if "clippy" in args.methods:
                    plot_clippy_factors(records, out / f"clippy_factors_{label}.png", multiplier, args.shock)
    elif args.stage == "calibrate":
        table, result = calibration_report(records)
        lines.append(table)
        lines += ["", f"1x = {result['base_learning_rate']} ({result['rule']})."]
        write_json_atomically(out / "calibration.json", result)
    elif args.stage == "tune":
        table, chosen = tuning_report(records)
        lines.append(table)
        write_json_atomically(out / "tuning.json", chosen)
    elif args.stage == "rollback":
        lines.append(rollback_table(records))
    elif args.stage == "ablation":
        lines.append(ablation_table(records))
    elif args.stage == "sharpness":
        lines.append(sharpness_table(records))
        plot_sharpness_runs(records, out / "sharpness.png")
    report = "\n".join(lines) + "\n"
    (out / "table.md").write_text(report, encoding="utf-8")
    return report


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    set_examples_per_day(args.examples_per_day)
    out = stage_root(pathlib.Path(args.out), args.optimizer) / args.stage
    if args.stage != "calibrate":  # the calibration sweep always runs on the control stream
        out = out / args.shock
    base = base_learning_rate(args)
    tuning = read_json(args.tuning) if pathlib.Path(args.tuning).exists() else {}
    try:
        configs = plan(args, base, tuning)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    started = time.perf_counter()
    print(f"{len(configs)} runs ({args.stage}); results in {out}", flush=True)
    # One folder for every stage: a run that two stages plan is trained once.
    records = run_all(configs, pathlib.Path(args.runs_dir or pathlib.Path(args.out) / "runs"))
    print(write_reports(args, records, out, base, time.perf_counter() - started), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
