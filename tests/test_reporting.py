"""tfrs_clippy.reporting: run keys, atomic records, run-level divergence verdicts, the tables and the plots."""

import json
import math
import os

import numpy as np
import pytest

from tfrs_clippy import reporting

TASKS = {"rating": "regression", "like": "binary", "love": "binary"}


# Keys and files ------------------------------------------------------------------------------------------------


def test_config_key_ignores_key_order_and_sees_every_value():
    config = {"model": "small", "method": "gc", "hyperparameters": {"threshold": 0.01}, "seed": 0}
    reordered = {"seed": 0, "hyperparameters": {"threshold": 0.01}, "method": "gc", "model": "small"}
    assert reporting.config_key(config) == reporting.config_key(reordered)
    assert len(reporting.config_key(config)) == 16
    assert reporting.config_key(config) != reporting.config_key({**config, "seed": 1})
    assert reporting.config_key(config) != reporting.config_key({**config, "hyperparameters": {"threshold": 0.1}})


def test_atomic_write_round_trips_nan_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "runs" / "abc.json"
    reporting.write_json_atomically(path, {"loss": [1.0, math.nan, math.inf]})
    reporting.write_json_atomically(path, {"loss": [2.0, math.nan]})  # replaces the first
    loaded = reporting.read_json(path)
    assert loaded["loss"][0] == 2.0 and math.isnan(loaded["loss"][1]) and len(loaded["loss"]) == 2
    assert os.listdir(path.parent) == ["abc.json"]


def test_atomic_write_that_fails_keeps_the_previous_file(tmp_path):
    path = tmp_path / "abc.json"
    reporting.write_json_atomically(path, {"ok": 1})
    with pytest.raises(TypeError):
        reporting.write_json_atomically(path, {"not serializable": object()})
    assert reporting.read_json(path) == {"ok": 1}
    assert os.listdir(tmp_path) == ["abc.json"]


# Verdicts on synthetic loss curves -------------------------------------------------------------------------------


def _healthy(steps=200, seed=0):
    """1/sqrt(t) decay to 2.0 with 5% multiplicative batch noise."""
    rng = np.random.default_rng(seed)
    return (2.0 + 15.0 / np.sqrt(1.0 + np.arange(steps))) * rng.lognormal(0.0, 0.05, steps)


GOOD = {"like_auc": 0.70, "love_auc": 0.66, "rating_rmse": 1.0}
CHANCE = {"like_auc": 0.5, "love_auc": 0.5, "rating_rmse": 3.7}


def test_moving_average_is_trailing_and_shorter_at_the_start():
    np.testing.assert_allclose(reporting.moving_average([1, 2, 3, 4, 5], 2), [1.0, 1.5, 2.5, 3.5, 4.5])
    np.testing.assert_allclose(reporting.moving_average([3, 6, 9], 10), [3.0, 4.5, 6.0])
    assert reporting.moving_average([], 3).size == 0


def test_healthy_run_is_not_diverged_and_has_no_spikes():
    verdict = reporting.classify_run(_healthy(), GOOD)
    assert (verdict.diverged, verdict.reason, verdict.micro_divergences, verdict.full_divergences) == (False, "", 0, 0)
    assert 0.95 < verdict.final_to_best_ratio < 1.2


def test_spike_and_recover_is_one_micro_divergence_not_a_diverged_run():
    losses = _healthy()
    losses[120:124] *= 30.0
    verdict = reporting.classify_run(losses, GOOD)
    assert (verdict.diverged, verdict.micro_divergences, verdict.full_divergences) == (False, 1, 0)
    assert verdict.peak_to_best_ratio > 25


def test_blow_up_that_stays_at_chance_auc_is_diverged():
    losses = _healthy()
    losses[100:] = 50.0 * losses[100:]  # jumps 50x at step 100 and stays there
    verdict = reporting.classify_run(losses, CHANCE)
    assert (verdict.diverged, verdict.reason) == (True, "far_above_best_at_chance")
    assert verdict.full_divergences == 1 and verdict.micro_divergences == 0
    assert 40 < verdict.final_to_best_ratio < 47  # 50 x (2 + 15/sqrt(190)) / (2 + 15/sqrt(95)) = 43.5


