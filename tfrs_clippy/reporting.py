"""Run records, run-level divergence verdicts, the paper-shaped tables and the plots of the reproduction.

Pure helpers, free of any model: `scripts/reproduce.py` trains and evaluates, and hands this module one *run
record* per run, a JSON-serializable dict:

    {
      "key": "<config_key(config)>",
      "config": {"dataset", "model", "scale", "method", "hyperparameters", "lr_multiplier", "learning_rate",
                 "seed", "batch_size", "rollback", ...},
      "tasks": {"<task>": "binary" | "regression", ...},
      "metrics": {"<task>_auc" | "<task>_rmse": float, ...},   # on the held-out (newest) split
      "losses": [per-step training loss, ...],
      "verdict": {"diverged", "reason", "micro_divergences", "full_divergences"},
      "clipping_factors": {"steps": [...], "factors": {"<variable>": [...]}},   # optional
      "rollbacks": int,                                                          # optional
      "seconds": float,
    }

What "diverged" means (`classify_run`): the loss or a held-out metric is NaN/Inf; or every binary task's AUC is
near chance (0.5) *and* the loss either ends far above the best level it reached or blew up at some point (its
peak far above its best). Both halves are needed: a loss that shifts up while the model still ranks well has not
diverged, and neither has a model that is merely undertrained (AUC near 0.5 without any blow-up). The blow-up
test catches the commonest failure of a too-large Adagrad step: the loss explodes in the first steps, before any
baseline exists, the ReLUs die, and the loss falls back to about its initial level with a constant prediction,
never "far above its best" but never learning again. A milder form kills one task only: after a blow-up, a
binary task whose AUC is 0.5 to within `dead_task_auc_margin` predicts a constant, or a regression task's RMSE is
more than `dead_task_rmse_ratio` times that of always predicting the training mean (when the caller gives that
reference), while the total loss, carried by the other tasks, looks healthy; that run diverged too
("task_dead_after_blow_up").

Spikes are counted separately by `tfrs_clippy.stability.detect_divergence`: micro (recovered) and full
(non-finite, or no recovery in time). The detector flags nothing during its warm-up, before it has a baseline,
yet an oversized first Adagrad step spikes exactly there; so a blow-up in the warm-up steps (a loss above
`blow_up_ratio` times the first step's) that the run recovers from counts as one more micro-divergence.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import tempfile
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from tfrs_clippy.stability import ClippingFactorRecord, DetectorConfig, detect_divergence, plot_clipping_factors
from tfrs_clippy.stability import _plotting
from tfrs_clippy.optimizers.variable_names import check_patterns, matches_any

Record = Mapping[str, Any]

METHOD_COLUMNS = (("naive", "Naive"), ("gc", "GC"), ("agc", "AGC"), ("lamb", "LAMB"), ("clippy", "Clippy"))
"""The paper's Table 2 columns: (method key, column title)."""

MODEL_TITLES = {"small": "Small", "large": "Large", "large_dcn": "Large+DCN"}


# Records: keys, atomic writes ----------------------------------------------------------------------------------


def config_key(config: Mapping[str, Any]) -> str:
    """A 16-hex-digit key of a run config: the same config (in any key order) always gives the same key."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def write_json_atomically(path: str | pathlib.Path, content: Any) -> pathlib.Path:
    """Writes `content` as JSON to `path` via a temporary file and a rename, so a reader never sees half a file.

    An interrupted run leaves either no file or the previous complete one: resuming can trust any file it finds.
    NaN and Inf are written as JSON's non-standard `NaN`/`Infinity`, which `json.load` reads back.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump(content, file, indent=1, sort_keys=True)
        os.chmod(temporary, 0o644)  # mkstemp makes the file private; records are meant to be shared
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return path


def read_json(path: str | pathlib.Path) -> Any:
    """The JSON content of `path`."""
    return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))


