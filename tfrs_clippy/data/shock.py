"""A one-pass multitask ranking stream, cut into days, with one distribution shock: the stage of the Clippy paper.

Clippy (Tang et al., KDD 2023) is about models that train fine and then diverge mid-run when the data changes
under them: a new feature switches on, traffic moves to never-seen items, a count feature's scale grows, a task's
base rate moves. Adagrad's steps shrink like 1/sqrt(t), so such a change is only dangerous where it meets
coordinates with little accumulated gradient; then they move by about the learning rate each, all at once.
`shock_stream` generates such a stream, seeded and streamed (every example is a function of (seed, position)),
with exactly one shock at the start of day `shock_day` and a control (`shock="none"`) identical in everything else.

Features (the same for every shock, so the control differs only by the shock):
- `item_id`, `user_id`, `context_id`: categorical Zipf ids (`ids.ZipfSampler`), each id with a hidden teacher
  embedding picked by `ids.hash_bucket`. The item vocabulary is twice `vocabulary_sizes[0]`: its upper half is
  never drawn except by the `new_ids` shock.
- `numeric`: `numeric_dim` standard normal values.
- `counts`: `count_dim` lognormal counts exp(N(0, 1)) times the day's scale (1 unless `scale_growth`); the spec
  holds their mean and std at scale 1, the statistics a model normalizing on the first days would freeze.
- `dormant`: `dormant_dim` values that are 0 except after a `dormant_features` shock, when they are unnormalized
  lognormal counts `dormant_scale` * exp(N(0, 1)). Their spec says mean 0, std 1: on the days before the shock
  their statistics are degenerate, so a model passes them through raw, as new features usually arrive.

Tasks, from a hidden teacher (relu of a random projection of the teacher embeddings and features, one linear head
per task, heads rotating by `drift` radians per day): `binary_<j>`, Bernoulli(sigmoid(2 * score + b_j)) with b_j
set so that the base rate over the first `PRIOR_EXAMPLES` examples is `base_rates[j]`; and, with `regression=True`,
`regression_0`, a heavy-tailed lognormal "watch time" exp(0.4 * clip(score, -4, 4) + 0.4 * noise). Each
`TaskSpec.label_mean` is the mean label of the first `PRIOR_EXAMPLES` training examples (all before the shock):
the prior a ranker starts from.

Shocks, from the first example of day `shock_day` on:
- `dormant_features`: `dormant` switches on, and the teacher reads it (it adds `DORMANT_VARIANCE` to the
  teacher's pre-activation variance): new inputs of a large raw scale meeting weights that never had a gradient.
- `new_ids`: a share `new_id_fraction` of the examples get an item id from the never-seen upper half (Zipf again).
- `scale_growth`: the counts' scale is multiplied by `growth_per_day` on each day from the shock on (the teacher
  reads counts relative to the day's scale, so only the inputs change, not what they mean).
- `base_rate`: task `binary_0`'s logit bias moves by `base_rate_shift`.
- `none`: nothing happens; the control stream.

Splits: `train` is the stream, `num_days * examples_per_day` examples in time order; `test` is a held-out slice of
the last day (`num_heldout` examples of the last day's distribution, drawn with other random keys than the
training examples); no validation split.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import tensorflow as tf

from tfrs_clippy.data import ids as ids_module
from tfrs_clippy.data import tables
from tfrs_clippy.data.arguments import is_int, is_number, require
from tfrs_clippy.data.pipeline import ChunkedExamples, examples_from_chunks, make_pipeline
from tfrs_clippy.data.spec import DatasetSpec, FeatureSpec, TaskSpec

NAME = "shock_stream"
SHOCKS = ("none", "dormant_features", "new_ids", "scale_growth", "base_rate")

CHUNK_SIZE = 4096
"""Examples generated per random draw. Part of the data's definition: changing it changes the data."""

TEACHER_BUCKETS = 1 << 16
TEACHER_DIM = 8
TEACHER_HIDDEN = 32
BINARY_LOGIT_SCALE = 2.0
REGRESSION_SCORE_SCALE = 0.4
REGRESSION_NOISE = 0.4
REGRESSION_SCORE_LIMIT = 4.0
"""The regression reads the score clipped to +-4: its tail stays lognormal, without a single label that dominates
a batch's loss (an unclipped teacher score of 8 would give a label of exp(3.2) = 25 times the median)."""
DORMANT_VARIANCE = 0.25
"""What the switched-on dormant features add to the variance (1 before) of the teacher's pre-activations."""