def test_loss_shift_with_a_model_that_still_ranks_is_not_diverged():
    losses = _healthy()
    losses[100:] = 50.0 * losses[100:]
    verdict = reporting.classify_run(losses, GOOD)
    assert not verdict.diverged and verdict.full_divergences == 1  # the detector's event is still counted


def test_nan_loss_is_diverged_whatever_the_metrics():
    losses = _healthy()
    losses[150:] = math.nan
    verdict = reporting.classify_run(losses, GOOD)
    assert (verdict.diverged, verdict.reason, verdict.full_divergences) == (True, "non_finite_loss", 1)
    assert verdict.final_to_best_ratio == math.inf


def test_non_finite_metric_is_diverged():
    verdict = reporting.classify_run(_healthy(), {**GOOD, "rating_rmse": math.nan})
    assert (verdict.diverged, verdict.reason) == (True, "non_finite_metric")


def test_early_blow_up_to_a_dead_model_is_diverged():
    # Step 1 explodes before the detector has a baseline; the loss then sits at its initial level (dead ReLUs).
    losses = np.full(150, 15.0)
    losses[0], losses[1], losses[2] = 17.0, 9.5e5, 3.0e3
    verdict = reporting.classify_run(losses, CHANCE)
    assert (verdict.diverged, verdict.reason) == (True, "blew_up_at_chance")
    assert verdict.full_divergences == 0  # the detector's warm-up trigger saw it recover: micro, not full
    assert verdict.final_to_best_ratio == pytest.approx(1.0)


def test_recovered_warmup_blow_up_is_a_micro_divergence():
    # The detector has no median baseline in its first 10 steps; its warm-up trigger (10x the smallest loss)
    # still sees a blow-up there, and one that recovers is micro.
    losses = _healthy()
    losses[2] = 300.0
    verdict = reporting.classify_run(losses, GOOD)
    assert (verdict.diverged, verdict.warmup_blow_up, verdict.micro_divergences, verdict.full_divergences) == (
        False, True, 1, 0)


def test_one_dead_task_after_a_blow_up_is_diverged_but_not_without_one():
    losses = _healthy()
    losses[2] = 300.0
    one_dead = {"like_auc": 0.49995, "love_auc": 0.39, "rating_rmse": 1.09}  # a constant "like" prediction
    verdict = reporting.classify_run(losses, one_dead)
    # The blow-up recovered (micro), but it left a dead task: the run diverged.
    assert (verdict.diverged, verdict.reason, verdict.micro_divergences) == (True, "task_dead_after_blow_up", 1)
    assert not reporting.classify_run(_healthy(), one_dead).diverged  # no blow-up: a weak model, not a divergence
    rating_dead = {"like_auc": 0.55, "love_auc": 0.56, "rating_rmse": 3.59}
    assert not reporting.classify_run(losses, rating_dead).diverged  # no reference RMSE: regression not judged
    verdict = reporting.classify_run(losses, rating_dead, constant_rmse={"rating_rmse": 1.12})
    assert (verdict.diverged, verdict.reason) == (True, "task_dead_after_blow_up")
    healthy_rating = {**rating_dead, "rating_rmse": 1.6}  # 1.6 < 1.5 x 1.12
    assert not reporting.classify_run(losses, healthy_rating, constant_rmse={"rating_rmse": 1.12}).diverged


def test_undertrained_run_at_chance_without_blow_up_is_not_diverged():
    verdict = reporting.classify_run(np.linspace(17.0, 14.0, 150), {"like_auc": 0.51, "love_auc": 0.49})
    assert not verdict.diverged


def test_verdict_config_checks_its_thresholds():
    with pytest.raises(ValueError, match="far_above_best_ratio"):
        reporting.VerdictConfig(far_above_best_ratio=1.0)
    with pytest.raises(ValueError, match="chance_auc_margin"):
        reporting.VerdictConfig(chance_auc_margin=0.5)
    with pytest.raises(ValueError, match="empty"):
        reporting.classify_run([], GOOD)


