"""The shock stream: where and how big each shock is, what stays identical to the control, no leakage, seeds."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from tfrs_clippy.data import make_pipeline, shock_stream
from tfrs_clippy.data.shock import PRIOR_EXAMPLES, binary_logit_bias

DAY = 8192
SMALL = dict(num_days=4, examples_per_day=DAY, shock_day=2, num_heldout=4096, vocabulary_sizes=(500, 100_000, 1000))
SHOCK_AT = 2 * DAY


def columns(dataset) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every example of an unbatched split, as NumPy columns."""
    features, labels = next(iter(make_pipeline(dataset, 1 << 20, prefetch=False)))
    return ({name: value.numpy() for name, value in features.items()},
            {name: value.numpy() for name, value in labels.items()})


@pytest.fixture(scope="module")
def streams() -> dict[str, tuple]:
    return {shock: columns(shock_stream(shock=shock, seed=3, **SMALL).train)
            for shock in ("none", "dormant_features", "new_ids", "scale_growth", "base_rate")}


def test_spec_features_tasks_and_sizes():
    splits = shock_stream(seed=3, **SMALL)
    assert [feature.name for feature in splits.spec.features] == [
        "item_id", "user_id", "context_id", "numeric", "counts", "dormant"]
    assert splits.spec.feature("item_id").vocabulary_size == 1000  # twice 500: room for never-seen ids
    assert [(task.name, task.kind) for task in splits.spec.tasks] == [
        ("binary_0", "binary"), ("binary_1", "binary"), ("binary_2", "binary"), ("regression_0", "regression")]
    assert splits.sizes == {"train": 4 * DAY, "test": 4096}
    features, labels = columns(splits.train)
    assert len(labels["binary_0"]) == 4 * DAY and features["dormant"].shape == (4 * DAY, 16)


def test_dormant_features_are_zero_before_the_shock_and_lognormal_counts_after(streams):
    features, _ = streams["dormant_features"]
    dormant = features["dormant"]
    assert np.all(dormant[:SHOCK_AT] == 0.0)
    assert np.all(dormant[SHOCK_AT:] > 0.0)
    # 3 * exp(z), z ~ N(0, 1): log(x / 3) is standard normal.
    logs = np.log(dormant[SHOCK_AT:] / 3.0)
    assert abs(logs.mean()) < 0.02 and abs(logs.std() - 1.0) < 0.02
    assert np.all(streams["none"][0]["dormant"] == 0.0)  # the control never switches them on


def test_new_ids_come_from_the_unseen_half_only_after_the_shock(streams):
    items = streams["new_ids"][0]["item_id"]
    assert items[:SHOCK_AT].max() < 500 and items.min() >= 1
    new = items[SHOCK_AT:] >= 500
    assert abs(new.mean() - 0.3) < 0.015
    assert items.max() <= 998  # ids 500 .. 998: the vocabulary (1000) has room for them
    assert streams["none"][0]["item_id"].max() < 500


def test_scale_growth_multiplies_the_counts_by_the_growth_each_day_from_the_shock(streams):
    counts = streams["scale_growth"][0]["counts"]
    for day, scale in enumerate([1.0, 1.0, 4.0, 16.0]):
        day_counts = counts[day * DAY:(day + 1) * DAY]
        # exp(z) * scale: the median of log(counts / scale) is 0 on every day.
        assert abs(np.median(np.log(day_counts / scale))) < 0.03, day
    np.testing.assert_array_equal(counts[:SHOCK_AT], streams["none"][0]["counts"][:SHOCK_AT])


def test_base_rate_shift_moves_binary_0_only(streams):
    _, labels = streams["base_rate"]
    _, control = streams["none"]
    before, after = labels["binary_0"][:SHOCK_AT].mean(), labels["binary_0"][SHOCK_AT:].mean()
    assert abs(before - control["binary_0"][:SHOCK_AT].mean()) == 0.0
    # The bias moves by +1.5 logits: every example's click probability rises, so the rate does (by ~0.2-0.35
    # depending on how the teacher's scores spread) and never reaches 1.
    assert before + 0.15 < after < 0.8
    for task in ("binary_1", "binary_2", "regression_0"):
        np.testing.assert_array_equal(labels[task], control[task])


def test_every_shock_stream_equals_the_control_before_the_shock(streams):
    control_features, control_labels = streams["none"]
    for shock, (features, labels) in streams.items():
        for name in features:
            np.testing.assert_array_equal(features[name][:SHOCK_AT], control_features[name][:SHOCK_AT], err_msg=shock)
        for name in labels:
            np.testing.assert_array_equal(labels[name][:SHOCK_AT], control_labels[name][:SHOCK_AT], err_msg=shock)


