"""The statistics of a comparison over seeds, from scipy rather than hand-written formulas.

A seed fixes the partitions and the common initial model, so two variants' runs of one
seed are paired: the test is the paired t-test on the per-seed differences of the
client means (``scipy.stats.ttest_rel``), its interval the matching t-interval.

Multiplicity. A grid declares its primary comparisons before the runs (``grid.primary``);
they form one family, tested with the Bonferroni correction: each at level
``alpha / m`` for ``m`` comparisons, with adjusted p-values ``min(1, m p)``. Bonferroni,
not Holm, because its corrected intervals and its adjusted p-values always agree (a
difference is called exactly when its corrected interval excludes zero); Holm would call
the same or a few more. Every other difference a report shows is exploratory: an
uncorrected 95 % interval and p-value, labelled as such.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05


def sample_std(values: Sequence[float]) -> float:
    """The sample standard deviation (n - 1 in the denominator); NaN below two values."""
    if len(values) < 2:
        return float("nan")
    return float(np.std(values, ddof=1))


def t_interval_half_width(values: Sequence[float], confidence: float = 1 - ALPHA) -> float:
    """Half-width of the t-interval of the mean of ``values`` (NaN below two values)."""
    n = len(values)
    if n < 2:
        return float("nan")
    return float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sample_std(values) / math.sqrt(n))


@dataclass(frozen=True)
class PairedTest:
    """``a - b`` over the seeds both have: mean, interval at ``confidence``, the raw
    two-sided p-value and the p-value adjusted for the family it was tested in (the
    raw one for an exploratory test)."""

    seeds: int
    mean: float
    low: float
    high: float
    p: float
    p_adjusted: float
    confidence: float

    @property
    def verdict(self) -> str:
        """Called only when the interval excludes 0 (equivalently, ``p_adjusted <
        1 - confidence`` for the family's own level)."""
        if self.seeds < 2:
            return f"not called ({self.seeds} seed)"
        if self.low > 0:
            return "higher"
        if self.high < 0:
            return "lower"
        return "not called"


def paired_test(
    a: Sequence[float], b: Sequence[float], family_size: int = 1, alpha: float = ALPHA
) -> PairedTest:
    """The paired t-test of ``a - b`` (seed-aligned sequences), Bonferroni-corrected for
    a family of ``family_size`` tests (1: uncorrected)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    if family_size < 1:
        raise ValueError(f"family_size must be >= 1, got {family_size}")
    diffs = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(diffs)
    confidence = 1 - alpha / family_size
    mean = float(diffs.mean()) if n else float("nan")
    if n < 2:
        nan = float("nan")
        return PairedTest(n, mean, nan, nan, nan, nan, confidence)
    if np.all(diffs == diffs[0]):  # no spread: the t statistic is undefined
        p = 0.0 if diffs[0] != 0 else 1.0
        return PairedTest(n, mean, mean, mean, p, min(1.0, p * family_size), confidence)
    result = stats.ttest_rel(a, b)
    interval = result.confidence_interval(confidence)
    p = float(result.pvalue)
    return PairedTest(
        n, mean, float(interval.low), float(interval.high), p, min(1.0, p * family_size), confidence
    )
