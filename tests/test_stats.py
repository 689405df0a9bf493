"""The paired-difference interval on constructed cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sparseft.app.stats import paired_difference


def test_identical_methods_differ_by_exactly_zero() -> None:
    rng = np.random.default_rng(0)
    runs = [rng.integers(0, 2, 500) for _ in range(3)]
    assert paired_difference(runs, runs) == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0}


def test_known_difference_and_interval_width() -> None:
    """The method fixes 10% of the rows and breaks none: d is 1 on 10% of rows, 0 elsewhere, so
    the mean is 0.10 and the 95% interval is 0.10 ± 1.96·sqrt(0.1·0.9/n)."""
    n = 4000
    ref = np.zeros(n, dtype=int)
    ref[: n // 2] = 1
    better = ref.copy()
    better[n // 2 : n // 2 + n // 10] = 1
    out = paired_difference([better], [ref], B=4000)
    assert out["mean"] == pytest.approx(0.10)
    half = 1.96 * math.sqrt(0.1 * 0.9 / n)
    assert out["ci_low"] == pytest.approx(0.10 - half, abs=0.15 * half)
    assert out["ci_high"] == pytest.approx(0.10 + half, abs=0.15 * half)


def test_pairing_removes_the_shared_noise() -> None:
    """Two methods that agree on every row but 20 (+10 net) have a tight interval around
    10/n although each accuracy alone carries ±1.4 points of sampling noise."""
    n = 2000
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 2, n)
    other = ref.copy()
    flip = np.flatnonzero(ref == 0)[:15]
    other[flip] = 1
    other[np.flatnonzero(ref == 1)[:5]] = 0
    out = paired_difference([other], [ref])
    assert out["mean"] == pytest.approx(10 / n)
    assert out["ci_high"] - out["ci_low"] < 0.01
    assert out["ci_low"] > 0


def test_pooled_is_the_mean_of_tasks_and_seeds_are_resampled() -> None:
    n = 1000
    ref = np.zeros(n, dtype=int)
    up = ref.copy()
    up[:100] = 1  # +0.10 on task a
    down = ref.copy()
    seeds_a = [up, up]
    seeds_b = [ref, ref]
    out = paired_difference({"a": seeds_a, "b": seeds_b}, {"a": [ref, ref], "b": [ref, ref]})
    assert out["mean"] == pytest.approx(0.05)
    assert out["ci_low"] < 0.05 < out["ci_high"]
    # seed-to-seed spread widens the interval: one seed +0.1, the other 0
    wide = paired_difference([up, down], [ref, ref])
    narrow = paired_difference([up, up], [ref, ref])
    assert wide["mean"] == pytest.approx(0.05)
    assert (wide["ci_high"] - wide["ci_low"]) > 2 * (narrow["ci_high"] - narrow["ci_low"])


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="shapes"):
        paired_difference([np.zeros(5)], [np.zeros(6)])