# Tables from a recorded JSON ------------------------------------------------------------------------------------


def _record(model, method, multiplier, seed, like, love, rmse, diverged=False, hyperparameters=None, micro=0,
            rollback=False, rollbacks=None):
    config = {"dataset": "movielens_100k", "model": model, "method": method,
              "hyperparameters": hyperparameters or {}, "lr_multiplier": multiplier, "learning_rate": 0.02 * multiplier,
              "seed": seed, "rollback": {"lr_factor": 0.5} if rollback else None}
    record = {
        "key": reporting.config_key(config), "config": config, "tasks": TASKS,
        "metrics": {"like_auc": like, "love_auc": love, "rating_rmse": rmse},
        "losses": [3.0, 2.0, 1.0],
        "verdict": {"diverged": diverged, "reason": "blew_up_at_chance" if diverged else "",
                    "micro_divergences": micro, "full_divergences": int(diverged)},
        "seconds": 1.0,
    }
    if rollbacks is not None:
        record["rollbacks"] = rollbacks
    return record


@pytest.fixture
def recorded_runs(tmp_path):
    """A small recorded grid, written to and read back from JSON as reproduce.py's runs.json is."""
    runs = []
    for seed, (a, b) in enumerate([(0.70, 0.60), (0.72, 0.62), (0.74, 0.64)]):
        runs.append(_record("small", "naive", 1.0, seed, 0.5, 0.5, 3.7, diverged=True))
        runs.append(_record("small", "naive", 2.0, seed, 0.5, 0.5, 3.7, diverged=True))
        # GC: threshold 0.1 is best at 1x; at 2x seed 2 diverged, so 2x is not eligible though its mean is higher.
        runs.append(_record("small", "gc", 1.0, seed, a, b, 1.0 + seed / 10, hyperparameters={"threshold": 0.1}))
        runs.append(_record("small", "gc", 1.0, seed, a - 0.1, b, 1.0, hyperparameters={"threshold": 0.01}))
        runs.append(_record("small", "gc", 2.0, seed, 0.9, 0.9, 1.0, hyperparameters={"threshold": 0.1},
                            diverged=seed == 2, micro=1))
        runs.append(_record("small", "clippy", 1.0, seed, a, b, 1.0))
        runs.append(_record("small", "clippy", 2.0, seed, a + 0.01, b + 0.01, 0.9, micro=seed))
        runs.append(_record("small", "naive", 2.0, seed, 0.6, 0.55, 1.2, rollback=True, rollbacks=2, micro=1))
    path = tmp_path / "runs.json"
    reporting.write_json_atomically(path, runs)
    return reporting.read_json(path)


def _rows(markdown):
    return {line.split(" | ")[0].lstrip("| "): [c.strip() for c in line.strip("|\n ").split(" | ")[1:]]
            for line in markdown.splitlines()[2:]}


def test_paper_table_shows_best_stable_setting_mean_std_and_divergence(recorded_runs):
    rows = _rows(reporting.paper_table(recorded_runs))
    assert list(rows) == ["Small AUC (like)", "Small AUC (love)", "Small RMSE (rating)", "Small best lr"]
    # Columns: Naive, GC, AGC, LAMB, Clippy.
    assert rows["Small AUC (like)"] == ["diverged (6/6)", "72.00 ± 2.00", "–", "–", "73.00 ± 2.00"]
    assert rows["Small AUC (love)"][4] == "63.00 ± 2.00"
    assert rows["Small RMSE (rating)"][1] == "1.1000 ± 0.1000"
    assert rows["Small RMSE (rating)"][4] == "0.9000 ± 0.0000"
    assert rows["Small best lr"] == ["diverged (6/6)", "1x, threshold=0.1", "–", "–", "2x"]


def test_best_candidate_breaks_ties_towards_the_smaller_learning_rate():
    runs = [_record("large", "clippy", multiplier, 0, 0.7, 0.6, 1.0) for multiplier in (2.0, 1.0)]
    options = reporting.candidates(runs)[("large", "clippy")]
    assert reporting.best_candidate(options).lr_multiplier == 1.0


