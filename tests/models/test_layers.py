"""The building blocks on hand-computable numbers: embedding lookups and pooling, cross wiring, gate arithmetic."""

import numpy as np
import pytest
import tensorflow as tf

from tfrs_clippy.data.spec import DatasetSpec, FeatureSpec, TaskSpec
from tfrs_clippy_models.bottoms import CrossNetwork, MixtureOfExperts, SharedBottom
from tfrs_clippy_models.embedding import FeatureEmbedding


def _softmax(logits):
    exp = np.exp(np.asarray(logits, dtype=np.float64))
    return exp / exp.sum()


def _layer_norm(x, epsilon=1e-3):  # Keras's LayerNormalization default epsilon
    return (x - x.mean()) / np.sqrt(x.var() + epsilon)


@pytest.mark.parametrize("combiner", ["mean", "sum"])
def test_feature_embedding_looks_up_pools_normalizes_and_maps_bad_ids_to_oov(combiner):
    spec = DatasetSpec(
        features=(
            FeatureSpec("user", "categorical", vocabulary_size=3, embedding_dim=2),
            FeatureSpec("item", "categorical", vocabulary_size=4, embedding_dim=2, table="items"),
            FeatureSpec("history", "multi_hot", vocabulary_size=4, embedding_dim=2, table="items", max_length=3),
            FeatureSpec("age", "numeric", dim=1, mean=1.0, std=2.0),
        ),
        tasks=(TaskSpec("click", "binary"),),
    )
    layer = FeatureEmbedding(spec, multi_hot_combiner=combiner)
    assert sorted(layer.tables) == ["items", "user"]  # item and history share one table
    assert layer.output_dim == 2 + 2 + 2 + 1
    features = {
        "user": tf.constant([2, 7], tf.int64),  # 7 is out of range -> OOV row 0
        "item": tf.constant([-3, 3], tf.int64),  # -3 is out of range -> OOV row 0
        "history": tf.constant([[1, 3, 9], [-1, -1, -1]], tf.int64),  # 9 -> OOV row 0; -1 is padding
        "age": tf.constant([[3.0], [1.0]]),
        "unused": tf.constant([0, 0]),  # keys outside the spec are ignored
    }
    layer(features)
    # Row r of "user" is [10r, 10r + 1]; row r of "items" is [100r, 100r + 1].
    layer.tables["user"].embeddings.assign([[10.0 * r, 10.0 * r + 1] for r in range(3)])
    layer.tables["items"].embeddings.assign([[100.0 * r, 100.0 * r + 1] for r in range(4)])

    history_sum = np.array([100 + 300 + 0, 101 + 301 + 1])  # rows 1, 3 and 0 (OOV)
    history = history_sum / 3 if combiner == "mean" else history_sum
    expected = np.array(
        [
            [20, 21, 0, 1, *history, (3 - 1) / 2],
            [0, 1, 300, 301, 0, 0, (1 - 1) / 2],  # an all-padding row pools to zeros
        ]
    )
    np.testing.assert_allclose(layer(features).numpy(), expected, rtol=1e-6)


def test_feature_embedding_names_missing_features():
    spec = DatasetSpec(features=(FeatureSpec("age", "numeric"),), tasks=(TaskSpec("click", "binary"),))
    with pytest.raises(KeyError, match=r"features \['age'\] of the spec are missing"):
        FeatureEmbedding(spec)({"height": tf.zeros([2, 1])})


def test_full_rank_cross_layers_are_wired_to_x0_then_layer_normalized():
    x0 = np.array([[1.0, 2.0, -1.0, 0.5]])
    bias = np.array([1.0, 0.0, 0.0, 0.0])
    network = CrossNetwork(num_layers=2, projection_dim=None, kernel_initializer="ones")
    network(tf.constant(x0, tf.float32))
    first_kernel, first_bias = network.cross_layers[0].trainable_weights
    assert (tuple(first_kernel.shape), tuple(first_bias.shape)) == ((4, 4), (4,))
    # With all-ones kernels and zero biases every x_l would be a multiple of x0, which LayerNorm cannot tell
    # apart; a first-layer bias makes the wiring visible.
    first_bias.assign(bias)
    output = network(tf.constant(x0, tf.float32)).numpy()

    def cross(base, x, b):  # W = ones: W x is sum(x) in every entry
        return base * (x.sum() + b) + x

    x1 = cross(x0, x0, bias)
    np.testing.assert_allclose(output, _layer_norm(cross(x0, x1, 0.0)), rtol=1e-5)
    # The check can fail: crossing with the previous layer's output instead of x0 gives something else.
    assert not np.allclose(output, _layer_norm(cross(x1, x1, 0.0)), rtol=1e-2)