# Run-level divergence --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VerdictConfig:
    """Thresholds of `classify_run`.

    Attributes:
        far_above_best_ratio: The loss "ends far above its best" when the median loss of the last `tail_fraction`
            of the steps exceeds this multiple of the best (lowest) smoothed loss. Default 2, the detector's
            `spike_ratio`: the loss doubled and stayed there.
        tail_fraction: Share of the final steps whose median is the run's final loss level.
        blow_up_ratio: The loss "blew up" when its largest value exceeds this multiple of the best smoothed loss.
        smoothing_steps: Window of the moving average the best loss is taken over (so one lucky batch is not "best").
        chance_auc_margin: An AUC within this distance of 0.5 is "near chance".
        dead_task_auc_margin: An AUC within this distance of 0.5 is a constant prediction (a dead task).
        dead_task_rmse_ratio: An RMSE above this multiple of the constant-mean prediction's is a dead task.
        detector: Spike thresholds for counting micro and full divergences.
    """

    far_above_best_ratio: float = 2.0
    tail_fraction: float = 0.1
    blow_up_ratio: float = 10.0
    smoothing_steps: int = 10
    chance_auc_margin: float = 0.02
    dead_task_auc_margin: float = 0.002
    dead_task_rmse_ratio: float = 1.5
    detector: DetectorConfig = dataclasses.field(default_factory=DetectorConfig)

    def __post_init__(self) -> None:
        if not (self.far_above_best_ratio > 1 and math.isfinite(self.far_above_best_ratio)):
            raise ValueError(f"`far_above_best_ratio` must be a finite number > 1, got {self.far_above_best_ratio}.")
        if not (self.blow_up_ratio > 1 and math.isfinite(self.blow_up_ratio)):
            raise ValueError(f"`blow_up_ratio` must be a finite number > 1, got {self.blow_up_ratio}.")
        if not 0 < self.tail_fraction <= 1:
            raise ValueError(f"`tail_fraction` must be in (0, 1], got {self.tail_fraction}.")
        steps = self.smoothing_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"`smoothing_steps` must be an int >= 1, got {self.smoothing_steps!r}.")
        for name in ("chance_auc_margin", "dead_task_auc_margin"):
            if not 0 <= getattr(self, name) < 0.5:
                raise ValueError(f"`{name}` must be in [0, 0.5), got {getattr(self, name)}.")


