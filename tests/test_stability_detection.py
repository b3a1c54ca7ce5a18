"""The divergence detector on synthetic loss curves, without Keras: what counts as micro, full, and nothing."""

import math

import numpy as np
import pytest

from tfrs_clippy.stability import BatchLossReader, DetectorConfig, detect_divergence


def _noisy_decreasing_loss(steps: int, seed: int = 0) -> np.ndarray:
    """A healthy training curve: 1/sqrt(t) decay with 10% multiplicative batch noise."""
    rng = np.random.default_rng(seed)
    return (0.3 + 1.0 / np.sqrt(1.0 + np.arange(steps))) * rng.lognormal(0.0, 0.1, steps)


def test_noise_is_not_counted():
    for seed in range(5):
        record = detect_divergence(_noisy_decreasing_loss(2000, seed))
        score = record.instability_score()
        assert (score.micro_divergences, score.full_divergences) == (0, 0)
        assert score.worst_spike_ratio < 1.6


def test_spike_that_recovers_is_one_micro_divergence():
    losses = _noisy_decreasing_loss(400)
    losses[200:205] *= 20.0  # a 5-step spike, back to normal at step 205
    record = detect_divergence(losses)
    assert [(e.kind, e.start_step, e.end_step, e.reason) for e in record.events] == [("micro", 200, 205, "recovered")]
    score = record.instability_score()
    assert score.events_per_1000_steps == pytest.approx(2.5)
    assert score.fraction_steps_in_spike == pytest.approx(5 / 400)
    assert 15.0 < score.worst_spike_ratio < 35.0
    assert not score.had_full_divergence


def test_single_step_spike_between_logging_points_is_detected():
    losses = _noisy_decreasing_loss(300)
    losses[150] *= 4.0
    record = detect_divergence(losses)
    assert [(e.kind, e.start_step, e.end_step) for e in record.events] == [("micro", 150, 151)]


def test_blow_up_without_recovery_is_full_divergence():
    losses = _noisy_decreasing_loss(300)
    losses[100:] = losses[100] * 1.05 ** np.arange(200)  # grows 5% per step from step 100
    config = DetectorConfig(recovery_steps=30)
    record = detect_divergence(losses, config)
    assert record.count("micro") == 0
    full = [e for e in record.events if e.kind == "full"]
    assert full and full[0].reason == "no_recovery"
    # The loss doubles (1.05^15 = 2.08) about 15 steps in; full is declared recovery_steps after that.
    assert 110 <= full[0].start_step <= 120
    assert full[0].end_step == full[0].start_step + 30
    assert record.instability_score().had_full_divergence


def test_nan_is_full_divergence_once_per_run_of_non_finite_losses():
    losses = list(_noisy_decreasing_loss(100))
    losses[60:70] = [math.nan] * 10
    losses[80] = math.inf
    record = detect_divergence(losses)
    assert [(e.kind, e.start_step, e.reason) for e in record.events] == [
        ("full", 60, "non_finite"),
        ("full", 80, "non_finite"),
    ]
    assert record.instability_score().worst_spike_ratio == math.inf


def test_nan_during_warmup_is_full_divergence():
    record = detect_divergence([1.0, 0.9, math.nan])
    assert [(e.kind, e.start_step) for e in record.events] == [("full", 2)]


def _events(record):
    return [(e.kind, e.start_step, e.end_step, e.reason, e.baseline) for e in record.events]


def test_blow_up_at_step_1_that_never_comes_back_is_a_full_divergence_from_step_1():
    # Step 1 is in the warm-up (10 steps): 1e5 > 10 * 17 starts a spike, baseline 17, threshold 170.
    record = detect_divergence([17.0] + [1e5] * 60, DetectorConfig(recovery_steps=50))
    assert _events(record) == [("full", 1, 51, "no_recovery", 17.0)]
    assert record.baselines[1:3] == [17.0, 17.0]  # step 0 had nothing to compare with: NaN
    assert math.isnan(record.baselines[0])
    assert record.instability_score().worst_spike_ratio == pytest.approx(1e5 / 17.0)


