"""The Ranker: shapes, parameter counts per preset, training, loss arithmetic, masks and weights, export, config."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import tfrs_clippy
import tfrs_clippy_models as models
from tfrs_clippy.keras_runtime import keras
from tfrs_clippy_models import RankerConfig

TINY_WIDTH = 14  # the tiny spec's input width: 4 + 4 + 4 + 2
TINY_EMBEDDING_PARAMETERS = 10 * 4 + 20 * 4  # the user table, and the item table that "history" shares
SMALL = {"bottom_units": (16, 8), "tower_units": (8,), "num_experts": 2}


def _dense(inputs: int, units: int) -> int:
    return inputs * units + units


def _mlp(inputs: int, units: tuple) -> int:
    widths = (inputs, *units)
    return sum(_dense(i, o) for i, o in zip(widths[:-1], widths[1:]))


def _towers(inputs: int, units: tuple, num_tasks: int = 2) -> int:
    return num_tasks * (_mlp(inputs, units) + _dense(units[-1] if units else inputs, 1))


def _cross(width: int, layers: int, rank: int | None = None) -> int:
    per_layer = _dense(width, width) if rank is None else width * rank + _dense(rank, width)
    return layers * per_layer + 2 * width  # + LayerNorm's gamma and beta


def _reference_loss(model, features, labels, sample_weight=None):
    """The documented loss in numpy: per task sum(w * loss) / labeled count, then the task-weighted sum."""
    logits, _ = model.logits_and_gates(features)
    total, per_task = 0.0, {}
    for task in model.dataset_spec.tasks:
        z = logits[task.name].numpy().astype(np.float64)
        y = np.asarray(labels[task.label_key], np.float64)
        labeled = ~np.isnan(y) & (np.asarray(labels.get(f"{task.label_key}_mask", np.ones_like(y))) > 0)
        y = np.where(labeled, y, 0.0)
        if task.kind == "binary":
            losses = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
        else:
            losses = (z - y) ** 2
        weight = labeled * (1.0 if sample_weight is None else np.asarray(sample_weight[task.name], np.float64))
        per_task[task.name] = (weight * losses).sum() / labeled.sum()
        total += model.task_weight(task) * per_task[task.name]
    return total, per_task


@pytest.fixture
def tiny_ranker(tiny_spec):
    keras.utils.set_random_seed(0)
    return models.build_ranker(tiny_spec, RankerConfig(bottom="mmoe", **SMALL))


@pytest.mark.parametrize(
    "config",
    [
        RankerConfig(**SMALL),
        RankerConfig(bottom="mmoe", **SMALL),
        RankerConfig(bottom="ple", num_levels=2, **SMALL),
        RankerConfig(bottom="ple", cross_layers=2, cross_placement="parallel", **SMALL),
    ],
    ids=["shared_bottom", "mmoe", "ple", "ple_parallel_cross"],
)
def test_predictions_are_one_per_task_with_batch_shape(tiny_spec, make_batch, config):
    model = models.build_ranker(tiny_spec, config)
    features, _ = make_batch(tiny_spec, size=5)
    predictions = model(features)
    assert sorted(predictions) == ["click", "rating"]
    assert predictions["click"].shape == predictions["rating"].shape == (5,)
    assert np.all((predictions["click"].numpy() > 0) & (predictions["click"].numpy() < 1))  # a probability


@pytest.mark.parametrize(
    "config, non_embedding",
    [
        (RankerConfig.preset("small", scale=1 / 8), _mlp(TINY_WIDTH, (64, 64)) + _towers(64, (32,))),
        (RankerConfig.preset("large", scale=1 / 8), _mlp(TINY_WIDTH, (512,) * 4) + _towers(512, (32,))),
        (
            RankerConfig.preset("large_dcn", scale=1 / 8),
            _cross(TINY_WIDTH, 1) + _mlp(TINY_WIDTH, (512,) * 4) + _towers(512, (32,)),
        ),
        (
            RankerConfig(bottom="mmoe", bottom_units=(16, 8), tower_units=(), num_experts=3),
            3 * _mlp(TINY_WIDTH, (16, 8)) + 2 * _dense(TINY_WIDTH, 3) + _towers(8, ()),
        ),
        (
            # Two levels of 1 shared + 1 expert per task (3 experts a level); the second level reads 8-wide inputs.
            RankerConfig(bottom="ple", bottom_units=(16, 8), tower_units=(4,), num_experts=1, num_levels=2),
            3 * _mlp(TINY_WIDTH, (16, 8)) + 2 * _dense(TINY_WIDTH, 2) + _dense(TINY_WIDTH, 3)
            + 3 * _mlp(8, (16, 8)) + 2 * _dense(8, 2) + _towers(8, (4,)),
        ),
        (
            RankerConfig(bottom_units=(16, 8), tower_units=(4,), cross_layers=2, cross_projection_dim=3),
            _cross(TINY_WIDTH, 2, rank=3) + _mlp(TINY_WIDTH, (16, 8)) + _towers(8, (4,)),
        ),
        (
            RankerConfig(bottom_units=(16, 8), tower_units=(4,), cross_layers=1, cross_placement="parallel"),
            _cross(TINY_WIDTH, 1) + _mlp(TINY_WIDTH, (16, 8)) + _towers(8 + TINY_WIDTH, (4,)),
        ),
    ],
    ids=["small/8", "large/8", "large_dcn/8", "mmoe", "ple_2_levels", "low_rank_cross", "parallel_cross"],
)
def test_parameter_counts_match_the_layer_arithmetic(tiny_spec, config, non_embedding):
    model = models.build_ranker(tiny_spec, config)
    assert model.embedding.output_dim == TINY_WIDTH
    assert model.parameter_counts() == models.ParameterCounts(TINY_EMBEDDING_PARAMETERS, non_embedding)


@pytest.mark.slow
def test_full_size_presets_have_the_papers_widths(tiny_spec):
    expected = {
        "small": _mlp(TINY_WIDTH, (512, 512)) + _towers(512, (256,)),
        "large": _mlp(TINY_WIDTH, (4096,) * 4) + _towers(4096, (256,)),
        "large_dcn": _cross(TINY_WIDTH, 1) + _mlp(TINY_WIDTH, (4096,) * 4) + _towers(4096, (256,)),
    }
    for preset, non_embedding in expected.items():
        model = models.build_ranker(tiny_spec, preset)
        assert model.parameter_counts().non_embedding == non_embedding, preset
        del model
        keras.backend.clear_session()


@pytest.mark.parametrize("optimizer", ["adagrad", "clippy_adagrad"])
@pytest.mark.parametrize("bottom", ["shared_bottom", "mmoe", "ple"])
def test_a_few_fit_steps_train_every_bottom(tiny_spec, make_batch, bottom, optimizer):
    keras.utils.set_random_seed(1)
    config = RankerConfig(bottom=bottom, num_levels=2, cross_layers=1, **SMALL)
    model = models.build_ranker(tiny_spec, config)
    before = [variable.numpy().copy() for variable in model.trainable_variables]
    optimizers = {
        "adagrad": lambda: keras.optimizers.Adagrad(learning_rate=0.1),
        "clippy_adagrad": lambda: tfrs_clippy.ClippyAdagrad(learning_rate=0.1),
    }
    model.compile(optimizer=optimizers[optimizer]())
    features, labels = make_batch(tiny_spec, size=96)
    history = model.fit(
        tf.data.Dataset.from_tensor_slices((features, labels)).batch(32), epochs=3, verbose=0
    ).history

    assert np.all(np.isfinite(history["loss"]))
    assert history["loss"][-1] < history["loss"][0]
    unchanged = [v.name for v, old in zip(model.trainable_variables, before) if np.array_equal(v.numpy(), old)]
    assert unchanged == []
    assert {"click_loss", "click_auc", "rating_loss", "rating_rmse"} <= set(history)
    gate_keys = {task: [key for key in history if key.startswith(f"gate_{task}_")] for task in ("click", "rating")}
    for task, keys in gate_keys.items():
        assert len(keys) == {"shared_bottom": 0, "mmoe": 2, "ple": 3}[bottom]
        if keys:  # every example's gate weights sum to 1, so their means do too
            np.testing.assert_allclose(sum(history[key][-1] for key in keys), 1.0, rtol=1e-5)


def test_loss_is_the_task_weighted_sum_with_sample_weights(tiny_spec, make_batch):
    model = models.build_ranker(tiny_spec, RankerConfig(task_weights={"click": 3.0}, **SMALL))
    features, labels = make_batch(tiny_spec, size=16)
    expected, _ = _reference_loss(model, features, labels)
    np.testing.assert_allclose(model.compute_loss((features, labels)).numpy(), expected, rtol=1e-5)

    weights = np.linspace(0.0, 2.0, 16).astype(np.float32)
    per_task = {"click": weights, "rating": np.ones(16, np.float32)}
    expected, _ = _reference_loss(model, features, labels, per_task)
    np.testing.assert_allclose(model.compute_loss((features, labels, per_task)).numpy(), expected, rtol=1e-5)
    # A dict naming one task leaves the other at weight 1.
    np.testing.assert_allclose(model.compute_loss((features, labels, {"click": weights})).numpy(), expected, rtol=1e-5)
    # A tensor weighs every task.
    expected, _ = _reference_loss(model, features, labels, {"click": weights, "rating": weights})
    np.testing.assert_allclose(model.compute_loss((features, labels, weights)).numpy(), expected, rtol=1e-5)


def test_masked_labels_change_neither_loss_nor_metrics(tiny_ranker, tiny_spec, make_batch):
    features, labels = make_batch(tiny_spec, size=16)
    click_labeled = np.arange(16) >= 4
    rating_labeled = (np.arange(16) < 2) | (np.arange(16) > 6)

    def masked(garbage: float) -> dict:
        return {
            "click": np.where(click_labeled, labels["click"], np.nan).astype(np.float32),
            "rating": np.where(rating_labeled, labels["rating"], garbage).astype(np.float32),
            "rating_mask": rating_labeled.astype(np.float32),
        }

    tiny_ranker.reset_metrics()
    loss = tiny_ranker.compute_loss((features, masked(garbage=1e6))).numpy()
    logs = {metric.name: metric.result().numpy() for metric in tiny_ranker.metrics}
    assert np.isfinite(loss)
    assert loss == tiny_ranker.compute_loss((features, masked(garbage=-3.0))).numpy()
    expected, expected_per_task = _reference_loss(tiny_ranker, features, masked(garbage=0.0))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(logs["click_loss"], expected_per_task["click"], rtol=1e-5)

    # The metrics see only the labeled examples.
    predictions = tiny_ranker(features)
    auc = keras.metrics.AUC()
    auc.update_state(labels["click"][click_labeled], predictions["click"].numpy()[click_labeled])
    np.testing.assert_allclose(logs["click_auc"], auc.result().numpy(), rtol=1e-5)
    rating_errors = predictions["rating"].numpy()[rating_labeled] - labels["rating"][rating_labeled]
    np.testing.assert_allclose(logs["rating_rmse"], np.sqrt(np.mean(rating_errors**2)), rtol=1e-5)


def test_a_batch_without_any_label_for_a_task_adds_zero_loss(tiny_ranker, tiny_spec, make_batch):
    features, labels = make_batch(tiny_spec, size=8)
    no_ratings = {**labels, "rating": np.full(8, np.nan, np.float32)}
    _, per_task = _reference_loss(tiny_ranker, features, labels)
    np.testing.assert_allclose(
        tiny_ranker.compute_loss((features, no_ratings)).numpy(), per_task["click"], rtol=1e-5
    )


def test_a_missing_label_or_bad_inputs_are_clear_errors(tiny_ranker, tiny_spec, make_batch):
    features, labels = make_batch(tiny_spec, size=4)
    with pytest.raises(ValueError, match=r"task 'rating' needs the label 'rating', but the labels have only"):
        tiny_ranker.compute_loss((features, {"click": labels["click"]}))
    with pytest.raises(ValueError, match=r"inputs must be \(features, labels\)"):
        tiny_ranker.compute_loss(features)


def test_exported_savedmodel_serves_raw_features_with_identical_predictions(tiny_spec, make_batch, tmp_path):
    model = models.build_ranker(tiny_spec, RankerConfig(bottom="ple", cross_layers=1, **SMALL))
    features, _ = make_batch(tiny_spec, size=7)
    model.export(str(tmp_path / "ranker"))
    serve = tf.saved_model.load(str(tmp_path / "ranker")).signatures["serving_default"]
    raw = {name: tf.constant(value) for name, value in features.items()}
    reloaded = serve(**raw)
    original = model.serving_function()(raw)
    assert sorted(reloaded) == ["click", "rating"]
    for task in ("click", "rating"):
        np.testing.assert_array_equal(reloaded[task].numpy(), original[task].numpy())
        # Eager execution may round differently from the graph in the last bits.
        np.testing.assert_allclose(reloaded[task].numpy(), model(raw)[task].numpy(), rtol=1e-5, atol=1e-6)


def test_get_config_rebuilds_an_equal_model_that_loads_the_weights(tiny_ranker, tiny_spec, make_batch, tmp_path):
    config = tiny_ranker.get_config()
    assert json.loads(json.dumps(config)) == config
    clone = models.Ranker.from_config(config)
    assert clone.get_config() == config
    assert clone.parameter_counts() == tiny_ranker.parameter_counts()
    features, _ = make_batch(tiny_spec, size=6)
    tiny_ranker.save_weights(str(tmp_path / "weights"))
    clone.load_weights(str(tmp_path / "weights"))
    for task, prediction in tiny_ranker(features).items():
        np.testing.assert_array_equal(clone(features)[task].numpy(), prediction.numpy())


_MIRRORED_SCRIPT = """
import json, sys
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import tfrs_clippy_models as models
from tfrs_clippy.data.spec import DatasetSpec
from tfrs_clippy.keras_runtime import keras

