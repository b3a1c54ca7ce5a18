"""Ids for synthetic data: Zipf-distributed draws over any vocabulary, and a hash of ids into a few buckets."""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

ZIPF_HEAD = 1024
"""The most popular ids, which the Zipf sampler draws exactly."""

_HASH_MULTIPLIER = 2654435761
"""Knuth's multiplicative hash constant, close to 2**32 / golden ratio; an id < 2**31 times it fits in int64."""


def power_law_integral(low: float, high: float, exponent: float) -> float:
    """The integral of x ** -exponent from low to high."""
    if abs(exponent - 1.0) < 1e-9:
        return math.log(high / low)
    return (high ** (1.0 - exponent) - low ** (1.0 - exponent)) / (1.0 - exponent)


class ZipfSampler:
    """Draws ids k in [1, vocabulary_size) with P(k) proportional to k ** -exponent, in O(1) memory per draw.

    The `ZIPF_HEAD` most popular ids are drawn exactly, by searching their cumulative distribution. Beyond them,
    the mass of id k is taken as the integral of x ** -s over [k - 1/2, k + 1/2) (relative error below s(s+1)/(24
    k^2) < 1e-6 there), so an id is the rounded draw of a continuous power law, by inverting its CDF.
    """

    def __init__(self, vocabulary_size: int, exponent: float) -> None:
        self.exponent = exponent
        self.head = min(ZIPF_HEAD, vocabulary_size - 1)
        head_mass = np.arange(1, self.head + 1, dtype=np.float64) ** -exponent
        self.tail_low, self.tail_high = self.head + 0.5, vocabulary_size - 0.5
        tail_mass = power_law_integral(self.tail_low, self.tail_high, exponent)
        total = head_mass.sum() + tail_mass
        self.head_cdf = tf.constant(np.cumsum(head_mass) / total)
        self.head_probability = float(head_mass.sum() / total)
        self.vocabulary_size = vocabulary_size

    def __call__(self, uniform: tf.Tensor) -> tf.Tensor:
        """int64 ids from float64 uniforms in [0, 1)."""
        head_ids = tf.searchsorted(self.head_cdf, uniform, side="right") + 1
        # Rescale the uniforms that fall in the tail to [0, 1), and invert the tail's CDF.
        tail_uniform = tf.clip_by_value((uniform - self.head_probability) / (1.0 - self.head_probability), 0.0, 1.0)
        low, high = self.tail_low, self.tail_high
        if abs(self.exponent - 1.0) < 1e-9:
            continuous = low * tf.pow(high / low, tail_uniform)
        else:
            power = 1.0 - self.exponent
            continuous = tf.pow(low**power + tail_uniform * (high**power - low**power), 1.0 / power)
        tail_ids = tf.clip_by_value(tf.cast(tf.round(continuous), tf.int64), self.head + 1, self.vocabulary_size - 1)
        return tf.where(uniform < self.head_probability, tf.cast(head_ids, tf.int64), tail_ids)


def hash_bucket(ids: tf.Tensor, buckets: int) -> tf.Tensor:
    """A bucket in [0, buckets) per int64 id: the top log2(buckets) of the low 32 bits of id * Knuth's multiplier.

    `buckets` must be a power of two; neighbouring ids (the popular head) land in distinct, scattered buckets.
    """
    hashed = tf.bitwise.bitwise_and(ids * _HASH_MULTIPLIER, 0xFFFFFFFF)
    return tf.bitwise.right_shift(hashed, 32 - int(math.log2(buckets)))
