"""scripts/train.py's model flags and config files, held-out evaluation, metrics file, export and resume.

One small PLE run (2048 synthetic examples, 2 epochs of 16 steps, 300 held-out examples) serves most tests; the
held-out numbers it reports are checked against `model.evaluate`, against metrics recomputed from the model's
predictions, and against a SavedModel served in a fresh process. Census-Income (the dataset with a validation
split) and MultiWorkerMirroredStrategy (2 processes) are `slow`.
"""

import contextlib
import dataclasses
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import tfrs_clippy_models as models
from tfrs_clippy import data
from tfrs_clippy.keras_runtime import keras

import train  # scripts/ is on sys.path (tests/conftest.py)
from experiments import train_eval
from experiments.run_setup import build_model_and_optimizer, build_optimizer, load_splits, make_checkpoint
from experiments.train_flags import parse_args
from experiments.training import CONFIG_FILE
from script_runner import free_ports

ROOT = pathlib.Path(__file__).resolve().parents[2]

TRAIN_PY = ROOT / "scripts" / "train.py"
DATA_FLAGS = [
    "--dataset", "synthetic", "--synthetic-examples", "2048", "--synthetic-test-examples", "300",
    "--synthetic-vocabulary", "100,1000", "--scale", "0.0625", "--batch-size", "128", "--learning-rate", "0.05",
    "--epochs", "2", "--verbose", "0",
]
PLE_FLAGS = ["--bottom", "ple", "--num-experts", "2", "--num-levels", "2", "--cross-layers", "1", "--tower-units", "8"]
PLE_CONFIG = models.RankerConfig.preset(
    "small", bottom="ple", num_experts=2, num_levels=2, cross_layers=1, tower_units=(8,), scale=0.0625
)
TASK_METRICS = ["binary_0_auc", "binary_1_auc", "regression_0_rmse"]
# Loads the SavedModel with plain TensorFlow (no Keras 2, no models/), as a server would, and predicts.
SERVE = """
import sys
import numpy as np
import tensorflow as tf
export_dir, features_file, output_file = sys.argv[1:]
serve = tf.saved_model.load(export_dir).signatures["serving_default"]
outputs = serve(**{name: tf.constant(value) for name, value in np.load(features_file).items()})
np.savez(output_file, **{name: value.numpy() for name, value in outputs.items()})
"""


def read_json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def ple_run(tmp_path_factory):
    """The PLE run with checkpoints, TensorBoard logs, metrics file and export; and what it printed."""
    directory = tmp_path_factory.mktemp("ple")
    flags = DATA_FLAGS + PLE_FLAGS + [
        "--checkpoint-dir", str(directory / "ckpt"), "--log-dir", str(directory / "logs"),
        "--metrics-out", str(directory / "metrics.json"), "--export-dir", str(directory / "serving"),
    ]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run = train.main(flags)
    return run, directory, printed.getvalue()


@pytest.fixture(scope="module")
def test_split():
    """The run's held-out examples (the synthetic test split), batched as train.py batches them."""
    splits = load_splits(parse_args(DATA_FLAGS))
    return splits.spec, data.make_pipeline(splits.test, 128)


# Flags and config files ------------------------------------------------------------------------------------------


def test_model_flags_override_the_preset():
    args = parse_args(DATA_FLAGS + PLE_FLAGS)
    assert args.ranker_config == PLE_CONFIG
    assert parse_args(["--preset", "large_dcn", "--cross-layers", "0"]).ranker_config == (
        models.RankerConfig.preset("large_dcn", cross_layers=0)
    )
    assert parse_args([]).ranker_config == models.RankerConfig.preset("small")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_flags_override_the_config_file(tmp_path, suffix):
    path = tmp_path / f"ranker{suffix}"
    content = {"preset": "large", "bottom": "mmoe", "num_experts": 2, "task_weights": {"binary_0": 2.0}}
    path.write_text(json.dumps(content))  # JSON is YAML too
    args = parse_args(["--config", str(path), "--num-experts", "5", "--scale", "0.5"])
    assert args.ranker_config == models.RankerConfig.preset(
        "large", bottom="mmoe", num_experts=5, scale=0.5, task_weights={"binary_0": 2.0}
    )


