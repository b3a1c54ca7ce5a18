"""Side-by-side timing for the benchmarks: variants in interleaved rounds, ratios to a reference round by round."""

from __future__ import annotations

import random
import statistics
import time
from typing import Any, Callable


def interleaved(variants: dict[str, tuple[Callable, list]], reference: str, rounds: int, steps: int, warmup: int,
                seed: int = 0, block: Callable[[Any], Any] = lambda result: result.numpy()) -> dict[str, dict]:
    """Times `variants` ({name: (step, inputs)}) in interleaved rounds; ratios to `reference` round by round.

    Each round runs every variant `steps` times in a shuffled order, each step timed alone (`block` waits for its
    result: TensorFlow's `.numpy()` by default, `jax.block_until_ready` for JAX); a variant's time in a round is
    the median of its steps'. Returns {name: ms (median over rounds), ratio (median over rounds of the variant's
    time over the reference's in the same round), ratio_min, ratio_max, reference}.
    """
    for step, inputs in variants.values():
        for i in range(warmup):
            block(step(*inputs[i % len(inputs)]))
    per_round: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for round_index in range(rounds):
        random.Random(seed + round_index).shuffle(order)
        for name in order:
            step, inputs = variants[name]
            times = []
            for i in range(steps):
                start = time.perf_counter()
                block(step(*inputs[i % len(inputs)]))
                times.append(time.perf_counter() - start)
            per_round[name].append(statistics.median(times) * 1e3)
    results = {}
    for name, times in per_round.items():
        ratios = [t / r for t, r in zip(times, per_round[reference])]
        results[name] = dict(ms=statistics.median(times), ratio=statistics.median(ratios), ratio_min=min(ratios),
                             ratio_max=max(ratios), reference=reference)
    return results
