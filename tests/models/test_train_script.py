"""scripts/train.py: flags, resume, TensorBoard logs, and every strategy it offers on this machine.

Default-strategy runs happen in this process; MirroredStrategy (2 logical CPUs) and ParameterServerStrategy
(an in-process cluster of 2 workers and 2 parameter servers) in subprocesses (`scripts/dist_train.py`), whose
checkpoints are then restored here, under the default strategy; so are their held-out metrics, which must equal
`model.evaluate` of the restored model. Model flags, evaluation and export: `test_train_eval.py`.
"""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import tfrs_clippy_models as models
from tfrs_clippy import data

import train  # scripts/ is on sys.path (tests/conftest.py)
from experiments.run_setup import build_model_and_optimizer, build_optimizer, load_splits, make_checkpoint
from experiments.train_flags import parse_args

ROOT = pathlib.Path(__file__).resolve().parents[2]
DIST_TRAIN = ROOT / "tests" / "scripts" / "dist_train.py"
# 2048 examples at a global batch of 128: 16 steps an epoch. (At a learning rate of 0.5 the run is chaotic: the
# 1e-8 rounding differences of a 2-replica gradient sum grow to 3e-2 in 32 steps, for any optimizer's kinks.)
RUN_FLAGS = [
    "--dataset", "synthetic", "--synthetic-examples", "2048", "--synthetic-vocabulary", "100,1000",
    "--scale", "0.0625", "--batch-size", "128", "--learning-rate", "0.05", "--include-embeddings", "--verbose", "0",
    "--synthetic-test-examples", "300",  # held out: 2 full batches and a partial one, evaluated after each epoch
]
EPOCHS = ["--epochs", "2"]


def run_in_subprocess(tmp_path: pathlib.Path, flags: list[str]) -> dict[str, np.ndarray]:
    output = tmp_path / "final.npz"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    process = subprocess.run(
        [sys.executable, str(DIST_TRAIN), str(output), *flags], env=env, capture_output=True, text=True, timeout=240
    )
    assert process.returncode == 0, process.stderr[-3000:]
    return dict(np.load(output))


def restore_under_default(flags: list[str], checkpoint_dir: pathlib.Path, with_optimizer: bool = True):
    """The run's model (and optimizer) built on one device, restored from the latest checkpoint of the directory."""
    args = parse_args(flags)
    spec = load_splits(args).spec
    if with_optimizer:
        model, optimizer = build_model_and_optimizer(args, spec, tf.distribute.get_strategy())
        checkpoint = make_checkpoint(model, optimizer)
    else:  # not compiled: the model then tracks no optimizer
        model, optimizer = models.build_ranker(spec, args.ranker_config), None
        checkpoint = tf.train.Checkpoint(model=model)
    status = checkpoint.restore(tf.train.latest_checkpoint(str(checkpoint_dir)))
    status.assert_existing_objects_matched()
    return model, optimizer


def evaluate_on_test_split(model, flags: list[str]) -> dict[str, float]:
    """`model.evaluate` on the synthetic test split, batched as train.py batches it (the reference numbers)."""
    args = parse_args(flags)
    if getattr(model, "optimizer", None) is None:
        model.compile()
    batches = data.make_pipeline(load_splits(args).test, args.batch_size)
    return model.evaluate(batches, verbose=0, return_dict=True)


def assert_held_out_equals(metrics_file: pathlib.Path, expected: dict[str, float], atol: float = 1e-6) -> None:
    """The --metrics-out file's per-task held-out metrics equal `expected`'s (binary: AUC; regression: RMSE)."""
    record = json.loads(metrics_file.read_text())
    assert record["held_out_split"] == "test" and record["held_out_examples"] == 300
    assert sorted(record["held_out"]) == ["binary_0_auc", "binary_1_auc", "regression_0_rmse"]
    for name, value in record["held_out"].items():
        assert value == pytest.approx(expected[name], abs=atol), name


def saved_values(saved: dict[str, np.ndarray], key: str = "weights") -> list[np.ndarray]:
    """The arrays `dist_train.py` saved under `key/<i>`, in order."""
    return [saved[f"{key}/{i}"] for i in range(sum(name.startswith(f"{key}/") for name in saved))]