def bad_file(tmp_path: pathlib.Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "make_flags, message",
    [
        (lambda d: ["--config", bad_file(d, "c.yaml", "bottom: mmoe\ncolour: red\n")],
         "--config {d}/c.yaml: RankerConfig: unknown fields ['colour']"),
        (lambda d: ["--config", bad_file(d, "c.yaml", "bottom: moe\n")],
         "--config {d}/c.yaml: RankerConfig: `bottom` must be one of ('shared_bottom', 'mmoe', 'ple'), got 'moe'"),
        (lambda d: ["--config", bad_file(d, "c.yaml", "- mmoe\n")], "--config {d}/c.yaml: RankerConfig.load:"),
        (lambda d: ["--config", bad_file(d, "c.yaml", "bottom: [mmoe\n")], "--config {d}/c.yaml: while parsing"),
        (lambda d: ["--config", bad_file(d, "c.txt", "bottom: mmoe\n")], "must end in .yaml, .yml or .json"),
        (lambda d: ["--config", f"{d}/missing.yaml"], "--config {d}/missing.yaml: no such file"),
        (lambda d: ["--config", bad_file(d, "c.yaml", "{}"), "--preset", "large"],
         "argument --preset: not allowed with argument --config"),
        (lambda d: ["--bottom", "moe"], "--bottom: invalid choice: 'moe'"),
        (lambda d: ["--num-experts", "0"], "--num-experts must be an integer >= 1, got '0'"),
        (lambda d: ["--cross-layers", "-1"], "--cross-layers must be an integer >= 0, got '-1'"),
        (lambda d: ["--tower-units", "8,x"], "--tower-units must be comma-separated integers >= 1, got '8,x'"),
        (lambda d: ["--task-weights", "[1]"], "--task-weights must be a JSON object, got '[1]'"),
        (lambda d: ["--task-weights", '{"like": -1}'],
         "--task-weights {\"like\": -1}: RankerConfig: `task_weights['like']` must be a number >= 0, got -1"),
        (lambda d: ["--warmup-steps", "-3"], "--warmup-steps must be an integer >= 0, got '-3'"),
        (lambda d: ["--metrics-out", str(d)], "--metrics-out must name a file, got the directory '{d}'"),
        (lambda d: ["--export-dir", bad_file(d, "f", "")], "--export-dir must name a directory, got the file '{d}/f'"),
    ],
)
def test_bad_model_flags_and_files_name_the_flag_and_value(make_flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(make_flags(tmp_path))
    assert message.replace("{d}", str(tmp_path)) in capsys.readouterr().err


def test_task_weights_for_a_task_the_dataset_lacks_name_the_flags_and_dataset():
    args = parse_args(DATA_FLAGS + ["--task-weights", '{"like": 2}'])
    spec = load_splits(args).spec
    with pytest.raises(ValueError, match=r"the model flags on --dataset synthetic: .*names tasks \['like'\]"):
        build_model_and_optimizer(args, spec, tf.distribute.get_strategy())


def test_warmup_steps_start_the_learning_rate_at_peak_over_steps():
    optimizer = build_optimizer(parse_args(["--learning-rate", "0.2", "--warmup-steps", "4"]))
    assert float(optimizer.learning_rate) == pytest.approx(0.05)  # step 0: peak / 4


def test_held_out_is_the_validation_split_where_there_is_one(tiny_spec, make_batch):
    def examples(size: int, seed: int) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices(make_batch(tiny_spec, size, seed))

    splits = data.Splits("tiny", tiny_spec, examples(64, 0), examples(40, 1), examples(24, 2),
                         {"train": 64, "test": 40, "validation": 24})
    strategy, config = tf.distribute.get_strategy(), models.RankerConfig()
    held_out = train_eval.HeldOut(splits, 16, strategy, config)
    assert (held_out.split, held_out.prefix, held_out.examples) == ("validation", "val_", 24)
    without = train_eval.HeldOut(dataclasses.replace(splits, validation=None), 16, strategy, config,
                                 drop_remainder=True)
    assert (without.split, without.prefix, without.examples) == ("test", "test_", 32)  # TPU: full batches only
    assert train_eval.task_metric_names(tiny_spec) == ["click_auc", "rating_rmse"]


# The held-out evaluation -----------------------------------------------------------------------------------------


def test_the_run_trains_the_model_the_flags_name(ple_run):
    run, directory, _ = ple_run
    assert run.config == PLE_CONFIG == run.model.ranker_config
    assert run.steps == 32
    # PLE's gates: 1 task-specific and 2 shared experts per task, in training and on the held-out split.
    gates = {f"gate_binary_0_{expert}" for expert in ("specific0", "shared0", "shared1")}
    assert gates <= set(run.history) and gates <= set(run.held_out)
    # The effective config beside the checkpoints, loadable as a --config file.
    recorded = directory / "ckpt" / CONFIG_FILE
    assert models.RankerConfig.load(recorded) == PLE_CONFIG
    assert parse_args(DATA_FLAGS + ["--config", str(recorded)]).ranker_config == PLE_CONFIG


def test_held_out_metrics_equal_model_evaluate_on_the_test_split(ple_run, test_split):
    run, directory, _ = ple_run
    _, batches = test_split
    expected = run.model.evaluate(batches, verbose=0, return_dict=True)
    assert run.held_out_split == "test"
    for name, value in run.held_out.items():
        assert value == pytest.approx(expected[name], abs=1e-6), name
    record = read_json(directory / "metrics.json")
    assert list(record["held_out"]) == TASK_METRICS
    for name in TASK_METRICS:
        assert record["held_out"][name] == pytest.approx(expected[name], abs=1e-6), name


def test_held_out_metrics_are_those_of_the_predictions(ple_run, test_split):
    """Recomputed from the model's predictions on all 300 examples: RMSE exactly, AUC as Keras computes it."""
    run, _, _ = ple_run
    spec, batches = test_split
    predictions = {task.name: [] for task in spec.tasks}
    labels = {task.name: [] for task in spec.tasks}
    for features, batch_labels in batches:
        for task, values in run.model(features).items():
            predictions[task].append(values.numpy())
            labels[task].append(batch_labels[task].numpy())
    predictions = {task: np.concatenate(values) for task, values in predictions.items()}
    labels = {task: np.concatenate(values) for task, values in labels.items()}
    assert len(labels["binary_0"]) == 300
    rmse = np.sqrt(np.mean((predictions["regression_0"] - labels["regression_0"]) ** 2))
    assert run.held_out["regression_0_rmse"] == pytest.approx(rmse, rel=1e-5)
    for task in ("binary_0", "binary_1"):
        auc = keras.metrics.AUC()  # the ranker's: 200 thresholds, on the probabilities here
        auc.update_state(labels[task], predictions[task])
        assert run.held_out[f"{task}_auc"] == pytest.approx(float(auc.result()), abs=1e-6)
        positives, negatives = predictions[task][labels[task] == 1], predictions[task][labels[task] == 0]
        exact = np.mean(positives[:, None] > negatives[None, :]) + 0.5 * np.mean(positives[:, None] == negatives)
        assert run.held_out[f"{task}_auc"] == pytest.approx(exact, abs=0.02)  # 200-threshold approximation


def test_held_out_metrics_per_epoch_in_history_tensorboard_and_metrics_file(ple_run):
    run, directory, printed = ple_run
    record = read_json(directory / "metrics.json")
    assert [(e["epoch"], e["step"]) for e in record["held_out_per_epoch"]] == [(1, 16), (2, 32)]
    for name in TASK_METRICS:
        assert len(run.history[f"test_{name}"]) == 2
        assert run.history[f"test_{name}"][-1] == record["held_out"][name] == record["held_out_per_epoch"][1][name]
    assert run.history["test_regression_0_loss"][-1] == pytest.approx(run.held_out["regression_0_loss"])
    assert "test_loss" not in run.history  # TFRS's evaluate "loss" is the last batch's: not reported
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in (directory / "logs").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
    for name in TASK_METRICS:
        steps = [step for step, _ in scalars[f"epoch/test_{name}"]]
        assert steps == [16, 32]
        assert scalars[f"epoch/test_{name}"][-1][1] == pytest.approx(record["held_out"][name])
    assert (record["steps"], record["steps_this_run"], record["held_out_examples"]) == (32, 32, 300)
    assert record["ranker_config"] == PLE_CONFIG.to_dict() and record["flags"]["bottom"] == "ple"
    assert 0 < record["wall_seconds"] == pytest.approx(run.wall_seconds, abs=1e-3)
    lines = printed.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "held-out after epoch 1 (step 16)", "held-out after epoch 2 (step 32)", "train.py"
    ]
    metrics = ", ".join(f"{name} {record['held_out'][name]:.4f}" for name in TASK_METRICS)
    assert lines[-1].endswith(f"held-out test, 300 examples: {metrics}")
    assert lines[-1].startswith("train.py: synthetic, ple, clippy: 32 steps (32 in this run) in ")


