from __future__ import annotations

import math

import pytest

from coordinator.routing import DecayedStat
from coordinator.routing.measurements import NodeMeasurements


def test_mean_of_simultaneous_observations_counts_each() -> None:
    stat = DecayedStat(half_life_s=10.0)
    stat.observe(1.0, 0.0)
    stat.observe(3.0, 0.0)
    assert stat.mean == pytest.approx(2.0)
    assert stat.stdev == pytest.approx(1.0)


def test_old_observations_weigh_half_after_one_half_life() -> None:
    stat = DecayedStat(half_life_s=10.0)
    stat.observe(0.0, 0.0)
    stat.observe(3.0, 10.0)
    # weights 0.5 and 1: (0 * 0.5 + 3 * 1) / 1.5
    assert stat.mean == pytest.approx(2.0)
    assert stat.weight_at(20.0) == pytest.approx(0.75)


def test_unmeasured_stat_has_no_mean_and_ignores_non_finite() -> None:
    stat = DecayedStat(half_life_s=1.0)
    stat.observe(math.nan, 0.0)
    stat.observe(math.inf, 0.0)
    assert not stat.measured
    assert stat.mean is None and stat.stdev is None and stat.p90 is None


def test_p90_above_mean_with_spread() -> None:
    stat = DecayedStat(half_life_s=100.0)
    for value in (0.1, 0.2, 0.3, 0.4):
        stat.observe(value, 1.0)
    assert stat.p90 is not None and stat.mean is not None
    assert stat.p90 > stat.mean


def test_half_life_must_be_positive() -> None:
    with pytest.raises(ValueError, match="half_life_s"):
        DecayedStat(0.0)


def test_reliability_starts_at_one_and_drops_with_failures() -> None:
    measurements = NodeMeasurements(60.0, 600.0)
    assert measurements.summary().reliability == 1.0
    measurements.outcomes.observe(0.0, 0.0)
    assert measurements.summary().reliability == pytest.approx(2 / 3)
    for _ in range(20):
        measurements.outcomes.observe(1.0, 1.0)
    assert measurements.summary().reliability > 0.95