def test_blow_up_in_the_warmup_that_recovers_is_micro():
    record = detect_divergence([17.0, 400.0, 12.0, 8.0, 7.0, 6.5])
    assert _events(record) == [("micro", 1, 2, "recovered", 17.0)]  # 400 > 170; 12 <= 170
    assert record.in_spike == [False, True, False, False, False, False]


def test_falling_warmup_loss_and_a_small_rise_are_no_event():
    assert detect_divergence([17.0, 9.0, 5.0, 4.0]).events == []
    assert detect_divergence([1.0, 5.0, 1.0, 1.0]).events == []  # 5 < 10 * 1


def test_warmup_threshold_is_the_smallest_loss_so_far():
    # The smallest loss so far is 2 (step 2): 25 > 10 * 2 spikes though it is below 10 * 17.
    record = detect_divergence([17.0, 9.0, 2.0, 25.0, 3.0])
    assert _events(record) == [("micro", 3, 4, "recovered", 2.0)]
    # A custom ratio: 5 > 4 * 1.
    assert _events(detect_divergence([1.0, 5.0, 1.0, 1.0], DetectorConfig(warmup_spike_ratio=4.0))) == [
        ("micro", 1, 2, "recovered", 1.0)
    ]


def test_infinite_warmup_spike_ratio_keeps_the_warmup_blind():
    record = detect_divergence([17.0, 1e5, 1e5, 12.0], DetectorConfig(warmup_spike_ratio=math.inf))
    assert record.events == []
    assert all(math.isnan(b) for b in record.baselines)


def test_noisy_small_loss_needs_both_ratio_and_mad():
    # A small loss with additive noise of 40% of its level: a 2x ratio alone fires on 2.5-sigma noise (~0.6% of
    # steps); the 6-MAD test keeps it quiet.
    rng = np.random.default_rng(1)
    losses = np.abs(0.01 + 0.004 * rng.standard_normal(3000))
    assert detect_divergence(losses, DetectorConfig(spike_mads=0.0)).count("micro") > 0
    assert detect_divergence(losses).count("micro") == 0


@pytest.mark.parametrize(
    "field, value",
    [
        ("spike_ratio", 1.0),
        ("spike_mads", -1.0),
        ("recovery_steps", 0),
        ("baseline_window", 2.5),
        ("warmup_steps", 99),
        ("warmup_spike_ratio", 1.0),
        ("warmup_spike_ratio", math.nan),
    ],
)
def test_bad_config_raises_naming_the_argument(field, value):
    with pytest.raises(ValueError, match=field):
        DetectorConfig(**{field: value})


def test_reader_reads_its_key_and_names_it_when_missing():
    reader = BatchLossReader(loss_key="total_loss")
    assert reader.read({"total_loss": np.float32(5.0), "loss": 1.0}) == 5.0
    with pytest.raises(ValueError, match="total_loss"):
        reader.read({"loss": 1.0})
    with pytest.raises(ValueError, match="loss_key"):
        BatchLossReader(loss_key="")


def test_rescued_event_is_not_a_divergence_of_the_run():
    losses = list(_noisy_decreasing_loss(100))
    losses[50] = math.nan
    record = detect_divergence(losses)
    assert record.instability_score().had_full_divergence
    assert record.rescue_last_event().kind == "rescued"
    score = record.instability_score()
    assert (score.full_divergences, score.rescued_divergences, score.had_full_divergence) == (0, 1, False)
    assert score.events_per_1000_steps == pytest.approx(10.0)  # the instability still counts as an event


def test_only_a_non_finite_full_divergence_can_be_rescued():
    losses = _noisy_decreasing_loss(400)
    losses[200:205] *= 20.0
    with pytest.raises(ValueError, match="non-finite"):
        detect_divergence(losses).rescue_last_event()


def test_spike_open_at_the_end_of_the_sequence_is_full():
    losses = list(_noisy_decreasing_loss(100))
    losses[97:] = [50.0, 60.0, 70.0]
    record = detect_divergence(losses)
    assert [(e.kind, e.start_step, e.end_step, e.reason) for e in record.events] == [
        ("full", 97, 99, "unrecovered_at_end")
    ]