PRIOR_EXAMPLES = 4 * CHUNK_SIZE
"""The first training examples whose mean labels are the spec's `label_mean` (the ranker's starting prior)."""

_LOGNORMAL_MEAN = math.exp(0.5)
_LOGNORMAL_STD = math.sqrt((math.e - 1.0) * math.e)
"""Mean and std of exp(z) for z ~ N(0, 1): the counts' statistics at scale 1."""

_CATEGORICAL = ("item_id", "user_id", "context_id")


def binary_logit_bias(scores: np.ndarray, base_rate: float) -> float:
    """The b with mean(sigmoid(2 * scores + b)) = base_rate, by bisection (the mean rises with b)."""
    scores = np.asarray(scores, dtype=np.float64)
    low, high = -40.0, 40.0
    for _ in range(100):
        middle = 0.5 * (low + high)
        rate = np.mean(1.0 / (1.0 + np.exp(-(BINARY_LOGIT_SCALE * scores + middle))))
        low, high = (middle, high) if rate < base_rate else (low, middle)
    return 0.5 * (low + high)


class _Teacher:
    """The fixed random parameters of the hidden teacher, all derived from the seed."""

    def __init__(self, seed: int, base_dim: int, dormant_dim: int, num_tasks: int) -> None:
        keys = tf.random.experimental.stateless_split(tf.constant([seed, 0], tf.int64), num=len(_CATEGORICAL) + 4)
        self.tables = [
            tf.random.stateless_normal([TEACHER_BUCKETS, TEACHER_DIM], seed=keys[f]) for f in range(len(_CATEGORICAL))
        ]
        f = len(_CATEGORICAL)
        # Unit-variance inputs: the base projection gives pre-activations of variance 1, the dormant rows add
        # DORMANT_VARIANCE once they are non-zero.
        self.base_projection = tf.random.stateless_normal(
            [base_dim, TEACHER_HIDDEN], seed=keys[f], stddev=1.0 / math.sqrt(base_dim)
        )
        self.dormant_projection = tf.random.stateless_normal(
            [dormant_dim, TEACHER_HIDDEN], seed=keys[f + 1], stddev=math.sqrt(DORMANT_VARIANCE / dormant_dim)
        )
        # relu(z) of z ~ N(0, 1) has variance 1/2 - 1/(2 pi): heads of this std give scores near N(0, 1).
        head_std = 1.0 / math.sqrt(TEACHER_HIDDEN * (0.5 - 0.5 / math.pi))
        shared = tf.random.stateless_normal([2, TEACHER_HIDDEN, 1], seed=keys[f + 2], stddev=head_std)
        own = tf.random.stateless_normal([2, TEACHER_HIDDEN, num_tasks], seed=keys[f + 3], stddev=head_std)
        # heads[0] is each task's direction on day 0; heads[1] the direction it rotates towards. Half of each
        # direction's variance is shared by all tasks: the tasks are correlated, as a ranker's are.
        self.heads = math.sqrt(0.5) * shared + math.sqrt(0.5) * own

    def scores(
        self,
        ids: Sequence[tf.Tensor],
        base_inputs: Sequence[tf.Tensor],
        dormant_signal: tf.Tensor,
        dormant_on: tf.Tensor,
        angle: tf.Tensor,
    ) -> tf.Tensor:
        """[batch, num_tasks] float32 scores; `dormant_on` and `angle` are [batch]."""
        embeddings = [
            tf.gather(table, ids_module.hash_bucket(f_ids, TEACHER_BUCKETS)) for table, f_ids in zip(self.tables, ids)
        ]
        pre_activation = tf.concat(embeddings + list(base_inputs), axis=1) @ self.base_projection
        pre_activation += dormant_signal @ self.dormant_projection
        # Centre with E[relu(z)] = std(z) / sqrt(2 pi), std(z) being 1, or sqrt(1 + DORMANT_VARIANCE) once on.
        std = tf.sqrt(1.0 + DORMANT_VARIANCE * dormant_on)
        hidden = tf.nn.relu(pre_activation) - (std / math.sqrt(2.0 * math.pi))[:, None]
        start, end = hidden @ self.heads[0], hidden @ self.heads[1]
        return tf.cos(angle)[:, None] * start + tf.sin(angle)[:, None] * end


