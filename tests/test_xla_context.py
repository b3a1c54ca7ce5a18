"""`in_xla_context`: True while tracing a function XLA compiles (and what it calls), False elsewhere."""

import tensorflow as tf

from tfrs_clippy.xla_context import in_xla_context


def _traced_answers(function_kwargs: dict) -> list[bool]:
    """What `in_xla_context` answers while tracing a tf.function made with `function_kwargs`."""
    answers = []

    def nested():
        answers.append(in_xla_context())
        return tf.constant(0.0)

    @tf.function(**function_kwargs)
    def outer(x):
        answers.append(in_xla_context())
        return x + tf.function(nested)()

    outer(tf.constant(1.0))
    return answers


def test_true_inside_a_jit_compiled_function_and_the_functions_it_calls():
    assert _traced_answers({"jit_compile": True}) == [True, True]


def test_false_in_a_plain_function():
    assert _traced_answers({}) == [False, False]
    assert _traced_answers({"jit_compile": False}) == [False, False]


def test_false_eagerly():
    assert tf.executing_eagerly()
    assert in_xla_context() is False


def test_false_eagerly_after_an_xla_trace():
    _traced_answers({"jit_compile": True})
    assert in_xla_context() is False