def test_base_rates_and_label_priors(streams):
    _, labels = streams["none"]
    for name, rate in (("binary_0", 0.3), ("binary_1", 0.1), ("binary_2", 0.03)):
        # Exact on the first PRIOR_EXAMPLES scores; sampled labels over two days are within a few percent.
        assert labels[name][:SHOCK_AT].mean() == pytest.approx(rate, rel=0.1), name
    regression = labels["regression_0"]
    assert regression.min() > 0 and np.percentile(regression, 99.9) > 4 * np.median(regression)  # heavy tail
    spec = shock_stream(seed=3, **SMALL).spec
    for task in spec.tasks:
        prefix = labels[task.name][:PRIOR_EXAMPLES]
        expected = (prefix.sum() + 1) / (prefix.size + 2) if task.kind == "binary" else prefix.mean()
        assert task.label_mean == pytest.approx(expected, rel=1e-5), task.name


def test_binary_logit_bias_gives_the_base_rate():
    scores = np.random.default_rng(0).standard_normal(100_000) * 1.3 + 0.4
    for rate in (0.03, 0.1, 0.3, 0.7):
        bias = binary_logit_bias(scores, rate)
        assert np.mean(1 / (1 + np.exp(-(2 * scores + bias)))) == pytest.approx(rate, rel=1e-6)


def test_held_out_slice_is_new_examples_of_the_last_days_distribution():
    splits = shock_stream(shock="dormant_features", seed=3, **SMALL)
    train, _ = columns(splits.train)
    held_out, held_out_labels = columns(splits.test)
    assert len(held_out_labels["binary_0"]) == 4096
    assert np.all(held_out["dormant"] > 0)  # after the shock, as the last day is
    # No held-out example is a training example (continuous features never repeat).
    assert not set(map(tuple, held_out["numeric"].round(6))) & set(map(tuple, train["numeric"].round(6)))
    # No feature is a label: the labels come from the hidden teacher only.
    for name, label in held_out_labels.items():
        for feature in held_out.values():
            flat = feature.reshape(len(label), -1).astype(np.float64)
            assert not any(np.array_equal(flat[:, column], label) for column in range(flat.shape[1])), name


def test_same_seed_same_data_other_seed_other_data():
    first = columns(shock_stream(seed=5, **SMALL).train)
    again = columns(shock_stream(seed=5, **SMALL).train)
    other = columns(shock_stream(seed=6, **SMALL).train)
    for name in first[0]:
        np.testing.assert_array_equal(first[0][name], again[0][name])
    np.testing.assert_array_equal(first[1]["regression_0"], again[1]["regression_0"])
    assert not np.array_equal(first[0]["numeric"], other[0]["numeric"])


def test_fewer_tasks():
    spec = shock_stream(base_rates=(0.3,), regression=False, seed=0, **SMALL).spec
    assert [task.name for task in spec.tasks] == ["binary_0"]


@pytest.mark.parametrize("argument, value, named", [
    ("shock", "meteor", "meteor"), ("num_days", 1, 1), ("examples_per_day", 0, 0), ("shock_day", 0, 0),
    ("shock_day", 4, 4), ("num_heldout", -1, -1), ("vocabulary_sizes", (10, 10), (10, 10)),
    ("vocabulary_sizes", (10, 1, 10), 1), ("zipf_exponent", 0.0, 0.0), ("numeric_dim", 0, 0), ("count_dim", 0, 0),
    ("dormant_dim", 1.5, 1.5), ("dormant_scale", -1.0, -1.0), ("new_id_fraction", 0.0, 0.0),
    ("new_id_fraction", 1.5, 1.5), ("growth_per_day", 1.0, 1.0), ("base_rate_shift", 0.0, 0.0),
    ("base_rates", (0.0,), 0.0), ("base_rates", (1.0,), 1.0), ("regression", 1, 1), ("drift", math.nan, math.nan),
    ("embedding_dim", 0, 0), ("seed", 1.0, 1.0),
])
def test_bad_arguments_are_named_with_their_value(argument, value, named):
    # A bad element of a sequence is named itself.
    with pytest.raises(ValueError, match=f"`{argument}`.*{re.escape(repr(named))}"):
        shock_stream(**{**SMALL, argument: value})


def test_a_stream_needs_a_task():
    with pytest.raises(ValueError, match="`base_rates`"):
        shock_stream(base_rates=(), regression=False, **SMALL)

