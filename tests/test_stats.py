"""Paired statistics of the claims table: known answers for the difference, McNemar's p, the
bootstraps and the verdict."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scicevpr.stats import VERDICTS, mcnemar_exact_p, paired_difference, seed_differences, verdict


def pair(both: int, only_a: int, only_b: int, neither: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) correctness over both + only_a + only_b + neither queries, in a seeded order."""
    a = np.array([1] * both + [1] * only_a + [0] * only_b + [0] * neither, bool)
    b = np.array([1] * both + [0] * only_a + [1] * only_b + [0] * neither, bool)
    order = np.random.default_rng(seed).permutation(a.size)
    return a[order], b[order]


def test_identical_models_differ_by_nothing_with_p_one():
    a = np.random.default_rng(0).random(300) < 0.4
    d = paired_difference(a, a.copy())
    assert (d.diff, d.lo, d.hi, d.p, d.only_a, d.only_b, d.num_queries) == (0.0, 0.0, 0.0, 1.0, 0, 0, 300)
    s = seed_differences([(a, a), (a, a), (a, a)])
    assert (s.mean, s.min, s.max, s.lo, s.hi) == (0.0, 0.0, 0.0, 0.0, 0.0)
    assert verdict(s.lo, s.hi) == "inconclusive"


def test_mcnemar_exact_p_known_values():
    # 10 vs 2 discordant: 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096
    assert mcnemar_exact_p(10, 2) == pytest.approx(2 * 79 / 4096, rel=1e-12)
    assert mcnemar_exact_p(2, 10) == mcnemar_exact_p(10, 2)
    assert mcnemar_exact_p(5, 5) == 1.0 and mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(6, 0) == pytest.approx(2 / 64)
    assert 0 < mcnemar_exact_p(3000, 2000) < 1e-40  # large n in log space, no overflow
    with pytest.raises(ValueError, match=">= 0"):
        mcnemar_exact_p(-1, 2)


def test_paired_difference_counts_discordant_queries():
    a, b = pair(both=200, only_a=10, only_b=2, neither=288)
    d = paired_difference(a, b)
    assert d.diff == pytest.approx(100 * 8 / 500) and (d.only_a, d.only_b) == (10, 2)
    assert d.p == pytest.approx(2 * 79 / 4096)
    assert d.lo <= d.diff <= d.hi
    assert paired_difference(a, b) == d  # seeded: the same interval every time
    assert paired_difference(b, a).diff == -d.diff


def test_paired_interval_is_narrower_than_two_unpaired_ones():
    """The point of pairing: 40 queries more for a, none fewer, is clear though both R@1 are near 50."""
    a, b = pair(both=230, only_a=40, only_b=0, neither=230)
    d = paired_difference(a, b)
    assert d.lo > 0 and d.p < 1e-10
    assert d.hi - d.lo < 6.0  # unpaired 95% intervals of 54 and 46 on 500 queries are ~9 points wide each


def test_seed_differences_mean_min_max_and_an_interval_that_excludes_zero():
    pairs = [pair(200, 30, 5, 265, seed=s) for s in range(3)] + [pair(200, 20, 5, 275, seed=3)]
    s = seed_differences(pairs)
    per = [100 * 25 / 500] * 3 + [100 * 15 / 500]
    assert [x.diff for x in s.per_seed] == pytest.approx(per)
    assert s.mean == pytest.approx(np.mean(per)) and (s.min, s.max) == pytest.approx((3.0, 5.0))
    assert 0 < s.lo <= s.mean <= s.hi
    assert verdict(s.lo, s.hi, +1) == "agrees" and verdict(s.lo, s.hi, -1) == "contradicts"
    assert s.num_seeds == 4 and len(s.p_values) == 4


def test_two_level_bootstrap_holds_the_spread_between_seeds():
    """Seeds that disagree in sign give an interval of the mean that spans 0, though each seed's
    own query interval excludes 0: the seeds' spread is part of the uncertainty."""
    up, down = pair(200, 40, 0, 260, seed=0), pair(200, 0, 40, 260, seed=1)
    assert paired_difference(*up).lo > 0 and paired_difference(*down).hi < 0
    s = seed_differences([up, down, up, down])
    assert s.lo < 0 < s.hi and verdict(s.lo, s.hi) == "inconclusive"
    assert (s.min, s.max) == (-8.0, 8.0)


def test_verdict_rules_and_inputs_checked():
    assert verdict(0.5, 3.0) == "agrees" and verdict(-3.0, -0.5) == "contradicts"
    assert verdict(-3.0, -0.5, direction=-1) == "agrees" and verdict(-1.0, 1.0) == "inconclusive"
    assert verdict(0.0, 2.0) == "inconclusive"  # touching 0 is not excluding it
    assert set(VERDICTS) == {"agrees", "contradicts", "inconclusive"}
    with pytest.raises(ValueError, match="direction"):
        verdict(1.0, 2.0, direction=0)
    with pytest.raises(ValueError, match="not ordered"):
        verdict(2.0, 1.0)
    with pytest.raises(ValueError, match="same queries"):
        paired_difference(np.ones(3, bool), np.ones(4, bool))
    with pytest.raises(ValueError, match="at least one seed"):
        seed_differences([])
    assert math.isfinite(paired_difference(np.ones(1, bool), np.zeros(1, bool)).p)