def test_stability_table_counts_divergences_and_micro_per_learning_rate(recorded_runs):
    rows = _rows(reporting.stability_table(recorded_runs))
    assert rows["Small 1x"][0] == "50.00 · 3/3 div · 0 micro"
    assert rows["Small 2x"][1] == "90.00 · 1/3 div · 3 micro"  # no stable GC setting at 2x: the least diverged one
    assert rows["Small 2x"][4] == "68.00 · 0/3 div · 3 micro"  # mean of (0.71+0.61)/2, (0.73+0.63)/2, (0.75+0.65)/2


def test_rollback_table_compares_the_same_setting_with_and_without(recorded_runs):
    lines = reporting.rollback_table(recorded_runs).splitlines()[2:]
    assert len(lines) == 2
    without = [c.strip() for c in lines[0].strip("| ").split(" | ")]
    with_rollback = [c.strip() for c in lines[1].strip("| ").split(" | ")]
    assert without[1:6] == ["off", "3/3", "0", "3", "0"]
    assert with_rollback[1:6] == ["on", "0/3", "3", "0", "6"]
    assert with_rollback[6] == "60.00 ± 0.00"
    assert reporting.rollback_table([r for r in recorded_runs if not r["config"]["rollback"]]) == ""


def test_paper_table_rejects_no_records():
    with pytest.raises(ValueError, match="no run records"):
        reporting.paper_table([])


# Plots ----------------------------------------------------------------------------------------------------------


def test_plots_write_pngs_and_drop_embedding_factors(recorded_runs, tmp_path):
    path = reporting.plot_training_loss(recorded_runs, str(tmp_path / "loss.png"), 2.0)
    assert os.path.getsize(path) > 5000
    with pytest.raises(ValueError, match="multiplier 4"):
        reporting.plot_training_loss(recorded_runs, str(tmp_path / "none.png"), 4.0)
    clippy = dict(recorded_runs[6])
    clippy["clipping_factors"] = {
        "steps": [0, 1, 2],
        "factors": {"embedding/table_user_id/embeddings": [1.0, 1.0, 1.0], "bottom/dense/kernel": [1.0, 0.4, 0.7]},
    }
    factors = reporting.clipping_factor_record(clippy)
    assert factors.factors == {"bottom/dense/kernel": [1.0, 0.4, 0.7]}
    assert os.path.getsize(reporting.plot_run_clipping_factors(clippy, str(tmp_path / "factors.png"))) > 5000
    with pytest.raises(ValueError, match="no clipping factors"):
        reporting.clipping_factor_record(recorded_runs[0])


def test_skip_pattern_is_a_regular_expression_searched_as_the_optimizers_do(recorded_runs, tmp_path):
    clippy = dict(recorded_runs[6])
    clippy["clipping_factors"] = {
        "steps": [0, 1],
        "factors": {"embedding/table_user_id/embeddings": [1.0, 1.0], "bottom/dense/kernel": [1.0, 0.4],
                    "tower_like/embedding_head/kernel": [0.9, 0.8]},
    }
    # Neither pattern is a substring of any name; as regular expressions (re.search) each matches some.
    assert list(reporting.clipping_factor_record(clippy, "embed.*table").factors) == [
        "bottom/dense/kernel", "tower_like/embedding_head/kernel"]
    assert list(reporting.clipping_factor_record(clippy, "^embedding").factors) == [
        "bottom/dense/kernel", "tower_like/embedding_head/kernel"]
    assert list(reporting.clipping_factor_record(clippy, "embedding").factors) == ["bottom/dense/kernel"]
    with pytest.raises(ValueError, match=r"`skip_pattern` has an invalid pattern '\('"):
        reporting.clipping_factor_record(clippy, "(")
    # Nothing left to plot after the skip: still a plot.
    path = reporting.plot_run_clipping_factors(clippy, str(tmp_path / "none.png"), skip_pattern="kernel|table")
    assert os.path.getsize(path) > 1000
