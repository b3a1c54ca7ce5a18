"""RankerConfig.output_bias: each task's logit bias starts at its training prior (TaskSpec.label_mean), or at 0."""

import dataclasses

import numpy as np
import pytest

import tfrs_clippy_models as models
from tfrs_clippy.data.spec import DatasetSpec, TaskSpec
from tfrs_clippy_models import RankerConfig
from tfrs_clippy_models.ranker import output_bias

SMALL = {"bottom_units": (16, 8), "tower_units": (8,), "num_experts": 2}
CLICK_RATE = 0.2
RATING_MEAN = 3.5


@pytest.fixture
def prior_spec(tiny_spec) -> DatasetSpec:
    """The tiny spec with a positive rate of 0.2 for "click" and a mean of 3.5 for "rating"."""
    means = {"click": CLICK_RATE, "rating": RATING_MEAN}
    return dataclasses.replace(
        tiny_spec, tasks=tuple(dataclasses.replace(task, label_mean=means[task.name]) for task in tiny_spec.tasks)
    )


def logit_biases(model) -> dict[str, float]:
    biases = {}
    for name, tower in model.towers.items():
        logit = tower.layers[-1]
        assert logit.name == f"{name}_logit"
        biases[name] = float(logit.bias.numpy().item())
    return biases


def test_label_prior_biases_are_the_log_odds_and_the_mean(prior_spec):
    biases = logit_biases(models.build_ranker(prior_spec, RankerConfig(**SMALL)))  # "label_prior" is the default
    # log(0.2 / 0.8) = log(1 / 4); stored in float32.
    assert biases["click"] == float(np.float32(np.log(0.25)))
    assert biases["rating"] == 3.5


def test_zero_and_a_spec_without_label_means_give_zero_biases(prior_spec, tiny_spec):
    assert logit_biases(models.build_ranker(prior_spec, RankerConfig(output_bias="zero", **SMALL))) == {
        "click": 0.0,
        "rating": 0.0,
    }
    assert logit_biases(models.build_ranker(tiny_spec, RankerConfig(**SMALL))) == {"click": 0.0, "rating": 0.0}
    # One task with a prior, one without: only the first moves.
    mixed = dataclasses.replace(tiny_spec, tasks=(prior_spec.tasks[0], tiny_spec.tasks[1]))
    assert logit_biases(models.build_ranker(mixed, RankerConfig(**SMALL))) == {
        "click": float(np.float32(np.log(0.25))),
        "rating": 0.0,
    }


@pytest.mark.parametrize(
    "config",
    [
        RankerConfig(kernel_initializer="zeros", **SMALL),
        RankerConfig(bottom="mmoe", kernel_initializer="zeros", **SMALL),
        RankerConfig(bottom="ple", num_levels=2, cross_layers=1, kernel_initializer="zeros", **SMALL),
    ],
    ids=["shared_bottom", "mmoe", "ple_cross"],
)
def test_with_zero_kernels_the_ranker_predicts_the_prior_and_its_first_loss_is_the_prior_loss(
    prior_spec, make_batch, config
):
    model = models.build_ranker(prior_spec, config)
    features, labels = make_batch(prior_spec, size=64, seed=1)
    predictions = model(features)
    np.testing.assert_allclose(predictions["click"].numpy(), np.full(64, CLICK_RATE), rtol=1e-6)
    np.testing.assert_array_equal(predictions["rating"].numpy(), np.full(64, RATING_MEAN, np.float32))
    # The first loss, by hand: cross-entropy of the constant 0.2, and the mean squared distance to 3.5 (weight 0.5).
    y, r = labels["click"].astype(np.float64), labels["rating"].astype(np.float64)
    click_loss = -np.mean(y * np.log(CLICK_RATE) + (1 - y) * np.log(1 - CLICK_RATE))
    rating_loss = np.mean((r - RATING_MEAN) ** 2)
    loss = float(model.compute_loss((features, labels)))
    assert loss == pytest.approx(click_loss + 0.5 * rating_loss, rel=1e-5)
    # The zero bias's first loss is log(2) plus the mean square of the ratings: larger whenever the mean is off 0.
    zero = models.build_ranker(prior_spec, dataclasses.replace(config, output_bias="zero"))
    assert float(zero.compute_loss((features, labels))) == pytest.approx(np.log(2) + 0.5 * np.mean(r**2), rel=1e-5)


def test_get_config_rebuilds_the_same_biases(prior_spec):
    model = models.build_ranker(prior_spec, RankerConfig(**SMALL))
    rebuilt = type(model).from_config(model.get_config())
    assert rebuilt.dataset_spec.task("click").label_mean == CLICK_RATE
    assert logit_biases(rebuilt) == logit_biases(model)


def test_output_bias_arithmetic_and_bad_mode():
    assert output_bias(TaskSpec("t", "binary", label_mean=0.5)) == 0.0
    assert output_bias(TaskSpec("t", "binary", label_mean=0.9)) == pytest.approx(np.log(9.0), rel=1e-12)
    assert output_bias(TaskSpec("t", "regression", label_mean=-2.0)) == -2.0
    assert output_bias(TaskSpec("t", "regression", label_mean=-2.0), "zero") == 0.0
    assert output_bias(TaskSpec("t", "binary")) == 0.0
    with pytest.raises(ValueError, match=r"`mode` must be one of \('zero', 'label_prior'\), got 'prior'"):
        output_bias(TaskSpec("t", "binary", label_mean=0.5), "prior")
