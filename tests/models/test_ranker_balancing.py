"""The Ranker with `multitask_balancing`: fits per backbone, shared variables, config, TensorBoard, a 1M-row table."""

import glob

import numpy as np
import pytest
import tensorflow as tf

import tfrs_clippy
import tfrs_clippy_models as models
from tfrs_clippy.data.spec import DatasetSpec, FeatureSpec, TaskSpec
from tfrs_clippy.keras_runtime import keras
from tfrs_clippy.multitask import BalancingConfig
from tfrs_clippy_models import RankerConfig

SMALL = {"bottom_units": (16, 8), "tower_units": (8,), "num_experts": 2}


def _fit(model, dataset, optimizer, **kwargs):
    model.compile(optimizer=optimizer)
    return model.fit(dataset, verbose=0, **kwargs)


OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(3e-3),
    "clippy": lambda: tfrs_clippy.ClippyAdagrad.from_paper(0.1),
    "clippy_adam": lambda: tfrs_clippy.ClippyAdam(3e-3),
}


@pytest.mark.parametrize("bottom", ["shared_bottom", "mmoe", "ple"])
@pytest.mark.parametrize(
    "optimizer, clip", [("adam", "per_task"), ("clippy", "per_task"), ("clippy_adam", "per_task"),
                        ("clippy", "combined"), ("clippy_adam", "combined")]
)
def test_fit_with_pub_per_backbone(tiny_spec, make_batch, bottom, optimizer, clip):
    keras.utils.set_random_seed(0)
    balancing = {"method": "pub", "clip": clip}
    model = models.build_ranker(tiny_spec, RankerConfig(bottom=bottom, multitask_balancing=balancing, **SMALL))
    features, labels = make_batch(tiny_spec, size=256)
    dataset = tf.data.Dataset.from_tensor_slices((features, labels)).batch(32)
    history = _fit(model, dataset, OPTIMIZERS[optimizer](), epochs=6).history
    assert history["weight_click"][-1] + history["weight_rating"][-1] == pytest.approx(2.0, rel=1e-5)
    assert -1.0 <= history["cosine_click_rating"][-1] <= 1.0
    assert history["loss"][-1] < history["loss"][0], history["loss"]
    assert all(np.isfinite(history[key][-1]) for key in ("click_auc", "rating_rmse", "loss"))


def _mlp_parameters(inputs: int, units: tuple) -> int:
    widths = (inputs, *units)
    return sum(i * o + o for i, o in zip(widths[:-1], widths[1:]))


@pytest.mark.parametrize("bottom, shared_mlps", [("shared_bottom", 1), ("mmoe", 2), ("ple", 2)])
def test_shared_variables_follow_the_model_structure(tiny_spec, bottom, shared_mlps):
    """Shared: the tables and the shared MLPs (the bottom; MMoE's 2 experts; PLE's 2 shared experts); not gates,
    PLE's task experts or towers."""
    model = models.build_ranker(tiny_spec, RankerConfig(bottom=bottom, multitask_balancing="pub", **SMALL))
    shared_ids = {id(v) for v in model.shared_trainable_variables}
    specific_ids = {id(v) for v in model.task_specific_trainable_variables}
    assert not shared_ids & specific_ids and shared_ids | specific_ids == {id(v) for v in model.trainable_variables}
    shared_parameters = sum(v.shape.num_elements() for v in model.shared_trainable_variables)
    embedding_parameters = 10 * 4 + 20 * 4
    assert shared_parameters == embedding_parameters + shared_mlps * _mlp_parameters(14, (16, 8))


def test_ple_with_two_levels_shares_the_shared_gate(tiny_spec):
    config = RankerConfig(bottom="ple", num_levels=2, multitask_balancing="pub", **SMALL)
    shared = {v.name for v in models.build_ranker(tiny_spec, config).shared_trainable_variables}
    assert any("gate_shared" in name for name in shared)


