"""From a `DatasetSpec`'s features to one input vector: embeddings, pooled multi-hot embeddings, normalized numerics.

Input conventions are those of `tfrs_clippy.data.spec`. The layer is defensive about ids: a categorical id outside
[0, vocabulary_size) is looked up as the out-of-vocabulary bucket 0; in a multi-hot feature a negative id is
padding (the convention pads with -1) and an id >= vocabulary_size is the OOV bucket.
"""

from __future__ import annotations

import tensorflow as tf

from tfrs_clippy.data.spec import DatasetSpec, FeatureSpec
from tfrs_clippy.keras_runtime import keras


class FeatureEmbedding(keras.layers.Layer):
    """Embeds, pools and normalizes the features of a spec and concatenates them, in the spec's feature order."""

    def __init__(self, spec: DatasetSpec, multi_hot_combiner: str = "mean", **kwargs) -> None:
        """Creates one embedding table per table name of the spec.

        Args:
            spec: The features to embed; features naming the same `table` share one table.
            multi_hot_combiner: "mean" or "sum" of a multi-hot feature's non-padding embeddings.
            **kwargs: Passed to the Keras layer.
        """
        super().__init__(**kwargs)
        self._features = spec.features
        self._multi_hot_combiner = multi_hot_combiner
        self.tables: dict[str, keras.layers.Embedding] = {}
        for feature in spec.features:
            if feature.kind != "numeric" and feature.table_name not in self.tables:
                self.tables[feature.table_name] = keras.layers.Embedding(
                    feature.vocabulary_size, feature.embedding_dim, name=f"table_{feature.table_name}"
                )

    @property
    def output_dim(self) -> int:
        """Width of the concatenated output vector."""
        return sum(f.dim if f.kind == "numeric" else f.embedding_dim for f in self._features)

    def call(self, features: dict[str, tf.Tensor]) -> tf.Tensor:
        """Returns the [batch, output_dim] float32 input vector of `features` (keys not in the spec are ignored)."""
        missing = [f.name for f in self._features if f.name not in features]
        if missing:
            raise KeyError(f"FeatureEmbedding: features {missing} of the spec are missing; got {sorted(features)}.")
        return tf.concat([self._embed(feature, features[feature.name]) for feature in self._features], axis=1)

    def _embed(self, feature: FeatureSpec, values: tf.Tensor) -> tf.Tensor:
        if feature.kind == "numeric":
            values = tf.reshape(tf.cast(values, tf.float32), [-1, feature.dim])
            return (values - feature.mean) / feature.std
        table = self.tables[feature.table_name]
        ids = tf.cast(values, tf.int64)
        in_vocabulary = ids < feature.vocabulary_size
        if feature.kind == "categorical":
            ids = tf.reshape(ids, [-1])
            return table(tf.where(in_vocabulary & (ids >= 0), ids, tf.zeros_like(ids)))
        ids = tf.reshape(ids, [-1, feature.max_length])
        in_vocabulary = tf.reshape(in_vocabulary, [-1, feature.max_length])
        present = tf.cast(ids >= 0, tf.float32)
        embeddings = table(tf.where(in_vocabulary & (ids >= 0), ids, tf.zeros_like(ids)))
        pooled = tf.reduce_sum(embeddings * present[:, :, tf.newaxis], axis=1)
        if self._multi_hot_combiner == "sum":
            return pooled
        # An all-padding row pools to zeros rather than 0 / 0.
        return pooled / tf.maximum(tf.reduce_sum(present, axis=1, keepdims=True), 1.0)


def feature_signature(spec: DatasetSpec) -> dict[str, tf.TensorSpec]:
    """The TensorSpecs of a batch of raw features, as the data conventions define them."""
    signature = {}
    for feature in spec.features:
        if feature.kind == "categorical":
            signature[feature.name] = tf.TensorSpec([None], tf.int64, name=feature.name)
        elif feature.kind == "multi_hot":
            signature[feature.name] = tf.TensorSpec([None, feature.max_length], tf.int64, name=feature.name)
        else:
            signature[feature.name] = tf.TensorSpec([None, feature.dim], tf.float32, name=feature.name)
    return signature


def placeholder_features(spec: DatasetSpec, batch_size: int = 1) -> dict[str, tf.Tensor]:
    """A batch of all-zero features matching `feature_signature(spec)`: enough to build a model's variables."""
    return {
        name: tf.zeros([batch_size] + tensor_spec.shape.as_list()[1:], tensor_spec.dtype)
        for name, tensor_spec in feature_signature(spec).items()
    }

