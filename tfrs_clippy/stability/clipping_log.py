"""Logging and plotting per-variable clipping factors of ClippyAdagrad (and of the baselines' scaling factors).

Works with any optimizer that has `clipping_factors_by_name()`, returning {model variable name: scalar} for the
last step (ClippyAdagrad with `export_clipping_factors=True`, and the baselines). A factor of 1 means the step was
not clipped; a factor near 0 means the update was almost entirely suppressed.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Dict, List, Optional

import numpy as np

from tfrs_clippy import summaries
from tfrs_clippy.stability import _callback, _plotting

_TAG_PREFIX = "clipping_factor/"


@dataclasses.dataclass
class ClippingFactorRecord:
    """Clipping factors over steps: `factors[name][i]` is variable `name`'s factor at `steps[i]` (NaN if absent)."""

    steps: List[int] = dataclasses.field(default_factory=list)
    factors: Dict[str, List[float]] = dataclasses.field(default_factory=dict)

    def add(self, step: int, factors: Dict[str, float]) -> None:
        """Appends one step's factors."""
        for name in factors:
            self.factors.setdefault(name, [math.nan] * len(self.steps))
        self.steps.append(step)
        for name, values in self.factors.items():
            values.append(float(factors.get(name, math.nan)))


def layer_of(variable_name: str) -> str:
    """The layer part of a variable name: "model/dense_1/kernel:0" -> "model/dense_1"."""
    name = variable_name.split(":")[0]
    return name.rsplit("/", 1)[0] if "/" in name else name


class ClippingFactorLogger(_callback.PeriodicCallback):
    """Records `optimizer.clipping_factors_by_name()` every `every_n_steps` steps.

    Per measured step the factors go to `record` and, with `log_dir`, to TensorBoard as `clipping_factor/<name>`
    (and `clipping_factor/min`). At the end of each epoch the epoch logs (hence History and a later TensorBoard
    callback) get each variable's mean factor over the epoch's measured steps, and `clipping_factor/min`, the
    smallest factor seen in the epoch. Batch logs are left alone: with many variables they would flood the progress
    bar. The optimizer must export its factors: ClippyAdagrad or a baseline of `build_optimizer` built with
    `export_clipping_factors=True`, or any optimizer with a `clipping_factors_by_name()`.

    Args:
        every_n_steps: Record after every this many steps (the first after step 0).
        log_dir: If set, a directory to write per-step TensorBoard scalars to.
    """

    def __init__(self, every_n_steps: int = 1, log_dir: Optional[str] = None) -> None:
        super().__init__(every_n_steps, log_dir)
        self.record = ClippingFactorRecord()
        self._epoch_start_index = 0

    def on_train_begin(self, logs: Optional[Dict[str, Any]] = None) -> None:
        _callback.require_clipping_factors(self.model.optimizer, "ClippingFactorLogger", turn_on_before_build=False)
        super().on_train_begin(logs)

    def on_epoch_begin(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        self._epoch_start_index = len(self.record.steps)

    def on_step(self, step: int, logs: Dict[str, Any]) -> None:
        factors = {
            name: float(np.asarray(value)) for name, value in self.model.optimizer.clipping_factors_by_name().items()
        }
        self.record.add(step, factors)
        if factors:
            scalars = {summaries.summary_tag(name, _TAG_PREFIX): value for name, value in factors.items()}
            scalars[_TAG_PREFIX + "min"] = min(factors.values())
            self.write_scalars(scalars, step)

    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        if logs is None or len(self.record.steps) == self._epoch_start_index:
            return
        epoch_values = {name: values[self._epoch_start_index:] for name, values in self.record.factors.items()}
        for name, values in epoch_values.items():
            logs[summaries.summary_tag(name, _TAG_PREFIX)] = float(np.nanmean(values))
        logs[_TAG_PREFIX + "min"] = float(np.nanmin([np.nanmin(values) for values in epoch_values.values()]))


def plot_clipping_factors(record: ClippingFactorRecord, path: str, title: str = "Clipping factors") -> str:
    """Plots each variable's factor over steps, one panel per layer, to a PNG at `path`; returns `path`.

    A record with steps but no variable (e.g. every one filtered out, as the reproduction drops embedding tables) gives
    a single empty panel over its steps that says so, rather than no file.

    Raises:
        ValueError: `record` has no steps.
    """
    _plotting.require_steps(record.steps)
    by_layer: Dict[str, List[str]] = collections.defaultdict(list)
    for name in record.factors:
        by_layer[layer_of(name)].append(name)
    pyplot = _plotting.pyplot()
    if not by_layer:
        figure, axis = pyplot.subplots(figsize=(4.5, 3))
        first, last = min(record.steps), max(record.steps)
        axis.set_xlim(first, max(last, first + 1))  # one step alone would be an empty x range
        axis.set_ylim(-0.05, 1.05)
        axis.text(0.5, 0.5, "no variable's clipping factor in the record", ha="center", va="center",
                  transform=axis.transAxes, fontsize=9)
        axis.set_xlabel("step")
        axis.set_ylabel("clipping factor")
        figure.suptitle(title)
        return _plotting.save_png(figure, path)
    columns = min(3, len(by_layer))
    rows = math.ceil(len(by_layer) / columns)
    figure, axes = pyplot.subplots(rows, columns, figsize=(4.5 * columns, 3 * rows), squeeze=False, sharey=True)
    for axis, (layer, names) in zip(axes.flat, sorted(by_layer.items())):
        for name in names:
            axis.plot(record.steps, record.factors[name], label=name.split(":")[0].rsplit("/", 1)[-1])
        axis.set_title(layer, fontsize=9)
        axis.set_ylim(-0.05, 1.05)
        axis.set_xlabel("step")
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(by_layer):]:
        axis.set_visible(False)
    axes[0][0].set_ylabel("clipping factor")
    figure.suptitle(title)
    return _plotting.save_png(figure, path)
