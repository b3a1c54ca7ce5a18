"""The reproduction's outputs in the paper's shape: Table 2, the stability and rollback tables, Figures 5 and 6.

Pure helpers, free of any model: `scripts/reproduce.py` trains and evaluates and hands this module its run records
(`experiments.records`), whose configs carry "dataset", "model", "scale", "method", "hyperparameters",
"lr_multiplier", "learning_rate", "seed", "batch_size", "rollback", and optionally "clipping_factors"
({"steps": [...], "factors": {"<variable>": [...]}}) and "rollbacks".
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from tfrs_clippy.optimizers import ADAGRAD_METHODS
from tfrs_clippy.optimizers.variable_names import check_patterns, matches_any
from tfrs_clippy.stability import ClippingFactorRecord, _plotting, moving_average, plot_clipping_factors

from experiments.records import Record, format_multiplier, markdown, metric_names

_METHOD_TITLES = {"naive": "Naive", "gc": "GC", "agc": "AGC", "lamb": "LAMB", "clippy": "Clippy"}
METHOD_COLUMNS = tuple((method, _METHOD_TITLES[method]) for method in ADAGRAD_METHODS)
"""The paper's methods (`tfrs_clippy.optimizers.ADAGRAD_METHODS`, in its order) and their column titles."""
MODEL_TITLES = {"small": "Small", "large": "Large", "large_dcn": "Large+DCN"}


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
    return markdown(["Model, metric", *(title for _, title in METHOD_COLUMNS)], rows) + "\n"


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
    return markdown(["Model, lr", *(title for _, title in METHOD_COLUMNS)], rows) + "\n"


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
    return markdown(header, rows) + "\n"


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
        factors={name: list(values) for name, values in factors["factors"].items()
                 if not matches_any([skip_pattern], name)},
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
