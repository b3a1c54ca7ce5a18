"""The ranker's configuration: one dataclass, the paper's presets, and loading from dicts, YAML and JSON.

The presets follow Clippy (Tang et al., KDD 2023, arXiv 2302.09178), section 5:
- `small`: a shared bottom of 512 x 2 ReLU layers;
- `large`: a shared bottom of 4096 x 4;
- `large_dcn`: one full-rank DCN-v2 cross layer on the input, then LayerNorm, then the 4096 x 4 bottom.
The paper does not give its tower shapes; every preset uses one 256-unit ReLU layer per task before the logit.

`scale` multiplies every hidden width (bottom, experts, towers), so `preset("large", scale=1/8)` has a 512 x 4
bottom: the widths keep the Small:Large:Large+DCN proportions exactly whenever width * scale is a whole number.
Parameter counts do not scale by one factor (hidden-to-hidden weights go with scale**2, input-to-hidden weights
with scale, and the cross layers, sized by the input width, not at all).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Mapping

import yaml

from tfrs_clippy.keras_runtime import keras
from tfrs_clippy.multitask import BalancingConfig

BOTTOMS = ("shared_bottom", "mmoe", "ple")
CROSS_PLACEMENTS = ("stacked", "parallel")
MULTI_HOT_COMBINERS = ("mean", "sum")
OUTPUT_BIASES = ("zero", "label_prior")

_PAPER_TOWER_UNITS = (256,)
PRESETS: dict[str, dict[str, Any]] = {
    "small": {"bottom": "shared_bottom", "bottom_units": (512, 512), "tower_units": _PAPER_TOWER_UNITS},
    "large": {"bottom": "shared_bottom", "bottom_units": (4096,) * 4, "tower_units": _PAPER_TOWER_UNITS},
    "large_dcn": {
        "bottom": "shared_bottom",
        "bottom_units": (4096,) * 4,
        "tower_units": _PAPER_TOWER_UNITS,
        "cross_layers": 1,
        "cross_placement": "stacked",
    },
}


@dataclasses.dataclass(frozen=True)
class RankerConfig:
    """Everything about a ranker except its features and tasks (those come from the `DatasetSpec`).

    Attributes:
        bottom: "shared_bottom" (one MLP shared by all tasks), "mmoe" (Ma et al. 2018: `num_experts` expert MLPs,
            one softmax gate per task) or "ple" (Tang et al. 2020: `num_levels` levels of customized gate control
            with `num_experts` shared and `num_task_experts` task-specific experts per level).
        bottom_units: Widths of the bottom MLP; every expert of MMoE and PLE has these widths too.
        num_experts: MMoE: number of experts. PLE: number of shared experts per level.
        num_task_experts: PLE only: number of task-specific experts per task and level.
        num_levels: PLE only: number of extraction levels.
        tower_units: Hidden widths of each task's tower; a 1-unit logit layer follows. May be empty.
        cross_layers: Number of DCN-v2 cross layers on the input (0: no cross network). A LayerNorm follows them.
        cross_projection_dim: None for full-rank cross layers, else the rank of the low-rank kernel U V.
        cross_placement: "stacked" feeds the normalized cross output to the bottom (the paper's Large+DCN);
            "parallel" runs the bottom on the input and concatenates the cross output to each task's bottom output.
        activation: Activation of every hidden layer.
        kernel_initializer: Initializer of every dense and cross kernel (embeddings keep Keras's default).
        multi_hot_combiner: How a multi-hot feature's embeddings are pooled: "mean" or "sum" over non-padding ids.
        task_weights: Loss weight per task name; tasks not named keep their `TaskSpec.weight`.
        scale: Multiplier of every hidden width (see the module docstring); widths round to the nearest integer.
        multitask_balancing: None to train on the sum of the task losses; else how `fit` balances the tasks, as a
            `tfrs_clippy.multitask.BalancingConfig`, a method name ("pub", "nash_mtl", "uncertainty") or its
            `to_dict` mapping (see `tfrs_clippy.multitask.balancing`).
        output_bias: Initial bias of each task's logit layer. "label_prior" (the default) starts it at the task's
            training prior, `TaskSpec.label_mean`: log(p / (1 - p)) for a binary task of positive rate p, the mean
            for a regression task; a task without a `label_mean` starts at 0. "zero" starts every bias at 0. Why:
            with zero biases the first predictions are ~0.5 and ~0, so a regression task far from 0 starts with
            a loss of about its labels' mean square, and Adagrad's first steps (its largest: the accumulator is
            still small) spend those big gradients on the offset and can blow the network up. On ML-100K
            (ratings average 3.5) `preset("large_dcn", scale=1/16)`'s first total loss is 15.7 with "zero" and
            2.1 with "label_prior", near the labels' variance (and binary entropy): an initialization artifact.
    """

    bottom: str = "shared_bottom"
    bottom_units: tuple[int, ...] = (512, 512)
    num_experts: int = 4
    num_task_experts: int = 1
    num_levels: int = 1
    tower_units: tuple[int, ...] = _PAPER_TOWER_UNITS
    cross_layers: int = 0
    cross_projection_dim: int | None = None
    cross_placement: str = "stacked"
    activation: str = "relu"
    kernel_initializer: str = "glorot_uniform"
    multi_hot_combiner: str = "mean"
    task_weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
    scale: float = 1.0
    multitask_balancing: BalancingConfig | None = None
    output_bias: str = "label_prior"

    def __post_init__(self) -> None:
        # Lists from YAML/JSON become tuples so that configs compare equal whatever they were loaded from.
        object.__setattr__(self, "bottom_units", tuple(self.bottom_units))
        object.__setattr__(self, "tower_units", tuple(self.tower_units))
        object.__setattr__(self, "task_weights", dict(self.task_weights))
        if self.multitask_balancing is not None:
            try:
                balancing = BalancingConfig.from_value(self.multitask_balancing)
            except ValueError as error:
                raise ValueError(f"RankerConfig: invalid `multitask_balancing`: {error}") from None
            object.__setattr__(self, "multitask_balancing", balancing)
        _check_choice("bottom", self.bottom, BOTTOMS)
        _check_choice("cross_placement", self.cross_placement, CROSS_PLACEMENTS)
        _check_choice("multi_hot_combiner", self.multi_hot_combiner, MULTI_HOT_COMBINERS)
        _check_choice("output_bias", self.output_bias, OUTPUT_BIASES)
        if not self.bottom_units:
            raise ValueError("RankerConfig: `bottom_units` must name at least one layer width, got ().")
        for field in ("bottom_units", "tower_units"):
            widths = getattr(self, field)
            if any(not isinstance(w, int) or w < 1 for w in widths):
                raise ValueError(f"RankerConfig: `{field}` must be positive integers, got {widths}.")
        minimums = {"num_experts": 1, "num_task_experts": 1, "num_levels": 1, "cross_layers": 0}
        for field, minimum in minimums.items():
            value = getattr(self, field)
            if not isinstance(value, int) or value < minimum:
                raise ValueError(f"RankerConfig: `{field}` must be an integer >= {minimum}, got {value!r}.")
        if self.cross_projection_dim is not None and (
            not isinstance(self.cross_projection_dim, int) or self.cross_projection_dim < 1
        ):
            raise ValueError(
                f"RankerConfig: `cross_projection_dim` must be None or an integer >= 1, "
                f"got {self.cross_projection_dim!r}."
            )
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"RankerConfig: `scale` must be a finite number > 0, got {self.scale!r}.")
        for task, weight in self.task_weights.items():
            if not (isinstance(weight, (int, float)) and weight >= 0):
                raise ValueError(f"RankerConfig: `task_weights[{task!r}]` must be a number >= 0, got {weight!r}.")
        for field, lookup in (("activation", keras.activations.get), ("kernel_initializer", keras.initializers.get)):
            try:
                lookup(getattr(self, field))
            except ValueError as error:
                raise ValueError(f"RankerConfig: unknown `{field}` {getattr(self, field)!r}.") from error

    def scaled(self, widths: tuple[int, ...]) -> tuple[int, ...]:
        """`widths` multiplied by `scale`, rounded, and at least 1."""
        return tuple(max(1, round(width * self.scale)) for width in widths)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "RankerConfig":
        """The paper's preset `name` ("small", "large" or "large_dcn") with `overrides` applied.

        Raises:
            ValueError: `name` is not a preset, or an override is not a field.
        """
        _check_choice("preset", name, tuple(PRESETS))
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """A JSON- and YAML-serializable dict that `from_dict` turns back into an equal config."""
        config = dataclasses.asdict(self)
        config["bottom_units"] = list(self.bottom_units)
        config["tower_units"] = list(self.tower_units)
        return config

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "RankerConfig":
        """The config of `config`'s fields; a "preset" key starts from that preset and applies the other keys.

        Raises:
            ValueError: a key is not a field of RankerConfig, or a value is invalid.
        """
        config = dict(config)
        if "preset" in config:
            return cls.preset(config.pop("preset"), **config)
        fields = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise ValueError(f"RankerConfig: unknown fields {unknown}; the fields are {sorted(fields)}.")
        return cls(**config)

    @classmethod
    def load(cls, path: str | pathlib.Path) -> "RankerConfig":
        """The config in a `.yaml`/`.yml` or `.json` file holding a `from_dict` mapping."""
        path = pathlib.Path(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            config = yaml.safe_load(text)
        elif path.suffix == ".json":
            config = json.loads(text)
        else:
            raise ValueError(f"RankerConfig.load: {str(path)!r} must end in .yaml, .yml or .json.")
        if not isinstance(config, Mapping):
            raise ValueError(f"RankerConfig.load: {str(path)!r} must hold a mapping, got {type(config).__name__}.")
        return cls.from_dict(config)


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"RankerConfig: `{field}` must be one of {choices}, got {value!r}.")