def trainable(model) -> list[np.ndarray]:
    # Not `get_weights()`: the ranker's weights include its metrics' state, which each `fit` call resets.
    return [variable.numpy() for variable in model.trainable_variables]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: 2 epochs on one device in one go, with checkpoints and logs."""
    directory = tmp_path_factory.mktemp("uninterrupted")
    run = train.main(RUN_FLAGS + EPOCHS + ["--checkpoint-dir", str(directory / "ckpt"), "--log-dir",
                                           str(directory / "logs"), "--log-every", "4", "--metrics-out",
                                           str(directory / "metrics.json")])
    return run, directory


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--strategy", "gpu"], "--strategy: invalid choice: 'gpu'"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1, got '0'"),
        (["--learning-rate", "nan"], "--learning-rate must be a number > 0, got 'nan'"),
        (["--local-cluster", "2"], "--local-cluster must be 2 comma-separated integers >= 1, got '2'"),
        (["--local-cluster", "2,2"], "--local-cluster is for --strategy parameter_server, got --strategy default"),
        (["--hparams", "[1]"], "--hparams must be a JSON object, got '[1]'"),
        (["--steps-per-execution", "3"], "--checkpoint-every (1000) must be a multiple of --steps-per-execution (3)"),
    ],
)
def test_bad_flags_name_the_flag_and_value(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(flags)
    assert message in capsys.readouterr().err


def test_unknown_hyperparameter_names_the_method():
    args = parse_args(["--method", "gc", "--hparams", '{"trust_scale": 0.1}'])
    with pytest.raises(ValueError, match=r"--method gc --hparams \{\"trust_scale\": 0.1\}"):
        build_optimizer(args)


def test_tpu_strategy_without_a_reachable_tpu_fails_clearly(monkeypatch):
    monkeypatch.delenv("TPU_NAME", raising=False)
    with pytest.raises(SystemExit, match="no TPU reachable: pass --tpu"):
        train.main(RUN_FLAGS + ["--strategy", "tpu"])
    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(SystemExit, match=f"no TPU reachable: cannot connect to --tpu grpc://127.0.0.1:{port}"):
        train.main(RUN_FLAGS + ["--strategy", "tpu", "--tpu", f"grpc://127.0.0.1:{port}"])


def test_run_writes_checkpoints_and_tensorboard_logs(uninterrupted):
    run, directory = uninterrupted
    assert run.steps == 32
    assert tf.train.latest_checkpoint(str(directory / "ckpt")).endswith("ckpt-32")
    tags = set()
    for path in (directory / "logs").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update(value.tag for value in event.summary.value)
    assert {"batch/loss", "epoch/loss", "clipping_factor/min", "epoch/test_binary_0_auc",
            "epoch/test_regression_0_rmse"} <= tags
    # Keras numbers the ranker ("ranker_3") when other tests in the process built one first.
    assert any(re.match(r"clipping_factor/ranker(_\d+)?/embedding/", tag) for tag in tags), sorted(tags)
    assert np.all(np.isfinite(run.history["loss"])) and len(run.history["loss"]) == 2


def test_resumed_run_equals_the_uninterrupted_run(uninterrupted, tmp_path):
    run, directory = uninterrupted
    flags = RUN_FLAGS + EPOCHS + ["--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "4"]
    assert train.main(flags + ["--max-steps", "21"]).steps == 21  # "preempted" in the middle of epoch 2
    resumed = train.main(flags + ["--metrics-out", str(tmp_path / "metrics.json")])
    assert resumed.steps == 32
    # The resumed run evaluates (its partial epoch 2, then the end) as the uninterrupted one did.
    assert resumed.history["test_binary_0_auc"][-1] == pytest.approx(run.history["test_binary_0_auc"][-1], abs=1e-6)
    assert_held_out_equals(tmp_path / "metrics.json", json.loads((directory / "metrics.json").read_text())["held_out"])
    for ours, theirs in zip(trainable(resumed.model), trainable(run.model)):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    for ours, theirs in zip(resumed.model.trainable_variables, run.model.trainable_variables):
        np.testing.assert_allclose(
            resumed.optimizer.accumulator(ours).numpy(), run.optimizer.accumulator(theirs).numpy(), rtol=1e-6
        )


def test_resuming_with_another_batch_size_is_refused(tmp_path):
    flags = RUN_FLAGS + ["--checkpoint-dir", str(tmp_path), "--max-steps", "1"]
    train.main(flags)
    with pytest.raises(ValueError, match=r"--batch-size 64 \(was 128\)"):
        train.main(flags + ["--batch-size", "64"])


@pytest.mark.slow
def test_mirrored_run_equals_one_device_and_restores_under_default(uninterrupted, tmp_path):
    run, _ = uninterrupted
    flags = RUN_FLAGS + EPOCHS + ["--checkpoint-dir", str(tmp_path / "ckpt")]
    saved = run_in_subprocess(tmp_path, flags + ["--strategy", "mirrored", "--virtual-cpus", "2",
                                                 "--metrics-out", str(tmp_path / "metrics.json")])
    assert int(saved["steps"]) == 32
    for ours, theirs in zip(saved_values(saved, "trainable"), trainable(run.model)):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)  # 2 replicas = one device, same global batch
    model, optimizer = restore_under_default(flags, tmp_path / "ckpt")
    for ours, theirs in zip(model.get_weights(), saved_values(saved)):
        np.testing.assert_array_equal(ours, theirs)
    slots = [v.numpy() for v in optimizer.variables()]
    assert len(slots) == sum(key.startswith("optimizer/") for key in saved)
    for i, slot in enumerate(slots):
        np.testing.assert_array_equal(slot, saved[f"optimizer/{i}"])
    # Evaluated on 2 replicas, the held-out metrics are those of the same weights evaluated on one device.
    assert_held_out_equals(tmp_path / "metrics.json", evaluate_on_test_split(model, flags))


PS_FLAGS = RUN_FLAGS + ["--epochs", "1", "--ps-min-shard-bytes", "4096"]


@pytest.fixture(scope="module")
def parameter_server_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ps")
    flags = PS_FLAGS + ["--checkpoint-dir", str(directory / "ckpt"), "--log-dir", str(directory / "logs")]
    saved = run_in_subprocess(directory, flags + ["--strategy", "parameter_server", "--local-cluster", "2,2",
                                                  "--metrics-out", str(directory / "metrics.json")])
    return saved, flags, directory


@pytest.mark.slow
def test_parameter_server_trains_sharded_tables_with_exported_factors(parameter_server_run):
    saved, _, directory = parameter_server_run
    assert int(saved["steps"]) == 16
    assert int(saved["max_shards"]) == 2  # the 1000 x 16 table (64 KB) is cut in two
    assert all(np.all(np.isfinite(w)) for w in saved_values(saved))
    tags = set()
    for path in (directory / "logs").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update(value.tag for value in event.summary.value)
    assert {"epoch/loss", "epoch/test_binary_0_auc", "epoch/test_regression_0_rmse"} <= tags


@pytest.mark.slow
def test_parameter_server_checkpoint_restores_model_weights_under_default(parameter_server_run):
    saved, flags, directory = parameter_server_run
    model, _ = restore_under_default(flags, directory / "ckpt", with_optimizer=False)
    for ours, theirs in zip(model.get_weights(), saved_values(saved)):
        np.testing.assert_array_equal(ours, theirs)
    # The chief evaluated a one-device copy of the sharded model: the restored checkpoint's numbers, exactly.
    assert_held_out_equals(directory / "metrics.json", evaluate_on_test_split(model, flags), atol=0)


@pytest.mark.slow
def test_parameter_server_checkpoint_restores_optimizer_slots_under_default(parameter_server_run):
    saved, flags, directory = parameter_server_run
    _, optimizer = restore_under_default(flags, directory / "ckpt")
    restored = [np.asarray(v.numpy()) for v in optimizer.variables()]
    assert len(restored) == len(saved_values(saved, "optimizer"))
    for ours, theirs in zip(restored, saved_values(saved, "optimizer")):
        np.testing.assert_array_equal(ours, theirs)
