"""Adagrad with per-variable update scaling: ClippyAdagrad and the math it shares with the baselines."""

from tfrs_clippy.optimizers.clippy_adagrad import PAPER_SETTING, ClippyAdagrad

__all__ = ["ClippyAdagrad", "PAPER_SETTING"]
