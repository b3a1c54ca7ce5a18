"""Whether the graph being traced will be compiled by XLA (`jit_compile=True`).

Code that runs both with and without XLA asks this when it traces: XLA needs static shapes (so a result may keep
padding rows that would otherwise be cut off) and cannot compile some ops (summary writes, for one). One test, in
one place, instead of a copy per caller.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.python.ops import control_flow_util  # pylint: disable=g-direct-tensorflow-import


def in_xla_context() -> bool:
    """Whether the graph being traced (or one it is nested in) is compiled by XLA; False eagerly.

    A `tf.function(jit_compile=True)`, or Keras's `jit_compile=True` train function, marks its graph with an XLA
    control-flow context, which the functions it calls inherit; TensorFlow has no public API for it.
    """
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
