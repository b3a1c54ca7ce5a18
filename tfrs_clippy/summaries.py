"""TensorBoard scalars without the `tensorboard` package (not a dependency of this project), and their tags.

The one helper this package writes TensorBoard scalars with: the stability callbacks (eagerly, to their own
writer) and `multitask.MultitaskBalancer` (inside the traced train step, to the default writer of Keras's
TensorBoard callback).

`tf.summary.scalar` is implemented by tensorboard and raises when it is not installed; the underlying
`tf.summary.write` is TensorFlow's own. Tagging the summary for the "scalars" plugin with the scalar data class, as
tensorboard's own scalar summary does, makes TensorBoard show it as a scalar.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import tensorflow as tf
from tensorflow.core.framework import summary_pb2

from tfrs_clippy.xla_context import in_xla_context

SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
    data_class=summary_pb2.DATA_CLASS_SCALAR,
)
"""What marks a `tf.summary.write` as a TensorBoard scalar."""


def summary_tag(name: str, prefix: str = "") -> str:
    """`prefix` + `name` as a summary tag: a variable name without its ":0" (Keras 2), other characters as "_".

    Summary tags allow only letters, digits and "_./-".
    """
    return prefix + re.sub(r"[^A-Za-z0-9_./-]", "_", name.split(":")[0])


def _scalar_tensor(value: Any) -> tf.Tensor:
    """A tensor as it is (a traced train step's value); a Python or NumPy number as a float32 constant."""
    return value if tf.is_tensor(value) else tf.constant(value, tf.float32)


def write_scalar(name: str, value: Any, step: Any) -> None:
    """Writes one scalar to the default summary writer (set with `writer.as_default()`), if there is one."""
    tf.summary.write(name, _scalar_tensor(value), step=step, metadata=SCALAR_METADATA)


def write_scalars(scalars: Mapping[str, Any], step: Any, prefix: str = "") -> None:
    """Writes each `{name: value}` as the scalar `prefix` + name at `step` to the default summary writer.

    Nothing is written under XLA, which cannot compile summary ops: a train step compiled with `jit_compile=True`
    still runs, without its scalars.
    """
    if in_xla_context():
        return
    for name, value in scalars.items():
        write_scalar(prefix + name, value, step)
