"""The size of every Adagrad step, per variable, read from the optimizer's accumulators (the paper's Figure 4).

Near a divergence the Clippy paper (Tang et al., KDD 2023, Figure 4) watches per layer the gradient's L2 norm and
the update's largest coordinate. With G accumulated first (G_t = G_{t-1} + g_t^2: Algorithm 1, and every method
of `build_optimizer`), both follow from the accumulator alone:

    g_t^2 = G_t - G_{t-1} ;  ||g_t||_2 = sqrt(sum_i (G_t - G_{t-1})_i) ;
    ||lr_t r_t||_inf = lr_t max_i |g_i| / sqrt(G_i + eps)

so `AdagradStepLogger` reads the accumulators of the watched variables before and after a step, without touching
the training step or computing a gradient twice. ||lr r||_inf is Adagrad's unscaled step: what a method's
clipping factor then multiplies. In float32 the difference G_t - G_{t-1} keeps about 7 - log10(t) digits of
g_t^2: enough for the jumps it is meant to show.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Container, Dict, List, Optional

import numpy as np

from tfrs_clippy.keras_runtime import keras


@dataclasses.dataclass
class AdagradStepRecord:
    """Per recorded step and watched variable: `grad_norm` ||g||_2, `max_update` ||lr r||_inf, `clipping_factor`.

    `values[quantity][name][i]` belongs to `steps[i]`; `clipping_factor` is present only when the optimizer
    exports its factors.
    """

    steps: List[int] = dataclasses.field(default_factory=list)
    values: Dict[str, Dict[str, List[float]]] = dataclasses.field(default_factory=dict)

    def add(self, step: int, quantities: Dict[str, Dict[str, float]]) -> None:
        """Appends one step's quantities ({quantity: {variable name: value}})."""
        self.steps.append(step)
        for quantity, by_name in quantities.items():
            for name, value in by_name.items():
                self.values.setdefault(quantity, {}).setdefault(name, []).append(float(value))


def learning_rate_at(optimizer: Any, step: int) -> float:
    """The learning rate `optimizer` uses at training step `step` (0-based), for a number or a schedule."""
    config = optimizer.get_config()["learning_rate"]
    if isinstance(config, dict):  # A schedule serializes as a dict; a fresh copy evaluates it at any step.
        return float(keras.optimizers.schedules.deserialize(config)(step))
    return float(config)


class AdagradStepLogger(keras.callbacks.Callback):
    """Records ||g||_2, ||lr r||_inf and the clipping factor of each watched variable at chosen training steps.

    The optimizer must be one of tfrs_clippy's (it needs `accumulator(variable)` and `epsilon`) with the standard
    accumulator order (`accumulator_update="standard"`, which `build_optimizer` and `ClippyAdagrad.from_paper`
    use); `clipping_factor` is recorded when it was built with `export_clipping_factors=True`.

    Args:
        steps: The 0-based training steps to record (e.g. `range(145, 180)` around a shock); None records every
            step. Reading the accumulators costs two device-to-host copies of the watched variables per recorded
            step, so a window is cheaper than every step.
        variable_pattern: A regular expression; variables whose name matches it are watched.
        exclude_pattern: A regular expression; matching variables are not (default: embedding tables, whose
            sparse steps touch a few rows).
        name_of: Maps a variable to the name it is recorded under (default: its name).
    """

    def __init__(
        self,
        steps: Optional[Container[int]] = None,
        variable_pattern: str = ".*",
        exclude_pattern: Optional[str] = "embedding",
        name_of: Optional[Callable[[Any], str]] = None,
    ) -> None:
        super().__init__()
        for argument, pattern in (("variable_pattern", variable_pattern), ("exclude_pattern", exclude_pattern)):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as error:
                    raise ValueError(
                        f"`{argument}` is not a valid regular expression: {pattern!r} ({error})."
                    ) from None
        self.steps = steps
        self.variable_pattern = variable_pattern
        self.exclude_pattern = exclude_pattern
        self.name_of = name_of or (lambda variable: variable.name)
        self.record = AdagradStepRecord()
        self._step = 0
        self._watched: List[Any] = []
        self._before: Optional[List[np.ndarray]] = None

    def on_train_begin(self, logs: Optional[Dict[str, Any]] = None) -> None:
        optimizer = self.model.optimizer
        if not callable(getattr(optimizer, "accumulator", None)):
            raise ValueError(
                f"AdagradStepLogger needs one of tfrs_clippy's optimizers (with `accumulator(variable)`), got "
                f"{type(optimizer).__name__}."
            )
        if getattr(optimizer, "accumulator_update", None) != "standard":
            raise ValueError(
                "AdagradStepLogger reads g^2 as the accumulator's increment, which needs accumulator_update="
                f"'standard' (G += g^2 before the step), got {getattr(optimizer, 'accumulator_update', None)!r}."
            )
        self._watched = [
            variable
            for variable in self.model.trainable_variables
            if re.search(self.variable_pattern, variable.name)
            and not (self.exclude_pattern and re.search(self.exclude_pattern, variable.name))
        ]

    def _recording(self, step: int) -> bool:
        return self.steps is None or step in self.steps

    def on_train_batch_begin(self, batch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        self._before = None
        if not self._recording(self._step):
            return
        optimizer = self.model.optimizer
        if self._step == 0:
            # The optimizer builds its slots at the first step; until then every accumulator is its start value.
            start = optimizer.initial_accumulator_value
            self._before = [np.full(variable.shape, start, np.float32) for variable in self._watched]
        else:
            self._before = [optimizer.accumulator(variable).numpy() for variable in self._watched]

    def on_train_batch_end(self, batch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        step, self._step = self._step, self._step + 1
        if self._before is None:
            return
        optimizer = self.model.optimizer
        learning_rate = learning_rate_at(optimizer, step)
        factors = (
            {name: float(np.asarray(value)) for name, value in optimizer.clipping_factors_by_name().items()}
            if getattr(optimizer, "export_clipping_factors", False)
            else {}
        )
        quantities: Dict[str, Dict[str, float]] = {"grad_norm": {}, "max_update": {}}
        if factors:
            quantities["clipping_factor"] = {}
        for variable, before in zip(self._watched, self._before):
            after = optimizer.accumulator(variable).numpy().astype(np.float64)
            # Rounding can make a tiny increment negative; g^2 is not.
            squared = np.maximum(after - before, 0.0)
            name = self.name_of(variable)
            quantities["grad_norm"][name] = math.sqrt(float(squared.sum()))
            largest = float(np.max(np.sqrt(squared / (after + optimizer.epsilon))))
            quantities["max_update"][name] = learning_rate * largest
            if factors:
                # The optimizers name variables by path in Keras 3, by name in Keras 2.
                key = str(getattr(variable, "path", None) or variable.name)
                quantities["clipping_factor"][name] = factors.get(key, math.nan)
        self.record.add(step, quantities)