@dataclasses.dataclass(frozen=True)
class RunVerdict:
    """Whether a run diverged, why, and how many spikes it had.

    Attributes:
        diverged: The run fully diverged (see the module docstring).
        reason: "non_finite_loss", "non_finite_metric", "far_above_best_at_chance", "blew_up_at_chance",
            "task_dead_after_blow_up", or "" when not diverged.
        micro_divergences: Spikes that recovered (the detector also sees blow-ups in its warm-up).
        full_divergences: Spikes that did not recover in time, or runs of NaN/Inf losses (the detector's count;
            a run can have one and still not be diverged, if its final loss and AUC are healthy).
        final_to_best_ratio: The final loss level over the best smoothed loss (inf if the loss was non-finite).
        peak_to_best_ratio: The largest loss over the best smoothed loss (inf if the loss was non-finite).
        warmup_blow_up: A loss of the detector's warm-up steps exceeded `blow_up_ratio` times the first step's.
    """

    diverged: bool
    reason: str
    micro_divergences: int
    full_divergences: int
    final_to_best_ratio: float
    peak_to_best_ratio: float
    warmup_blow_up: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """The trailing moving average of `values` over `window` steps (shorter at the start); NaN/Inf propagate."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return values
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    ends = np.arange(1, values.size + 1)
    starts = np.maximum(ends - window, 0)
    with np.errstate(invalid="ignore"):
        return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def classify_run(
    losses: Sequence[float],
    metrics: Mapping[str, float],
    config: Optional[VerdictConfig] = None,
    constant_rmse: Optional[Mapping[str, float]] = None,
) -> RunVerdict:
    """The run-level verdict of a run from its per-step training losses and held-out metrics.

    Args:
        losses: The training loss of every step, in order.
        metrics: Held-out metrics; keys ending in "_auc" are binary tasks' AUCs, in "_rmse" regression RMSEs.
        config: Thresholds; `VerdictConfig()` by default.
        constant_rmse: Per "<task>_rmse" metric, the held-out RMSE of always predicting the training mean; without
            it a regression task is never judged dead.

    Raises:
        ValueError: `losses` is empty.
    """
    config = config or VerdictConfig()
    losses = np.asarray(losses, dtype=np.float64)
    if losses.size == 0:
        raise ValueError("classify_run: `losses` is empty; a run has at least one step.")
    record = detect_divergence(losses, config.detector)
    micro, full = record.count("micro"), record.count("full")
    warmup = losses[:config.detector.warmup_steps]
    # NaN compares False: a non-finite warm-up is the non-finite case below, not a blow-up.
    warmup_blow_up = bool(np.any(warmup[1:] > config.blow_up_ratio * warmup[0]))
    if not np.all(np.isfinite(losses)):
        return RunVerdict(True, "non_finite_loss", micro, full, math.inf, math.inf, warmup_blow_up)
    best = float(np.min(moving_average(losses, config.smoothing_steps)))
    tail = losses[-max(1, math.ceil(config.tail_fraction * losses.size)):]
    final_ratio, peak_ratio = (_ratio(float(np.median(tail)), best), _ratio(float(np.max(losses)), best))
    if not all(math.isfinite(value) for value in metrics.values()):
        return RunVerdict(True, "non_finite_metric", micro, full, final_ratio, peak_ratio, warmup_blow_up)
    distances = [abs(value - 0.5) for name, value in metrics.items() if name.endswith("_auc")]
    at_chance = bool(distances) and max(distances) <= config.chance_auc_margin
    blew_up = peak_ratio > config.blow_up_ratio
    reason = ""
    if at_chance and final_ratio > config.far_above_best_ratio:
        reason = "far_above_best_at_chance"
    elif at_chance and blew_up:
        reason = "blew_up_at_chance"
    elif blew_up and _has_dead_task(metrics, config, constant_rmse or {}):
        reason = "task_dead_after_blow_up"
    return RunVerdict(bool(reason), reason, micro, full, final_ratio, peak_ratio, warmup_blow_up)


def _has_dead_task(metrics: Mapping[str, float], config: VerdictConfig, constant_rmse: Mapping[str, float]) -> bool:
    """Whether a binary task predicts a constant or a regression task does far worse than the training mean."""
    for name, value in metrics.items():
        if name.endswith("_auc") and abs(value - 0.5) <= config.dead_task_auc_margin:
            return True
        if name in constant_rmse and value > config.dead_task_rmse_ratio * constant_rmse[name]:
            return True
    return False


def _ratio(value: float, best: float) -> float:
    """value / best for non-negative losses, defined when best is 0 (losses are >= 0)."""
    if best > 0:
        return value / best
    return math.inf if value > 0 else 1.0


# Selection and tables --------------------------------------------------------------------------------------------


def metric_names(tasks: Mapping[str, str]) -> list[str]:
    """The held-out metric of each task, binary tasks first (as the paper's rows): "<task>_auc", "<task>_rmse"."""
    binary = [f"{task}_auc" for task, kind in tasks.items() if kind == "binary"]
    regression = [f"{task}_rmse" for task, kind in tasks.items() if kind == "regression"]
    return binary + regression


def selection_score(metrics: Mapping[str, float]) -> float:
    """What "best" maximizes: the mean AUC over binary tasks, or minus the mean RMSE when there is no binary task."""
    aucs = [value for name, value in metrics.items() if name.endswith("_auc")]
    if aucs:
        return float(np.mean(aucs))
    return -float(np.mean([value for name, value in metrics.items() if name.endswith("_rmse")]))


@dataclasses.dataclass(frozen=True)
class Candidate:
    """The seeds of one (model, method, learning-rate multiplier, hyper-parameters) setting."""

    model: str
    method: str
    lr_multiplier: float
    hyperparameters: Mapping[str, Any]
    runs: tuple[Record, ...]

    @property
    def diverged_runs(self) -> int:
        return sum(bool(run["verdict"]["diverged"]) for run in self.runs)

    @property
    def stable(self) -> bool:
        """No seed diverged: only such settings can be "best"."""
        return self.diverged_runs == 0

    @property
    def score(self) -> float:
        """Mean over seeds of `selection_score`."""
        return float(np.mean([selection_score(run["metrics"]) for run in self.runs]))

    def label(self, show_hyperparameters: bool) -> str:
        """E.g. "2x" or "2x, threshold=0.01"."""
        text = format_multiplier(self.lr_multiplier)
        if show_hyperparameters and self.hyperparameters:
            text += ", " + ", ".join(f"{name}={value:g}" for name, value in sorted(self.hyperparameters.items()))
        return text


def format_multiplier(multiplier: float) -> str:
    """1.0 -> "1x", 0.5 -> "0.5x"."""
    return f"{multiplier:g}x"


def candidates(records: Iterable[Record]) -> dict[tuple[str, str], list[Candidate]]:
    """The records (rollback runs left out) grouped by (model, method), each a list of `Candidate`s by lr, grid."""
    groups: dict[tuple, list[Record]] = collections.defaultdict(list)
    for record in records:
        config = record["config"]
        if config.get("rollback"):
            continue
        setting = json.dumps(config["hyperparameters"], sort_keys=True)
        groups[(config["model"], config["method"], float(config["lr_multiplier"]), setting)].append(record)
    by_method: dict[tuple[str, str], list[Candidate]] = collections.defaultdict(list)
    for (model, method, multiplier, setting), runs in sorted(groups.items()):
        runs.sort(key=lambda run: run["config"]["seed"])
        by_method[(model, method)].append(Candidate(model, method, multiplier, json.loads(setting), tuple(runs)))
    return dict(by_method)


def best_candidate(options: Sequence[Candidate]) -> Optional[Candidate]:
    """The stable candidate of the highest score (ties: the smaller learning rate), or None if none is stable."""
    stable = [option for option in options if option.stable]
    if not stable:
        return None
    return max(stable, key=lambda option: (option.score, -option.lr_multiplier))


def format_mean_std(values: Sequence[float], metric: str) -> str:
    """AUCs in percent with 2 decimals (as the paper), RMSEs with 4; std over seeds with ddof=1 (0 for one seed)."""
    values = np.asarray(values, dtype=np.float64)
    std = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
    if metric.endswith("_auc"):
        return f"{100 * values.mean():.2f} ± {100 * std:.2f}"
    return f"{values.mean():.4f} ± {std:.4f}"


def _metric_title(metric: str) -> str:
    task, kind = metric.rsplit("_", 1)
    return f"{kind.upper()} ({task})"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _ordered_models(records: Sequence[Record]) -> list[str]:
    present = {record["config"]["model"] for record in records}
    return [model for model in MODEL_TITLES if model in present] + sorted(present - set(MODEL_TITLES))


def paper_table(records: Sequence[Record]) -> str:
    """The paper's Table 2 as Markdown: rows model x (AUC per binary task, RMSE per regression task, best lr).

    Per (model, method) the cell shows mean ± std over seeds of the best stable setting (learning-rate multiplier
    and, for methods with a grid, hyper-parameters; see `best_candidate`), or "diverged (k/n)" when every setting
    had a diverged seed, k of the method's n runs on that model having diverged.

    Raises:
        ValueError: `records` is empty.
    """
    if not records:
        raise ValueError("paper_table: no run records.")
    tasks = records[0]["tasks"]
    by_method = candidates(records)
    rows = []
    for model in _ordered_models(records):
        chosen = {method: best_candidate(by_method.get((model, method), [])) for method, _ in METHOD_COLUMNS}
        for metric in metric_names(tasks):
            row = [f"{MODEL_TITLES.get(model, model)} {_metric_title(metric)}"]
            for method, _ in METHOD_COLUMNS:
                row.append(_cell(by_method.get((model, method), []), chosen[method], metric))
            rows.append(row)
        best_lr_row = [f"{MODEL_TITLES.get(model, model)} best lr"]
        for method, _ in METHOD_COLUMNS:
            options = by_method.get((model, method), [])
            grid_size = len({json.dumps(option.hyperparameters, sort_keys=True) for option in options})
            best_lr_row.append(_best_lr_cell(options, chosen[method], grid_size > 1))
        rows.append(best_lr_row)
    return _markdown(["Model, metric", *(title for _, title in METHOD_COLUMNS)], rows)


def _cell(options: Sequence[Candidate], chosen: Optional[Candidate], metric: str) -> str:
    if not options:
        return "–"
    if chosen is None:
        return _diverged_text(options)
    return format_mean_std([run["metrics"][metric] for run in chosen.runs], metric)


def _best_lr_cell(options: Sequence[Candidate], chosen: Optional[Candidate], show_hyperparameters: bool) -> str:
    if not options:
        return "–"
    if chosen is None:
        return _diverged_text(options)
    return chosen.label(show_hyperparameters)


def _diverged_text(options: Sequence[Candidate]) -> str:
    diverged = sum(option.diverged_runs for option in options)
    total = sum(len(option.runs) for option in options)
    return f"diverged ({diverged}/{total})"


def stability_table(records: Sequence[Record]) -> str:
    """Per model and learning-rate multiplier, per method: the best setting's mean AUC, diverged runs, spikes.

    A cell reads "71.20 · 0/3 div · 2 micro": the mean over seeds of the mean binary AUC (in percent; minus the
    mean RMSE with no binary task) of the method's best setting at that multiplier (a diverged one only if no
    setting is stable), how many of that setting's seeds diverged, and the micro-divergences they had.
    """
    by_method = candidates(records)
    multipliers = sorted({option.lr_multiplier for options in by_method.values() for option in options})
    rows = []
    for model in _ordered_models(records):
        for multiplier in multipliers:
            row = [f"{MODEL_TITLES.get(model, model)} {format_multiplier(multiplier)}"]
            for method, _ in METHOD_COLUMNS:
                options = [o for o in by_method.get((model, method), []) if o.lr_multiplier == multiplier]
                if not options:
                    row.append("–")
                    continue
                shown = best_candidate(options) or min(options, key=lambda option: option.diverged_runs)
                micro = sum(run["verdict"]["micro_divergences"] for run in shown.runs)
                score = shown.score
                value = f"{100 * score:.2f}" if score >= 0 else f"{-score:.4f}"
                row.append(f"{value} · {shown.diverged_runs}/{len(shown.runs)} div · {micro} micro")
            rows.append(row)
    return _markdown(["Model, lr", *(title for _, title in METHOD_COLUMNS)], rows)


def rollback_table(records: Sequence[Record]) -> str:
    """Runs with and without `RollbackOnDivergence` of the same settings: divergences, rollbacks and metrics.

    Compares every setting that has rollback runs with the same setting's runs without rollback.
    """
    with_rollback = [record for record in records if record["config"].get("rollback")]
    if not with_rollback:
        return ""
    settings = {_setting_without_rollback(record["config"]) for record in with_rollback}
    tasks = records[0]["tasks"]
    header = ["Setting", "Rollback", "Diverged", "Micro", "Full", "Rollbacks", *map(_metric_title, metric_names(tasks))]
    rows = []
    for setting in sorted(settings):
        for rollback in (False, True):
            runs = [
                record for record in records
                if bool(record["config"].get("rollback")) == rollback
                and _setting_without_rollback(record["config"]) == setting
            ]
            if not runs:
                continue
            verdicts = [run["verdict"] for run in runs]
            config = runs[0]["config"]
            row = [
                f"{MODEL_TITLES.get(config['model'], config['model'])} {config['method']} "
                f"{format_multiplier(config['lr_multiplier'])}",
                "on" if rollback else "off",
                f"{sum(v['diverged'] for v in verdicts)}/{len(runs)}",
                str(sum(v["micro_divergences"] for v in verdicts)),
                str(sum(v["full_divergences"] for v in verdicts)),
                str(sum(run.get("rollbacks", 0) for run in runs)),
            ]
            row += [format_mean_std([run["metrics"][m] for run in runs], m) for m in metric_names(tasks)]
            rows.append(row)
    return _markdown(header, rows)


def _setting_without_rollback(config: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in config.items() if k not in ("rollback", "seed")}, sort_keys=True)


