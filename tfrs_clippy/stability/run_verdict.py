"""The run-level verdict: did a training run diverge? One meaning of "diverged" for the whole project.

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

`InstabilityScore.had_full_divergence` is a narrower fact (the detector saw a full divergence no rollback undid);
the verdict of a run is `classify_run`'s.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from tfrs_clippy.stability.detection import DetectorConfig, detect_divergence


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
