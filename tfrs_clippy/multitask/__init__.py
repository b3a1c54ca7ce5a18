"""Multitask balancing for shared-parameter rankers: PUB (parameter update balancing), Nash-MTL, uncertainty.

    balancer = MultitaskBalancer(["click", "like"], {"method": "pub"})   # an attribute of the model
    # in the model's train_step:
    logs = balancer.minimize(model.optimizer, lambda: task_losses(batch), shared_variables, specific_variables)

See `balancing` for the methods, `updates` for the per-task candidate updates and `solver` for the weights.
"""

from tfrs_clippy.multitask.balancing import ALPHA_SCALINGS, METHODS, BalancingConfig, MultitaskBalancer
from tfrs_clippy.multitask.solver import cosines, nash_weights
from tfrs_clippy.multitask.updates import (
    CLIP_MODES,
    AdagradRule,
    AdamRule,
    Candidates,
    ScaledAdamRule,
    ScaledRule,
    TaskGradients,
    UpdateRule,
    stack_task_gradients,
    update_rule_for,
)

__all__ = [
    "ALPHA_SCALINGS",
    "AdagradRule",
    "AdamRule",
    "BalancingConfig",
    "CLIP_MODES",
    "Candidates",
    "METHODS",
    "MultitaskBalancer",
    "ScaledAdamRule",
    "ScaledRule",
    "TaskGradients",
    "UpdateRule",
    "cosines",
    "nash_weights",
    "stack_task_gradients",
    "update_rule_for",
]