# Plots ------------------------------------------------------------------------------------------------------------


def plot_training_loss(records: Sequence[Record], path: str, lr_multiplier: float, smoothing_steps: int = 10) -> str:
    """Per-step training loss of each method at `lr_multiplier` (the paper's Figure 5), one panel per model.

    Each method shows its best setting at that multiplier (as `stability_table` picks it), one thin line per seed,
    smoothed by a trailing moving average; a non-finite loss ends the line. Returns `path`.

    Raises:
        ValueError: No record has that multiplier.
    """
    by_method = candidates(records)
    models = [
        model for model in _ordered_models(records)
        if any(option.lr_multiplier == lr_multiplier
               for (option_model, _), options in by_method.items() if option_model == model for option in options)
    ]
    if not models:
        raise ValueError(f"plot_training_loss: no run at lr multiplier {lr_multiplier}.")
    pyplot = _plotting.pyplot()
    figure, axes = pyplot.subplots(1, len(models), figsize=(5 * len(models), 3.8), squeeze=False)
    colors = dict(zip((method for method, _ in METHOD_COLUMNS),
                      ("tab:red", "tab:blue", "tab:orange", "tab:green", "tab:purple")))
    for axis, model in zip(axes[0], models):
        for method, title in METHOD_COLUMNS:
            options = [o for o in by_method.get((model, method), []) if o.lr_multiplier == lr_multiplier]
            if not options:
                continue
            shown = best_candidate(options) or min(options, key=lambda option: option.diverged_runs)
            for index, run in enumerate(shown.runs):
                losses = moving_average(run["losses"], smoothing_steps)
                axis.plot(losses, color=colors[method], linewidth=0.9, alpha=0.8,
                          label=f"{title} ({shown.diverged_runs}/{len(shown.runs)} div)" if index == 0 else None)
        axis.set_yscale("log")
        axis.set_title(f"{MODEL_TITLES.get(model, model)}, lr {format_multiplier(lr_multiplier)}")
        axis.set_xlabel("step")
        axis.legend(fontsize=7)
    axes[0][0].set_ylabel(f"training loss ({smoothing_steps}-step mean)")
    return _plotting.save_png(figure, path)