def test_config_serializes_the_balancing_options(tmp_path, tiny_spec):
    balancing = {"method": "pub", "alpha_scaling": "nash", "clip": "combined"}
    config = RankerConfig(bottom="mmoe", multitask_balancing=balancing)
    assert config.multitask_balancing == BalancingConfig(method="pub", alpha_scaling="nash", clip="combined")
    assert RankerConfig.from_dict(config.to_dict()) == config
    path = tmp_path / "config.yaml"
    path.write_text("preset: small\nbottom: ple\nmultitask_balancing: pub\n")
    assert RankerConfig.load(path).multitask_balancing == BalancingConfig(method="pub")
    assert RankerConfig().multitask_balancing is None
    model = models.build_ranker(tiny_spec, config)
    restored = models.Ranker.from_config(model.get_config())
    assert restored.ranker_config == config and restored.balancer.balancing == config.multitask_balancing


def test_invalid_balancing_names_the_field():
    with pytest.raises(ValueError, match="invalid `multitask_balancing`.*`method` must be one of"):
        RankerConfig(multitask_balancing="gradnorm")


def test_weights_and_cosines_reach_tensorboard(tmp_path, tiny_spec, make_batch):
    # Keras 2's TensorBoard callback writes only epoch scalars of the logs; the balancer writes its own scalars
    # "multitask/<name>" to the callback's writer at every step (update_freq=1).
    model = models.build_ranker(tiny_spec, RankerConfig(bottom="mmoe", multitask_balancing="pub", **SMALL))
    features, labels = make_batch(tiny_spec, size=96)
    dataset = tf.data.Dataset.from_tensor_slices((features, labels)).batch(32)
    _fit(model, dataset, keras.optimizers.Adam(0.01), callbacks=[keras.callbacks.TensorBoard(tmp_path, update_freq=1)])
    steps_by_tag = {}
    for path in glob.glob(str(tmp_path / "train" / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                steps_by_tag.setdefault(value.tag, set()).add(event.step)
    for tag in ("epoch_weight_click", "epoch_weight_rating", "epoch_cosine_click_rating"):
        assert len(steps_by_tag.get(tag, ())) == 1, sorted(steps_by_tag)
    for tag in ("multitask/weight_click", "multitask/weight_rating", "multitask/cosine_click_rating"):
        assert steps_by_tag.get(tag) == {1, 2, 3}, sorted(steps_by_tag)


@pytest.mark.slow
@pytest.mark.parametrize(
    "make_optimizer",
    [lambda: tfrs_clippy.ClippyAdagrad.from_paper(0.1), lambda: tfrs_clippy.ClippyAdam(0.01, clipping_axis=0)],
    ids=["clippy_adagrad", "clippy_adam"],
)
def test_a_million_row_table_trains_sparsely_with_three_tasks(make_optimizer):
    rows, dim = 1_000_000, 8
    spec = DatasetSpec(
        features=(
            FeatureSpec("item", "categorical", vocabulary_size=rows, embedding_dim=dim),
            FeatureSpec("user", "categorical", vocabulary_size=100, embedding_dim=4),
        ),
        tasks=(TaskSpec("click", "binary"), TaskSpec("like", "binary"), TaskSpec("watch", "regression")),
    )
    model = models.build_ranker(spec, RankerConfig(bottom="mmoe", multitask_balancing="pub", **SMALL))
    model.optimizer = make_optimizer()
    rng = np.random.default_rng(0)
    batch = (
        {"item": tf.constant(rng.integers(0, rows, 256)), "user": tf.constant(rng.integers(0, 100, 256))},
        {name: tf.constant(rng.integers(0, 2, 256).astype(np.float32)) for name in ("click", "like", "watch")},
    )
    step = tf.function(model.train_step)
    graph = step.get_concrete_function(batch).graph
    # No tensor the size of the table: neither a gradient, a candidate update, nor a read of the whole table.
    table_sized = [
        (op.type, op.name)
        for op in graph.get_operations()
        for output in op.outputs
        if output.dtype != tf.resource and output.shape.rank and output.shape[0] == rows
    ]
    assert not table_sized, table_sized[:10]
    table = model.embedding.tables["item"].embeddings
    before = table.numpy()
    for _ in range(3):
        logs = step(batch)
    touched = np.unique(batch[0]["item"].numpy())
    changed = np.flatnonzero(np.any(table.numpy() != before, axis=1))
    assert set(changed) <= set(touched) and len(changed) > 0.9 * len(touched)
    assert np.isclose(sum(float(logs[f"weight_{task}"]) for task in ("click", "like", "watch")), 3.0, rtol=1e-5)
