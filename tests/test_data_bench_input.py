"""scripts/bench_input.py's verdict: which pipelines miss the 5x target, and the Markdown report saying so."""

import importlib.util
import os

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench_input.py")


def _bench_input():
    spec = importlib.util.spec_from_file_location("bench_input", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(dataset, window, ratio):
    model_speed = None if ratio is None else 1000.0
    return {
        "dataset": dataset,
        "shuffle_window": window,
        "input_examples_per_second": 1000.0 * (ratio or 1.0),
        "model_examples_per_second": model_speed,
        "ratio": ratio,
    }


REPORT = {
    "batch_size": 512, "warmup_steps": 2, "model_steps": 10, "model_scale": 0.5, "optimizer": "Adagrad(0.05)",
    "synthetic_examples": 100_000, "keras": "2.21.0", "tensorflow": "2.21.0",
    "machine": {"processor": "x86_64", "cpus": 2},
}


def test_rows_below_the_target_are_named_in_the_report():
    bench = _bench_input()
    rows = [_row("movielens_100k", 0, 12.0), _row("synthetic", 4096, 4.9), _row("census_income", 0, 5.0)]
    assert [(row["dataset"], row["shuffle_window"]) for row in bench.below_target(rows)] == [("synthetic", 4096)]
    report = bench.markdown_report(rows, REPORT, "scripts/bench_input.py --model-steps 10")
    assert "`scripts/bench_input.py --model-steps 10`" in report and "10 timed model steps" in report
    assert "**Below the 5x target:** synthetic (window 4096, 4.9x)." in report
    assert "| synthetic | 4096 | 4,900 | 1,000 | 4.9x | NO |" in report


def test_unmeasured_model_is_not_judged_and_said_so():
    bench = _bench_input()
    rows = [_row("movielens_100k", 0, None)]
    assert bench.below_target(rows) == []
    assert "target was not checked" in bench.markdown_report(rows, REPORT, "scripts/bench_input.py --skip-model")
    passing = [_row("movielens_100k", 0, 5.0)]
    assert "Every measured pipeline is at least 5x faster" in bench.markdown_report(passing, REPORT, "x")