def test_export_serves_the_same_predictions_in_a_fresh_process(ple_run, test_split, tmp_path):
    run, directory, _ = ple_run
    spec, batches = test_split
    features, _ = next(iter(batches))
    features = {feature.name: features[feature.name].numpy() for feature in spec.features}
    np.savez(tmp_path / "features.npz", **features)
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}  # a server needs no Keras 2
    process = subprocess.run(
        [sys.executable, "-c", SERVE, str(directory / "serving"), str(tmp_path / "features.npz"),
         str(tmp_path / "served.npz")],
        env=dict(env, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True, text=True, timeout=180,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    served = dict(np.load(tmp_path / "served.npz"))
    expected = run.model(features)
    assert sorted(served) == sorted(expected) == ["binary_0", "binary_1", "regression_0"]
    for task, values in expected.items():
        assert served[task].shape == (128,)
        np.testing.assert_allclose(served[task], values.numpy(), rtol=0, atol=1e-6)


# Resume ------------------------------------------------------------------------------------------------------------


def test_a_rerun_naming_no_model_resumes_with_the_recorded_config(ple_run, tmp_path):
    run, directory, _ = ple_run
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        # --log-dir stays: it makes the optimizer export clipping factors, which changes its checkpointed variables.
        again = train.main(DATA_FLAGS + ["--checkpoint-dir", str(directory / "ckpt"), "--log-dir", str(tmp_path),
                                         "--metrics-out", str(tmp_path / "metrics.json")])
    assert again.config == PLE_CONFIG and again.steps == 32
    record = read_json(tmp_path / "metrics.json")
    assert record["steps_this_run"] == 0 and record["held_out_per_epoch"] == []
    for name in TASK_METRICS:  # the finished run's checkpoint, evaluated again at the end
        assert record["held_out"][name] == pytest.approx(run.held_out[name], abs=1e-6)
    assert printed.getvalue().startswith("held-out at the end (step 32): test, 300 examples: ")


def test_a_rerun_naming_another_model_is_refused(ple_run):
    _, directory, _ = ple_run
    with pytest.raises(ValueError, match=r"holds a run of another ranker: bottom mmoe \(was ple\)"):
        train.main(DATA_FLAGS + PLE_FLAGS[2:] + ["--bottom", "mmoe", "--checkpoint-dir", str(directory / "ckpt")])


# The dataset with a validation split, and MultiWorkerMirrored ---------------------------------------------------


@pytest.mark.slow
def test_census_income_mmoe_reports_validation_auc_for_both_tasks(tmp_path):
    run = train.main([
        "--dataset", "census_income", "--bottom", "mmoe", "--scale", "0.0625", "--batch-size", "4096",
        "--max-steps", "2", "--verbose", "0", "--metrics-out", str(tmp_path / "m.json"),
    ])
    record = read_json(tmp_path / "m.json")
    assert (record["held_out_split"], record["held_out_examples"]) == ("validation", 49_881)
    assert list(record["held_out"]) == ["income_50k_auc", "never_married_auc"]
    assert all(0 < value < 1 for value in record["held_out"].values())
    assert run.history["val_income_50k_auc"] == [record["held_out"]["income_50k_auc"]]


@pytest.mark.slow
def test_multi_worker_evaluates_on_every_worker_and_only_the_chief_reports(tmp_path):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    processes = []
    for index in range(2):
        out = tmp_path / f"worker{index}"
        flags = DATA_FLAGS + ["--epochs", "1", "--strategy", "multi_worker", "--checkpoint-dir", str(out / "ckpt"),
                              "--metrics-out", str(out / "metrics.json"), "--export-dir", str(out / "serving")]
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        env = dict(os.environ, TF_CONFIG=tf_config, TF_CPP_MIN_LOG_LEVEL="3")
        processes.append(subprocess.Popen([sys.executable, str(TRAIN_PY), *flags], env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, stderr[-3000:]
            outputs.append(stdout)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    chief, other = tmp_path / "worker0", tmp_path / "worker1"
    assert "held-out after epoch 1 (step 16)" in outputs[0] and "held-out" not in outputs[1]
    assert not (other / "metrics.json").exists() and not (other / "serving").exists()
    assert (chief / "serving" / "saved_model.pb").exists()
    record = read_json(chief / "metrics.json")
    assert (record["replicas"], record["steps"], record["held_out_examples"]) == (2, 16, 300)
    # The chief's numbers (evaluated over both workers' shards) are those of its checkpoint on one device.
    args = parse_args(DATA_FLAGS)
    splits = load_splits(args)
    model, optimizer = build_model_and_optimizer(args, splits.spec, tf.distribute.get_strategy())
    make_checkpoint(model, optimizer).restore(
        tf.train.latest_checkpoint(str(chief / "ckpt"))).assert_existing_objects_matched()
    expected = model.evaluate(data.make_pipeline(splits.test, 128), verbose=0, return_dict=True)
    for name in TASK_METRICS:
        assert record["held_out"][name] == pytest.approx(expected[name], abs=1e-5), name
