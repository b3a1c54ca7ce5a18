"""classify_run: the run-level divergence verdict on synthetic loss curves and metrics."""

import math

import numpy as np
import pytest

from tfrs_clippy.stability import VerdictConfig, classify_run, moving_average

# Verdicts on synthetic loss curves -------------------------------------------------------------------------------


def _healthy(steps=200, seed=0):
    """1/sqrt(t) decay to 2.0 with 5% multiplicative batch noise."""
    rng = np.random.default_rng(seed)
    return (2.0 + 15.0 / np.sqrt(1.0 + np.arange(steps))) * rng.lognormal(0.0, 0.05, steps)


GOOD = {"like_auc": 0.70, "love_auc": 0.66, "rating_rmse": 1.0}
CHANCE = {"like_auc": 0.5, "love_auc": 0.5, "rating_rmse": 3.7}


def test_moving_average_is_trailing_and_shorter_at_the_start():
    np.testing.assert_allclose(moving_average([1, 2, 3, 4, 5], 2), [1.0, 1.5, 2.5, 3.5, 4.5])
    np.testing.assert_allclose(moving_average([3, 6, 9], 10), [3.0, 4.5, 6.0])
    assert moving_average([], 3).size == 0


def test_healthy_run_is_not_diverged_and_has_no_spikes():
    verdict = classify_run(_healthy(), GOOD)
    assert (verdict.diverged, verdict.reason, verdict.micro_divergences, verdict.full_divergences) == (False, "", 0, 0)
    assert 0.95 < verdict.final_to_best_ratio < 1.2


def test_spike_and_recover_is_one_micro_divergence_not_a_diverged_run():
    losses = _healthy()
    losses[120:124] *= 30.0
    verdict = classify_run(losses, GOOD)
    assert (verdict.diverged, verdict.micro_divergences, verdict.full_divergences) == (False, 1, 0)
    assert verdict.peak_to_best_ratio > 25


def test_blow_up_that_stays_at_chance_auc_is_diverged():
    losses = _healthy()
    losses[100:] = 50.0 * losses[100:]  # jumps 50x at step 100 and stays there
    verdict = classify_run(losses, CHANCE)
    assert (verdict.diverged, verdict.reason) == (True, "far_above_best_at_chance")
    assert verdict.full_divergences == 1 and verdict.micro_divergences == 0
    assert 40 < verdict.final_to_best_ratio < 47  # 50 x (2 + 15/sqrt(190)) / (2 + 15/sqrt(95)) = 43.5


def test_loss_shift_with_a_model_that_still_ranks_is_not_diverged():
    losses = _healthy()
    losses[100:] = 50.0 * losses[100:]
    verdict = classify_run(losses, GOOD)
    assert not verdict.diverged and verdict.full_divergences == 1  # the detector's event is still counted


def test_nan_loss_is_diverged_whatever_the_metrics():
    losses = _healthy()
    losses[150:] = math.nan
    verdict = classify_run(losses, GOOD)
    assert (verdict.diverged, verdict.reason, verdict.full_divergences) == (True, "non_finite_loss", 1)
    assert verdict.final_to_best_ratio == math.inf


def test_non_finite_metric_is_diverged():
    verdict = classify_run(_healthy(), {**GOOD, "rating_rmse": math.nan})
    assert (verdict.diverged, verdict.reason) == (True, "non_finite_metric")


def test_early_blow_up_to_a_dead_model_is_diverged():
    # Step 1 explodes before the detector has a baseline; the loss then sits at its initial level (dead ReLUs).
    losses = np.full(150, 15.0)
    losses[0], losses[1], losses[2] = 17.0, 9.5e5, 3.0e3
    verdict = classify_run(losses, CHANCE)
    assert (verdict.diverged, verdict.reason) == (True, "blew_up_at_chance")
    assert verdict.full_divergences == 0  # the detector's warm-up trigger saw it recover: micro, not full
    assert verdict.final_to_best_ratio == pytest.approx(1.0)


def test_recovered_warmup_blow_up_is_a_micro_divergence():
    # The detector has no median baseline in its first 10 steps; its warm-up trigger (10x the smallest loss)
    # still sees a blow-up there, and one that recovers is micro.
    losses = _healthy()
    losses[2] = 300.0
    verdict = classify_run(losses, GOOD)
    assert (verdict.diverged, verdict.warmup_blow_up, verdict.micro_divergences, verdict.full_divergences) == (
        False, True, 1, 0)


def test_one_dead_task_after_a_blow_up_is_diverged_but_not_without_one():
    losses = _healthy()
    losses[2] = 300.0
    one_dead = {"like_auc": 0.49995, "love_auc": 0.39, "rating_rmse": 1.09}  # a constant "like" prediction
    verdict = classify_run(losses, one_dead)
    # The blow-up recovered (micro), but it left a dead task: the run diverged.
    assert (verdict.diverged, verdict.reason, verdict.micro_divergences) == (True, "task_dead_after_blow_up", 1)
    assert not classify_run(_healthy(), one_dead).diverged  # no blow-up: a weak model, not a divergence
    rating_dead = {"like_auc": 0.55, "love_auc": 0.56, "rating_rmse": 3.59}
    assert not classify_run(losses, rating_dead).diverged  # no reference RMSE: regression not judged
    verdict = classify_run(losses, rating_dead, constant_rmse={"rating_rmse": 1.12})
    assert (verdict.diverged, verdict.reason) == (True, "task_dead_after_blow_up")
    healthy_rating = {**rating_dead, "rating_rmse": 1.6}  # 1.6 < 1.5 x 1.12
    assert not classify_run(losses, healthy_rating, constant_rmse={"rating_rmse": 1.12}).diverged


def test_undertrained_run_at_chance_without_blow_up_is_not_diverged():
    verdict = classify_run(np.linspace(17.0, 14.0, 150), {"like_auc": 0.51, "love_auc": 0.49})
    assert not verdict.diverged


def test_verdict_config_checks_its_thresholds():
    with pytest.raises(ValueError, match="far_above_best_ratio"):
        VerdictConfig(far_above_best_ratio=1.0)
    with pytest.raises(ValueError, match="chance_auc_margin"):
        VerdictConfig(chance_auc_margin=0.5)
    with pytest.raises(ValueError, match="empty"):
        classify_run([], GOOD)
