"""Paired comparisons of two models on the same queries, over one or several training seeds.

Two models evaluated on the same queries are compared query by query, not by their two
intervals: with 500 queries, two R@1 intervals overlap for differences of several points that
a paired test resolves, because most queries are found (or missed) by both models.

- :func:`paired_difference`: one seed. The difference in R@1 (points, ``a - b``), its paired
  bootstrap interval (the queries resampled jointly for both models) and McNemar's exact p
  (a two-sided binomial test on the discordant queries: found by one model only).
- :func:`seed_differences`: several seeds. Mean, min and max of the per-seed differences and an
  interval of the mean from a two-level bootstrap: resample the seeds with replacement, then
  within each drawn seed the queries with replacement (one query resample for both models of
  the seed), so that the interval holds both the training noise and the query sample's.
- :func:`verdict`: "agrees" / "contradicts" when that interval excludes 0 in the direction the
  paper claims / the opposite one, else "inconclusive".

Every bootstrap draws from a seeded :class:`numpy.random.Generator`: the same inputs give the
same interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

VERDICTS = ("agrees", "contradicts", "inconclusive")


def _as_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired comparison needs two (N_q,) boolean arrays over the same queries; got shapes "
                         f"{a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("paired comparison needs at least one query")
    return a.astype(bool), b.astype(bool)


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """McNemar's exact two-sided p: under "both models are equally good", each of the
    ``n = only_a + only_b`` discordant queries (found by one model only) is one model's with
    probability 1/2, so ``min(only_a, only_b)`` is Binomial(n, 1/2); p = twice its lower tail,
    at most 1. No discordant query: p = 1."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be >= 0, got {only_a} and {only_b}")
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    # sum_{i <= k} C(n, i) / 2^n in log space (n can be in the thousands)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2.0) for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return float(min(1.0, 2.0 * tail))


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` in R@1 (percentage points) on one seed's queries.

    Attributes:
        diff: R@1(a) - R@1(b), points.
        lo, hi: the paired-bootstrap interval of ``diff``.
        p: McNemar's exact p (:func:`mcnemar_exact_p`).
        only_a, only_b: queries found by ``a`` only / by ``b`` only.
        num_queries: N_q.
    """

    diff: float
    lo: float
    hi: float
    p: float
    only_a: int
    only_b: int
    num_queries: int


def paired_difference(a: np.ndarray, b: np.ndarray, level: float = 0.95, num_samples: int = 2000,
                      seed: int = 0) -> PairedDifference:
    """The paired difference ``a - b`` of two models' per-query correctness at R@1.

    Args:
        a, b: (N_q,) bool, query i found at rank 1 (``EvalResult.correct[:, 0]``), same queries.
        level: of the percentile bootstrap interval; num_samples: resamples; seed: of the resampling.
    """
    a, b = _as_pair(a, b)
    _check_level(level)
    d = a.astype(np.int8) - b.astype(np.int8)  # (N_q,) in {-1, 0, 1}
    rng = np.random.default_rng(seed)
    sample = rng.integers(0, d.size, size=(num_samples, d.size))  # (S, N_q) query indices, both models
    boot = d[sample].mean(1) * 100.0  # (S,)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    return PairedDifference(float(d.mean() * 100.0), float(lo), float(hi), mcnemar_exact_p(only_a, only_b),
                            only_a, only_b, int(d.size))


@dataclass(frozen=True)
class SeedDifferences:
    """``a - b`` in R@1 (points) over training seeds.

    Attributes:
        per_seed: one :class:`PairedDifference` per seed, in the order given.
        mean, min, max: of the per-seed differences.
        lo, hi: the two-level bootstrap interval of the mean difference (:func:`seed_differences`).
    """

    per_seed: tuple[PairedDifference, ...]
    mean: float
    min: float
    max: float
    lo: float
    hi: float

    @property
    def num_seeds(self) -> int:
        return len(self.per_seed)

    @property
    def p_values(self) -> tuple[float, ...]:
        return tuple(s.p for s in self.per_seed)


def seed_differences(pairs: Sequence[tuple[np.ndarray, np.ndarray]], level: float = 0.95, num_samples: int = 2000,
                     seed: int = 0) -> SeedDifferences:
    """``a - b`` over several training seeds: ``pairs[s] = (a_s, b_s)``, the two models of seed s
    on the same queries (:func:`paired_difference`'s inputs).

    The interval of the mean difference is a two-level percentile bootstrap: each of
    ``num_samples`` draws picks S seeds with replacement and, for each seed picked, resamples its
    queries with replacement (one resample for both models of that seed), then averages the S
    differences. With one seed it is the paired query bootstrap.
    """
    if not pairs:
        raise ValueError("seed_differences needs the (a, b) pair of at least one seed")
    _check_level(level)
    diffs = [_as_pair(a, b) for a, b in pairs]
    per_seed = tuple(paired_difference(a, b, level, num_samples, seed) for a, b in diffs)
    d = [a.astype(np.int8) - b.astype(np.int8) for a, b in diffs]  # S arrays (N_q,) in {-1, 0, 1}
    S = len(d)
    rng = np.random.default_rng(seed)
    picked = rng.integers(0, S, size=(num_samples, S))  # (num_samples, S) seeds drawn
    # For each seed, a query resample for every (draw, position) slot: (num_samples, S) means.
    # Only the slots where that seed was drawn are used, so every drawn seed gets its own resample.
    boot = np.zeros((num_samples, S))
    for j, dj in enumerate(d):
        slots = picked == j  # (num_samples, S)
        n = int(slots.sum())
        if n:
            q = rng.integers(0, dj.size, size=(n, dj.size))  # (n, N_q)
            boot[slots] = dj[q].mean(1) * 100.0
    means = boot.mean(1)  # (num_samples,)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    values = np.array([s.diff for s in per_seed])
    return SeedDifferences(per_seed, float(values.mean()), float(values.min()), float(values.max()), float(lo), float(hi))


def verdict(lo: float, hi: float, direction: int = 1) -> str:
    """``"agrees"`` when the interval ``[lo, hi]`` of the mean difference excludes 0 on the side the
    paper claims (``direction=+1``: a > b; ``-1``: a < b), ``"contradicts"`` when it excludes 0 on
    the other side, else ``"inconclusive"`` (the data cannot tell the direction)."""
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 (the paper claims a > b) or -1 (a < b), got {direction!r}")
    if lo > hi:
        raise ValueError(f"interval [{lo}, {hi}] is not ordered")
    if lo > 0:
        return "agrees" if direction == 1 else "contradicts"
    if hi < 0:
        return "agrees" if direction == -1 else "contradicts"
    return "inconclusive"