def clipping_factor_record(record: Record, skip_pattern: str = "embedding") -> ClippingFactorRecord:
    """The run's recorded clipping factors as a `ClippingFactorRecord`, without the variables whose name
    `skip_pattern` matches (embedding tables get plain Adagrad, so their factor is always 1).

    `skip_pattern` is a regular expression matched as the optimizers match `embedding_pattern` and
    `exclude_from_clipping`: `variable_names.matches_any`.

    Raises:
        ValueError: The record holds no clipping factors, or `skip_pattern` is not a valid regular expression.
    """
    (skip_pattern,) = check_patterns("skip_pattern", [skip_pattern])
    factors = record.get("clipping_factors")
    if not factors or not factors["steps"]:
        raise ValueError(f"Run {record.get('key')} recorded no clipping factors.")
    return ClippingFactorRecord(
        steps=list(factors["steps"]),
        factors={name: list(values) for name, values in factors["factors"].items() if not matches_any([skip_pattern], name)},
    )


def plot_run_clipping_factors(record: Record, path: str, skip_pattern: str = "embedding") -> str:
    """The paper's Figure 6: one run's clipping factor per layer over training; returns `path`.

    Variables whose name `skip_pattern` matches are left out (`clipping_factor_record`).
    """
    config = record["config"]
    title = (
        f"{config['method']} clipping factors, {MODEL_TITLES.get(config['model'], config['model'])}, "
        f"lr {format_multiplier(config['lr_multiplier'])}, seed {config['seed']}"
    )
    return plot_clipping_factors(clipping_factor_record(record, skip_pattern), path, title=title)
