"""scripts/experiments: run keys, atomic records, and the reproduction's paper-shaped tables and plots."""

import math
import os

import pytest

from experiments import paper_tables, records

TASKS = {"rating": "regression", "like": "binary", "love": "binary"}


# Keys and files ------------------------------------------------------------------------------------------------


def test_config_key_ignores_key_order_and_sees_every_value():
    config = {"model": "small", "method": "gc", "hyperparameters": {"threshold": 0.01}, "seed": 0}
    reordered = {"seed": 0, "hyperparameters": {"threshold": 0.01}, "method": "gc", "model": "small"}
    assert records.config_key(config) == records.config_key(reordered)
    assert len(records.config_key(config)) == 16
    assert records.config_key(config) != records.config_key({**config, "seed": 1})
    assert records.config_key(config) != records.config_key({**config, "hyperparameters": {"threshold": 0.1}})


def test_atomic_write_round_trips_nan_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "runs" / "abc.json"
    records.write_json_atomically(path, {"loss": [1.0, math.nan, math.inf]})
    records.write_json_atomically(path, {"loss": [2.0, math.nan]})  # replaces the first
    loaded = records.read_json(path)
    assert loaded["loss"][0] == 2.0 and math.isnan(loaded["loss"][1]) and len(loaded["loss"]) == 2
    assert os.listdir(path.parent) == ["abc.json"]


def test_atomic_write_that_fails_keeps_the_previous_file(tmp_path):
    path = tmp_path / "abc.json"
    records.write_json_atomically(path, {"ok": 1})
    with pytest.raises(TypeError):
        records.write_json_atomically(path, {"not serializable": object()})
    assert records.read_json(path) == {"ok": 1}
    assert os.listdir(tmp_path) == ["abc.json"]


# Tables from a recorded JSON ------------------------------------------------------------------------------------