def test_low_rank_cross_uses_a_rank_projection_dim_kernel():
    x0 = np.array([[1.0, 2.0, -1.0, 0.5]])
    bias = np.array([1.0, 0.0, 0.0, 0.0])  # as above: keeps the output from being a multiple of x0
    network = CrossNetwork(num_layers=1, projection_dim=2, kernel_initializer="ones")
    network(tf.constant(x0, tf.float32))
    weights = {tuple(w.shape): w for w in network.cross_layers[0].trainable_weights}
    assert sorted(weights) == [(2, 4), (4,), (4, 2)]  # V, bias, U
    weights[(4,)].assign(bias)
    output = network(tf.constant(x0, tf.float32)).numpy()
    # U V with all-ones 4x2 and 2x4 factors maps x to 2 * sum(x) in every entry.
    np.testing.assert_allclose(output, _layer_norm(x0 * (2 * x0.sum() + bias) + x0), rtol=1e-5)
    assert not np.allclose(output, _layer_norm(x0 * (x0.sum() + bias) + x0), rtol=1e-2)  # the full-rank answer


def test_shared_bottom_gives_every_task_the_same_mlp_output():
    bottom = SharedBottom([3], ["a", "b"], activation="relu", kernel_initializer="ones")
    outputs, gates = bottom(tf.constant([[1.0, -2.0]]))
    assert gates == {} and bottom.gate_expert_names == {}
    for output in outputs:
        np.testing.assert_array_equal(output.numpy(), [[0.0, 0.0, 0.0]])  # relu(1 - 2)


def test_mmoe_mixes_experts_with_per_task_softmax_gates():
    mmoe = MixtureOfExperts(
        [1], ["a", "b"], num_shared_experts=2, num_task_experts=0, num_levels=1,
        activation="relu", kernel_initializer="ones",
    )
    x = tf.constant([[1.0, 2.0]])
    mmoe(x)
    mmoe.shared_experts[0][1].layers[0].kernel.assign([[2.0], [2.0]])  # expert1(x) = relu(2 + 4) = 6
    mmoe.task_gates[0]["a"].kernel.assign([[1.0, 0.0], [1.0, 0.0]])  # gate a logits = [3, 0]
    (out_a, out_b), gates = mmoe(x)

    assert mmoe.gate_expert_names == {"a": ["expert0", "expert1"], "b": ["expert0", "expert1"]}
    gate_a = _softmax([3.0, 0.0])
    np.testing.assert_allclose(gates["a"].numpy(), [gate_a], rtol=1e-6)
    np.testing.assert_allclose(gates["b"].numpy(), [[0.5, 0.5]], rtol=1e-6)  # all-ones gate: equal logits
    np.testing.assert_allclose(out_a.numpy(), [[gate_a[0] * 3 + gate_a[1] * 6]], rtol=1e-6)
    np.testing.assert_allclose(out_b.numpy(), [[0.5 * 3 + 0.5 * 6]], rtol=1e-6)


def test_two_level_ple_routes_task_and_shared_paths():
    ple = MixtureOfExperts(
        [1], ["a", "b"], num_shared_experts=1, num_task_experts=1, num_levels=2,
        activation="relu", kernel_initializer="ones",
    )
    x = tf.constant([[1.0, 2.0]])
    ple(x)
    ple.task_experts[0]["b"][0].layers[0].kernel.assign([[2.0], [2.0]])  # level-0 b expert: 6; others 3
    ple.task_gates[1]["a"].kernel.assign([[1.0, 0.0]])  # level-1 gate a, on its 1-d input 3: logits [3, 0]
    (out_a, out_b), gates = ple(x)

    # Level 0 (all-ones gates: equal weights): a's mixture (3 + 3) / 2 = 3, b's (6 + 3) / 2 = 4.5, and the
    # shared gate's mixture of all three experts (3 + 6 + 3) / 3 = 4 feeds the level-1 shared expert.
    # Level 1 (1-unit ones experts on those inputs): a-specific 3, b-specific 4.5, shared 4.
    gate_a = _softmax([3.0, 0.0])  # over [a-specific, shared]
    assert ple.gate_expert_names["a"] == ["specific0", "shared0"]
    np.testing.assert_allclose(gates["a"].numpy(), [gate_a], rtol=1e-6)
    np.testing.assert_allclose(out_a.numpy(), [[gate_a[0] * 3 + gate_a[1] * 4]], rtol=1e-6)
    np.testing.assert_allclose(out_b.numpy(), [[(4.5 + 4) / 2]], rtol=1e-6)
    assert len(ple.shared_gates) == 1  # no shared gate after the last level
