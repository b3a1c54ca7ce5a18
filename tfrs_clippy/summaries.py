"""TensorBoard scalars without the `tensorboard` package (not a dependency of this project).

`tf.summary.scalar` is implemented by tensorboard and raises when it is not installed; the underlying
`tf.summary.write` is TensorFlow's own. Tagging the summary for the "scalars" plugin, as tensorboard's own scalar
summary does, makes TensorBoard show it as a scalar.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.core.framework import summary_pb2

_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
).SerializeToString()


def write_scalar(name: str, value: float, step: int) -> None:
    """Writes one float32 scalar to the default summary writer (set with `writer.as_default()`)."""
    tf.summary.write(name, tf.constant(value, tf.float32), step=step, metadata=_SCALAR_METADATA)
