"""scripts/reproduce.py end to end on a tiny budget: runs, records, tables, plots, and resuming without recomputing."""

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from experiments import records, runs

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "reproduce.py"
TINY = ["--models", "small", "--methods", "naive,clippy", "--seeds", "1", "--lr-multipliers", "2",
        "--train-steps", "12", "--eval-examples", "1000", "--rollback-model", "small"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "TF_USE_LEGACY_KERAS": "1"})


@pytest.mark.slow
def test_tiny_reproduction_writes_every_output_and_resumes(tmp_path):
    first = _run(*TINY, "--out", str(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    progress = [line for line in first.stdout.splitlines() if line.startswith("[run ")]
    # naive and clippy at 2x, one seed, then naive 2x with RollbackOnDivergence.
    assert len(progress) == 3 and all(re.search(r"elapsed \S+, remaining ~\S+\)$", line) for line in progress)
    assert "small clippy lr=2x (0.16) seed=0" in progress[1] and "rollback" in progress[2]
    out = tmp_path / "movielens_100k"
    records = json.loads((out / "runs.json").read_text())
    assert len(records) == 3 and len(list((out / "runs").glob("*.json"))) == 3
    for record in records:
        assert len(record["losses"]) == 12
        assert (record["config"]["warmup_steps"], record["config"]["output_bias"]) == (1, "label_prior")
        assert set(record["metrics"]) == {"like_auc", "love_auc", "rating_rmse"}
        assert 0.0 <= record["metrics"]["like_auc"] <= 1.0
        # Predicting the training mean rating (about 3.5) on ratings 1..5 is off by about one star.
        assert 0.8 < record["constant_rmse"]["rating_rmse"] < 1.5
    clippy = [r for r in records if r["config"]["method"] == "clippy"]
    assert all(len(r["clipping_factors"]["steps"]) == 12 for r in clippy)
    assert any(name.startswith("bottom/") for name in clippy[0]["clipping_factors"]["factors"])
    # The tables the optimizer leaves unclipped (EMBEDDING_PATTERN) are not recorded.
    assert not any(name.startswith("embedding/") for name in clippy[0]["clipping_factors"]["factors"])
    table = (out / "table.md").read_text()
    assert "| Small AUC (like) |" in table and "| Small best lr |" in table and "scaled by 0.0625" in table
    assert "RollbackOnDivergence" in table
    for png in ("training_loss_2x.png", "clipping_factors_2x.png"):
        assert (out / png).stat().st_size > 5000

    second = _run(*TINY, "--out", str(tmp_path))
    assert second.returncode == 0, second.stderr[-3000:]
    cached = [line for line in second.stdout.splitlines() if line.startswith("[run ")]
    assert len(cached) == 3 and all("... cached:" in line for line in cached)
    assert json.loads((out / "runs.json").read_text())[0]["metrics"] == records[0]["metrics"]


def _load_script():
    spec = importlib.util.spec_from_file_location("reproduce_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bad_flags_fail_with_the_flag_named(capsys):
    reproduce = _load_script()
    for args, message in ((["--seeds", "0"], "--seeds must be >= 1, got 0"),
                          (["--methods", "naive,sgd"], "--methods must be among"),
                          (["--lr-multipliers", "1,x"], "--lr-multipliers must be comma-separated numbers"),
                          (["--scale", "-1"], "--scale must be a finite number > 0, got -1.0")):
        with pytest.raises(ValueError, match=re.escape(message)):
            reproduce.parse_args(args)
        assert reproduce.main(args) == 2 and message in capsys.readouterr().err


def test_plan_has_every_combination_and_the_rollback_stage():
    reproduce = _load_script()
    configs = reproduce.plan_runs(reproduce.parse_args(["--grid", "paper"]), 80_000)
    # Grid sizes 1 (naive), 3 (GC, AGC, LAMB), 1 (Clippy): 11 settings x 3 presets x 2 multipliers x 3 seeds,
    # then naive at 2x with rollback on Large+DCN for 3 seeds.
    assert len(configs) == 11 * 3 * 2 * 3 + 3
    assert len({records.config_key(config) for config in configs}) == len(configs)
    assert [c["learning_rate"] for c in configs[-3:]] == [0.16] * 3 and all(c["rollback"] for c in configs[-3:])
    assert len(reproduce.plan_runs(reproduce.parse_args([]), 80_000)) == 5 * 3 * 2 * 3 + 3
    # The production practices, recorded in every config: the default warm-up is 10% of 157 steps, rounded.
    assert all(c["warmup_steps"] == 16 and c["output_bias"] == "label_prior" for c in configs)


def test_warmup_and_output_bias_flags_change_the_config_and_its_key():
    reproduce = _load_script()
    default = reproduce.plan_runs(reproduce.parse_args([]), 80_000)[0]
    old = reproduce.plan_runs(reproduce.parse_args(["--warmup-steps", "0", "--output-bias", "zero"]), 80_000)[0]
    assert (old["warmup_steps"], old["output_bias"]) == (0, "zero")
    assert records.config_key(old) != records.config_key(default)
    # With --train-steps the default warm-up is 10% of the shorter run.
    assert reproduce.plan_runs(reproduce.parse_args(["--train-steps", "12"]), 80_000)[0]["warmup_steps"] == 1
    for args, message in ((["--warmup-steps", "-1"], "--warmup-steps must be >= 0, got -1"),
                          (["--output-bias", "mean"], "--output-bias must be among")):
        with pytest.raises(ValueError, match=re.escape(message)):
            reproduce.parse_args(args)


def test_help_prints_every_flag():
    # argparse %-formats help strings: a bare "%" in one (e.g. "10% of the steps") made --help crash.
    result = _run("--help")
    assert result.returncode == 0, result.stderr[-2000:]
    text = " ".join(result.stdout.split())  # argparse wraps the help text
    assert "--warmup-steps" in text and "10% of a run's steps" in text


def test_clipped_factors_leave_out_the_variables_the_embedding_pattern_matches_as_a_regular_expression():
    # Keyed by the names the optimizer matches its patterns against (Keras 2 variable names).
    factors = {"ranker/embedding/table_user_id/embeddings:0": [1.0, 1.0], "dense/kernel:0": [1.0, 0.4]}
    names = {"ranker/embedding/table_user_id/embeddings:0": "embedding/table_user_id/embeddings",
             "dense/kernel:0": "bottom/dense/kernel"}
    assert runs.clipped_factors(factors, names) == {"bottom/dense/kernel": [1.0, 0.4]}  # EMBEDDING_PATTERN
    # Not a substring of the table's name, but re.search finds it, as it does in the optimizers.
    assert list(runs.clipped_factors(factors, names, "embed.*table")) == ["bottom/dense/kernel"]
    # The optimizer's name of the table does not start with "embedding": it is clipped, so its factor is kept.
    assert list(runs.clipped_factors(factors, names, "^embedding")) == [
        "embedding/table_user_id/embeddings", "bottom/dense/kernel"]


def test_held_out_examples_stay_in_chunks():
    from tfrs_clippy import data  # pylint: disable=import-outside-toplevel

    splits = data.synthetic(num_train=8_192, num_test=10_000, vocabulary_sizes=(100,))
    held_out = runs.held_out(splits, 1000)
    assert held_out.num_examples == 1000 and [len(labels["binary_0"]) for _, labels in held_out.chunks] == [1000]
    assert runs.held_out(splits, 0) is splits.test