def _record(model, method, multiplier, seed, like, love, rmse, diverged=False, hyperparameters=None, micro=0,
            rollback=False, rollbacks=None):
    config = {"dataset": "movielens_100k", "model": model, "method": method,
              "hyperparameters": hyperparameters or {}, "lr_multiplier": multiplier, "learning_rate": 0.02 * multiplier,
              "seed": seed, "rollback": {"lr_factor": 0.5} if rollback else None}
    record = {
        "key": records.config_key(config), "config": config, "tasks": TASKS,
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
    records.write_json_atomically(path, runs)
    return records.read_json(path)


def _rows(markdown):
    return {line.split(" | ")[0].lstrip("| "): [c.strip() for c in line.strip("|\n ").split(" | ")[1:]]
            for line in markdown.splitlines()[2:]}


def test_paper_table_shows_best_stable_setting_mean_std_and_divergence(recorded_runs):
    rows = _rows(paper_tables.paper_table(recorded_runs))
    assert list(rows) == ["Small AUC (like)", "Small AUC (love)", "Small RMSE (rating)", "Small best lr"]
    # Columns: Naive, GC, AGC, LAMB, Clippy.
    assert rows["Small AUC (like)"] == ["diverged (6/6)", "72.00 ± 2.00", "–", "–", "73.00 ± 2.00"]
    assert rows["Small AUC (love)"][4] == "63.00 ± 2.00"
    assert rows["Small RMSE (rating)"][1] == "1.1000 ± 0.1000"
    assert rows["Small RMSE (rating)"][4] == "0.9000 ± 0.0000"
    assert rows["Small best lr"] == ["diverged (6/6)", "1x, threshold=0.1", "–", "–", "2x"]


def test_best_candidate_breaks_ties_towards_the_smaller_learning_rate():
    runs = [_record("large", "clippy", multiplier, 0, 0.7, 0.6, 1.0) for multiplier in (2.0, 1.0)]
    options = paper_tables.candidates(runs)[("large", "clippy")]
    assert paper_tables.best_candidate(options).lr_multiplier == 1.0


def test_stability_table_counts_divergences_and_micro_per_learning_rate(recorded_runs):
    rows = _rows(paper_tables.stability_table(recorded_runs))
    assert rows["Small 1x"][0] == "50.00 · 3/3 div · 0 micro"
    assert rows["Small 2x"][1] == "90.00 · 1/3 div · 3 micro"  # no stable GC setting at 2x: the least diverged one
    assert rows["Small 2x"][4] == "68.00 · 0/3 div · 3 micro"  # mean of (0.71+0.61)/2, (0.73+0.63)/2, (0.75+0.65)/2


def test_rollback_table_compares_the_same_setting_with_and_without(recorded_runs):
    lines = paper_tables.rollback_table(recorded_runs).splitlines()[2:]
    assert len(lines) == 2
    without = [c.strip() for c in lines[0].strip("| ").split(" | ")]
    with_rollback = [c.strip() for c in lines[1].strip("| ").split(" | ")]
    assert without[1:6] == ["off", "3/3", "0", "3", "0"]
    assert with_rollback[1:6] == ["on", "0/3", "3", "0", "6"]
    assert with_rollback[6] == "60.00 ± 0.00"
    assert paper_tables.rollback_table([r for r in recorded_runs if not r["config"]["rollback"]]) == ""


def test_paper_table_rejects_no_records():
    with pytest.raises(ValueError, match="no run records"):
        paper_tables.paper_table([])


# Plots ----------------------------------------------------------------------------------------------------------


def test_plots_write_pngs_and_drop_embedding_factors(recorded_runs, tmp_path):
    path = paper_tables.plot_training_loss(recorded_runs, str(tmp_path / "loss.png"), 2.0)
    assert os.path.getsize(path) > 5000
    with pytest.raises(ValueError, match="multiplier 4"):
        paper_tables.plot_training_loss(recorded_runs, str(tmp_path / "none.png"), 4.0)
    clippy = dict(recorded_runs[6])
    clippy["clipping_factors"] = {
        "steps": [0, 1, 2],
        "factors": {"embedding/table_user_id/embeddings": [1.0, 1.0, 1.0], "bottom/dense/kernel": [1.0, 0.4, 0.7]},
    }
    factors = paper_tables.clipping_factor_record(clippy)
    assert factors.factors == {"bottom/dense/kernel": [1.0, 0.4, 0.7]}
    assert os.path.getsize(paper_tables.plot_run_clipping_factors(clippy, str(tmp_path / "factors.png"))) > 5000
    with pytest.raises(ValueError, match="no clipping factors"):
        paper_tables.clipping_factor_record(recorded_runs[0])


def test_skip_pattern_is_a_regular_expression_searched_as_the_optimizers_do(recorded_runs, tmp_path):
    clippy = dict(recorded_runs[6])
    clippy["clipping_factors"] = {
        "steps": [0, 1],
        "factors": {"embedding/table_user_id/embeddings": [1.0, 1.0], "bottom/dense/kernel": [1.0, 0.4],
                    "tower_like/embedding_head/kernel": [0.9, 0.8]},
    }
    # Neither pattern is a substring of any name; as regular expressions (re.search) each matches some.
    assert list(paper_tables.clipping_factor_record(clippy, "embed.*table").factors) == [
        "bottom/dense/kernel", "tower_like/embedding_head/kernel"]
    assert list(paper_tables.clipping_factor_record(clippy, "^embedding").factors) == [
        "bottom/dense/kernel", "tower_like/embedding_head/kernel"]
    assert list(paper_tables.clipping_factor_record(clippy, "embedding").factors) == ["bottom/dense/kernel"]
    with pytest.raises(ValueError, match=r"`skip_pattern` has an invalid pattern '\('"):
        paper_tables.clipping_factor_record(clippy, "(")
    # Nothing left to plot after the skip: still a plot.
    path = paper_tables.plot_run_clipping_factors(clippy, str(tmp_path / "none.png"), skip_pattern="kernel|table")
    assert os.path.getsize(path) > 1000