def shock_stream(
    shock: str = "dormant_features",
    num_days: int = 6,
    examples_per_day: int = 51_200,
    shock_day: int = 3,
    num_heldout: int = 16_384,
    vocabulary_sizes: Sequence[int] = (10_000, 100_000, 1_000),
    zipf_exponent: float = 1.1,
    numeric_dim: int = 8,
    count_dim: int = 4,
    dormant_dim: int = 16,
    dormant_scale: float = 3.0,
    new_id_fraction: float = 0.3,
    growth_per_day: float = 4.0,
    base_rate_shift: float = 1.5,
    base_rates: Sequence[float] = (0.3, 0.1, 0.03),
    regression: bool = True,
    drift: float = 0.05,
    embedding_dim: int = 16,
    seed: int = 0,
) -> tables.Splits:
    """A streamed multitask ranking dataset in days with one shock at day `shock_day` (see the module docstring).

    Args:
        shock: One of `SHOCKS`.
        num_days: Days in the training stream (>= 2).
        examples_per_day: Examples per day (>= 1).
        shock_day: The day the shock starts, in [1, num_days): there is at least one day before and one after.
        num_heldout: Examples of the held-out slice of the last day (>= 0).
        vocabulary_sizes: Vocabulary sizes of `item_id`, `user_id` and `context_id` (each >= 2, OOV id 0 counted;
            the item feature's spec has twice the first, for the never-seen ids of `new_ids`).
        zipf_exponent: Exponent s of P(id = k) ~ k ** -s (> 0).
        numeric_dim: Width of `numeric` (>= 1).
        count_dim: Width of `counts` (>= 1).
        dormant_dim: Width of `dormant` (>= 1).
        dormant_scale: Scale of the dormant counts once on (> 0).
        new_id_fraction: Share of examples with a never-seen item id after a `new_ids` shock, in (0, 1].
        growth_per_day: Factor by which a `scale_growth` shock multiplies the counts' scale each day (> 1).
        base_rate_shift: Logit shift of `binary_0` in a `base_rate` shock (finite, non-zero).
        base_rates: The binary tasks' base rates, each in (0, 1); at least one unless `regression`.
        regression: Whether the stream has the heavy-tailed regression task `regression_0`.
        drift: Radians the teacher's task heads rotate per day (finite).
        embedding_dim: The spec's embedding width of every categorical feature (>= 1).
        seed: An int64; same seed, same data.

    Returns:
        The splits; their datasets generate examples as they are read.

    Raises:
        ValueError: An argument of the wrong type or out of range, named with its value.
    """
    def check(valid: bool, argument: str, requirement: str, value: object) -> None:
        require(NAME, valid, argument, requirement, value)

    check(shock in SHOCKS, "shock", f"one of {SHOCKS}", shock)
    check(is_int(num_days) and num_days >= 2, "num_days", "an int >= 2", num_days)
    check(is_int(examples_per_day) and examples_per_day >= 1, "examples_per_day", "an int >= 1", examples_per_day)
    check(is_int(shock_day) and 1 <= shock_day < num_days, "shock_day", f"an int in [1, {num_days})", shock_day)
    check(is_int(num_heldout) and num_heldout >= 0, "num_heldout", "an int >= 0", num_heldout)
    check(len(vocabulary_sizes) == len(_CATEGORICAL), "vocabulary_sizes", "three sizes (item, user, context)",
          vocabulary_sizes)
    for size in vocabulary_sizes:
        check(is_int(size) and 2 <= size < 1 << 30, "vocabulary_sizes", "ints in [2, 2**30)", size)
    check(is_number(zipf_exponent) and zipf_exponent > 0, "zipf_exponent", "a finite number > 0", zipf_exponent)
    for argument, value in (("numeric_dim", numeric_dim), ("count_dim", count_dim), ("dormant_dim", dormant_dim),
                            ("embedding_dim", embedding_dim)):
        check(is_int(value) and value >= 1, argument, "an int >= 1", value)
    check(is_number(dormant_scale) and dormant_scale > 0, "dormant_scale", "a finite number > 0", dormant_scale)
    check(is_number(new_id_fraction) and 0 < new_id_fraction <= 1, "new_id_fraction", "a number in (0, 1]",
          new_id_fraction)
    check(is_number(growth_per_day) and growth_per_day > 1, "growth_per_day", "a finite number > 1", growth_per_day)
    check(is_number(base_rate_shift) and base_rate_shift != 0, "base_rate_shift", "a finite non-zero number",
          base_rate_shift)
    for rate in base_rates:
        check(is_number(rate) and 0 < rate < 1, "base_rates", "numbers in (0, 1)", rate)
    check(isinstance(regression, bool), "regression", "a bool", regression)
    check(len(base_rates) + int(regression) >= 1, "base_rates", "non-empty when `regression` is False", base_rates)
    check(shock != "base_rate" or len(base_rates) >= 1, "base_rates", "non-empty for the base_rate shock",
          base_rates)
    check(is_number(drift), "drift", "a finite number (radians per day)", drift)
    check(is_int(seed) and -(1 << 63) <= seed < 1 << 63, "seed", "an int64", seed)

    num_binary = len(base_rates)
    task_names = [f"binary_{j}" for j in range(num_binary)] + (["regression_0"] if regression else [])
    item_vocabulary = 2 * vocabulary_sizes[0]
    features = (
        FeatureSpec(name="item_id", kind="categorical", vocabulary_size=item_vocabulary, embedding_dim=embedding_dim),
        FeatureSpec(name="user_id", kind="categorical", vocabulary_size=vocabulary_sizes[1],
                    embedding_dim=embedding_dim),
        FeatureSpec(name="context_id", kind="categorical", vocabulary_size=vocabulary_sizes[2],
                    embedding_dim=embedding_dim),
        FeatureSpec(name="numeric", kind="numeric", dim=numeric_dim, mean=0.0, std=1.0),
        FeatureSpec(name="counts", kind="numeric", dim=count_dim, mean=_LOGNORMAL_MEAN, std=_LOGNORMAL_STD),
        FeatureSpec(name="dormant", kind="numeric", dim=dormant_dim, mean=0.0, std=1.0),
    )
    teacher = _Teacher(seed, len(_CATEGORICAL) * TEACHER_DIM + numeric_dim + count_dim, dormant_dim, len(task_names))
    samplers = [ids_module.ZipfSampler(size, zipf_exponent) for size in vocabulary_sizes]
    shifted = tf.one_hot(0, max(num_binary, 1)) * (base_rate_shift if shock == "base_rate" else 0.0)
    day_length = tf.constant(examples_per_day, tf.int64)

    def draw(key: tf.Tensor, position: tf.Tensor, biases: tf.Tensor) -> tuple[dict, dict, tf.Tensor]:
        """Features, labels and teacher scores of CHUNK_SIZE examples at stream positions `position`."""
        keys = tf.unstack(tf.random.experimental.stateless_split(key, num=7))
        day = position // day_length
        after = day >= shock_day
        after_float = tf.cast(after, tf.float32)
        uniforms = tf.random.stateless_uniform([CHUNK_SIZE, len(_CATEGORICAL)], seed=keys[0], dtype=tf.float64)
        ids = [sample(uniforms[:, f]) for f, sample in enumerate(samplers)]
        if shock == "new_ids":
            new_item = tf.random.stateless_uniform([CHUNK_SIZE], seed=keys[1]) < new_id_fraction
            # Ids vocabulary_sizes[0] .. 2 * vocabulary_sizes[0] - 2: the never-seen half, Zipf again.
            ids[0] = tf.where(after & new_item, ids[0] + vocabulary_sizes[0] - 1, ids[0])
        numeric = tf.random.stateless_normal([CHUNK_SIZE, numeric_dim], seed=keys[2])
        log_counts = tf.random.stateless_normal([CHUNK_SIZE, count_dim], seed=keys[3])
        count_scale = tf.ones([CHUNK_SIZE])
        if shock == "scale_growth":
            days_grown = tf.cast(tf.maximum(day - shock_day + 1, 0), tf.float32)
            count_scale = tf.pow(tf.constant(growth_per_day, tf.float32), days_grown)
        counts = tf.exp(log_counts) * count_scale[:, None]
        log_dormant = tf.random.stateless_normal([CHUNK_SIZE, dormant_dim], seed=keys[4])
        dormant_on = after_float if shock == "dormant_features" else tf.zeros([CHUNK_SIZE])
        dormant = dormant_scale * tf.exp(log_dormant) * dormant_on[:, None]
        angle = tf.cast(day, tf.float32) * drift
        # The teacher reads the counts relative to the day's scale and the dormant counts in log units.
        scores = teacher.scores(ids, [numeric, log_counts], log_dormant * dormant_on[:, None], dormant_on, angle)
        bias = biases[:num_binary] + shifted[:num_binary] * after_float[:, None]
        logits = BINARY_LOGIT_SCALE * scores[:, :num_binary] + bias
        clicked = tf.cast(tf.random.stateless_uniform([CHUNK_SIZE, num_binary], seed=keys[5]) < tf.sigmoid(logits),
                          tf.float32)
        labels = {name: clicked[:, j] for j, name in enumerate(task_names[:num_binary])}
        if regression:
            noise = tf.random.stateless_normal([CHUNK_SIZE], seed=keys[6])
            score = tf.clip_by_value(scores[:, -1], -REGRESSION_SCORE_LIMIT, REGRESSION_SCORE_LIMIT)
            labels["regression_0"] = tf.exp(REGRESSION_SCORE_SCALE * score + REGRESSION_NOISE * noise)
        inputs = dict(zip(_CATEGORICAL, ids))
        inputs.update(numeric=numeric, counts=counts, dormant=dormant)
        return inputs, labels, scores

    # Each binary task's bias gives it its base rate on the scores of the first examples, whatever the seed's
    # teacher (its most popular ids move the mean score by a few tenths).
    num_prior = min(PRIOR_EXAMPLES, shock_day * examples_per_day)
    prior_scores = tf.concat([
        draw(tf.random.experimental.stateless_fold_in(tf.constant([seed, 1], tf.int64), index),
             index * CHUNK_SIZE + tf.range(CHUNK_SIZE, dtype=tf.int64), tf.zeros([max(num_binary, 1)]))[2]
        for index in range(-(-num_prior // CHUNK_SIZE))
    ], axis=0)[:num_prior].numpy()
    biases = tf.constant(
        [binary_logit_bias(prior_scores[:, j], rate) for j, rate in enumerate(base_rates)] or [0.0], tf.float32
    )

    def chunk(key: tf.Tensor, position: tf.Tensor) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
        """CHUNK_SIZE examples at stream positions `position` [CHUNK_SIZE], from the random `key`."""
        inputs, labels, _ = draw(key, position, biases)
        return inputs, labels

    def blocks(stream: int, count: int, first_position: int) -> ChunkedExamples:
        """`count` examples of random stream `stream` (1 train, 2 held out), at positions from `first_position`.

        Held-out positions wrap around inside the last day, so the slice has the last day's distribution.
        """

        def block(index: tf.Tensor) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
            key = tf.random.experimental.stateless_fold_in(tf.constant([seed, stream], tf.int64), index)
            local = index * CHUNK_SIZE + tf.range(CHUNK_SIZE, dtype=tf.int64)
            position = first_position + (local if stream == 1 else local % examples_per_day)
            rows = slice(0, tf.minimum(count - index * CHUNK_SIZE, CHUNK_SIZE))
            return tf.nest.map_structure(lambda column: column[rows], chunk(key, position))

        chunks = tf.data.Dataset.range(-(-count // CHUNK_SIZE)).map(
            block, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
        return examples_from_chunks(chunks, count)

    num_train = num_days * examples_per_day
    prior_labels = next(iter(make_pipeline(blocks(1, num_prior, 0), num_prior, prefetch=False)))[1]

    def prior(name: str) -> float:
        labels = prior_labels[name].numpy().astype(np.float64)
        if name.startswith("binary"):
            # (positives + 1) / (n + 2): inside (0, 1) even for a rare task on a short prefix.
            return float((labels.sum() + 1.0) / (labels.size + 2.0))
        return float(labels.mean())

    tasks = tuple(
        TaskSpec(name=name, kind="binary" if name.startswith("binary") else "regression", label_mean=prior(name))
        for name in task_names
    )
    return tables.Splits(
        name=NAME,
        spec=DatasetSpec(features=features, tasks=tasks),
        train=blocks(1, num_train, 0),
        test=blocks(2, num_heldout, (num_days - 1) * examples_per_day),
        validation=None,
        sizes={"train": num_train, "test": num_heldout},
    )
