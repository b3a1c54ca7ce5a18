"""Over-clipping: a variable whose clipping factor stays near 0 barely trains, and the loss alone does not say why.

With one clipping scale per tensor, a single weight near 0 caps the whole tensor's move at about
`absolute_threshold`: with TFRS's default of 1e-7 a zero-initialized bias freezes its layer from the first step.
`OverClippingMonitor` reads the optimizer's per-variable clipping factors during `fit` and issues one
`OverClippingWarning` per variable whose factor stays below a threshold for a window of steps.

It reports through Python's `warnings`, not `logging`: over-clipping is a setting the user should change in their
code (the case `warnings` is for), and a warning category can be silenced, or made an error in a test or CI run
(`-W error::tfrs_clippy.stability.OverClippingWarning`), without touching the library's loggers.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import tensorflow as tf

from tfrs_clippy.optimizers.clippy_adagrad import PAPER_SETTING
from tfrs_clippy.stability import _callback

LOG_KEY = "over_clipped_variables"


class OverClippingWarning(UserWarning):
    """A variable's updates have been almost entirely clipped away for a window of steps."""


class OverClippingMonitor(_callback.PeriodicCallback):
    """Warns once per variable whose clipping factor stays below `threshold` for `window` steps.

    Every `every_n_steps` steps the callback reads `optimizer.clipping_factors_by_name()`. A variable whose factor
    was below `threshold` at every read covering the last `window` steps gets one `OverClippingWarning` naming it,
    its factor, and what to change; `over_clipped` maps each warned variable to its factor then. Each epoch's logs
    (hence History, and a later TensorBoard or CSVLogger callback) get `over_clipped_variables`: how many variables
    were over-clipped at some read of the epoch.

    tfrs_clippy's optimizers keep factors only with `export_clipping_factors=True`. If training begins with the
    optimizer not built yet (`compile` then `fit`, the usual path), the callback turns the export on; an optimizer
    already built without it (by hand, or by Keras 3 under a distribution strategy) raises a ValueError.

    Args:
        threshold: A factor below this (in (0, 1]) counts as over-clipped.
        window: How many steps (>= 1) the factor must stay below `threshold` before the warning.
        every_n_steps: Read the factors after every this many steps; each read stands for that many steps.
    """

    def __init__(self, threshold: float = 0.05, window: int = 100, every_n_steps: int = 10) -> None:
        super().__init__(every_n_steps)
        if not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"`threshold` must be in (0, 1], got {threshold!r}.")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"`window` must be an int >= 1, got {window!r}.")
        self.threshold = float(threshold)
        self.window = window
        self.over_clipped: Dict[str, float] = {}
        self._low_reads: Dict[str, int] = {}
        self._epoch_over_clipped: Set[str] = set()
        self._names: List[str] = []  # of the factors `_read` returns, in order
        self._read: Optional[Callable[[], tf.Tensor]] = None
        self._read_key: Optional[Tuple[int, int]] = None
        # Keras 2 converts every step's logs to NumPy (a host sync) unless each callback with batch hooks takes
        # tensors; this one never reads the batch logs. Keras 3 has no such switch and converts them anyway.
        self._supports_tf_logs = True

    def on_train_begin(self, logs: Optional[Dict[str, Any]] = None) -> None:
        _callback.require_clipping_factors(self.model.optimizer, "OverClippingMonitor", turn_on_before_build=True)
        super().on_train_begin(logs)

    def on_epoch_begin(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        self._epoch_over_clipped = set()

    def on_step(self, step: int, logs: Dict[str, Any]) -> None:
        for name, factor in self._read_factors().items():
            low_reads = self._low_reads.get(name, 0) + 1 if factor < self.threshold else 0
            self._low_reads[name] = low_reads
            if low_reads * self.every_n_steps < self.window:
                continue
            self._epoch_over_clipped.add(name)
            if name not in self.over_clipped:
                self.over_clipped[name] = factor
                warnings.warn(self._message(name, factor, step, low_reads * self.every_n_steps), OverClippingWarning)

    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        if logs is not None:
            logs[LOG_KEY] = len(self._epoch_over_clipped)

    def _read_factors(self) -> Dict[str, float]:
        """Every variable's factor of the last step, read by one compiled call."""
        optimizer = self.model.optimizer
        # Eager reads cost ~25 us per variable (3.3 ms for 120), one graph stacking them all ~0.4 ms. The graph is
        # made again for a new optimizer, or when the optimizer has made slots for variables first seen later.
        key = (id(optimizer), len(optimizer.variables))
        if key != self._read_key:
            self._names = list(optimizer.clipping_factors_by_name())
            self._read = tf.function(lambda: tf.stack(list(optimizer.clipping_factors_by_name().values())))
            self._read_key = key
        return dict(zip(self._names, self._read().numpy().tolist()))

    def _message(self, name: str, factor: float, step: int, steps: int) -> str:
        optimizer = self.model.optimizer
        if hasattr(optimizer, "absolute_threshold"):
            knob = (f"raise `absolute_threshold` (now {optimizer.absolute_threshold:g}; the paper's setting, "
                    f"build_optimizer(\"clippy\", ...), uses {PAPER_SETTING['absolute_threshold']:g})")
        else:
            knob = f"loosen {type(optimizer).__name__}'s threshold"
        pattern = re.escape(name.split(":")[0])
        return (
            f"Variable {name!r} is over-clipped: its clipping factor has stayed below {self.threshold:g} for "
            f"{steps} steps (now {factor:.3g}, at step {step}), so its updates are almost entirely clipped away and "
            f"it barely trains. To fix it, {knob}, lower the learning rate, or leave it unclipped with "
            f"exclude_from_clipping=[{pattern!r}]."
        )