spec = DatasetSpec.from_dict(json.loads(sys.argv[1]))
features, labels = (json.loads(sys.argv[2]), json.loads(sys.argv[3]))
features = {k: np.asarray(v, np.float32 if k == "age" else np.int64) for k, v in features.items()}
labels = {k: np.asarray(v, np.float32) for k, v in labels.items()}
config = models.RankerConfig(bottom="mmoe", bottom_units=(16, 8), tower_units=(8,), num_experts=2)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    mirrored = models.build_ranker(spec, config)
    mirrored.compile(optimizer=keras.optimizers.Adagrad(0.1))
single = models.build_ranker(spec, config)
single.set_weights(mirrored.get_weights())
dataset = tf.data.Dataset.from_tensor_slices((features, labels)).batch(len(labels["click"]))
batch = next(iter(strategy.experimental_distribute_dataset(dataset)))
per_replica = strategy.run(lambda b: mirrored.compute_loss(b), args=(batch,))
history = mirrored.fit(dataset, epochs=2, verbose=0).history
print(json.dumps({
    "replicas": strategy.num_replicas_in_sync,
    "summed": float(strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)),
    "single": float(single.compute_loss((features, labels))),
    "fit_losses": [float(x) for x in history["loss"]],
}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("masked", [False, True])
def test_replica_losses_sum_to_the_single_device_loss_under_mirrored_strategy(tiny_spec, make_batch, masked):
    # Virtual devices must be set up before TensorFlow initializes, hence a fresh process.
    features, labels = make_batch(tiny_spec, size=16)  # 8 examples a replica
    if masked:  # replica 0 then has 3 labeled clicks, replica 1 has 8: the mean of means is not the mean
        labels = {key: np.array(value, np.float32) for key, value in labels.items()}
        labels["click"][:5] = np.nan
    args = [json.dumps(x, default=lambda a: a.tolist()) for x in (tiny_spec.to_dict(), features, labels)]
    result = subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT, *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["replicas"] == 2
    np.testing.assert_allclose(outcome["summed"], outcome["single"], rtol=1e-5)
    assert np.all(np.isfinite(outcome["fit_losses"]))
