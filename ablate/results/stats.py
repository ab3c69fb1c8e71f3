"""Paired statistics of an ablation: how far a delta moves a metric from the baseline at the same seed.

Each seed gives one paired change (delta − baseline). Over n seeds the change is reported as
its mean, its sample standard deviation and a 95% paired-t interval,
mean ± t(0.975, n − 1) · std / √n. The change is *significant* when that interval excludes zero.
One seed gives a change but no interval (a t interval needs n ≥ 2): the table says so instead
of printing a misleading one. The noise floor of a sweep is the spread of the baseline itself
across seeds: a change smaller than it is not distinguishable from re-running the baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CONFIDENCE = 0.95
INTERVAL = "95% paired-t interval over seeds"


@dataclass(frozen=True)
class Change:
    n: int
    mean: float
    std: float
    low: float
    high: float

    @property
    def has_interval(self) -> bool:
        return self.n >= 2 and not math.isnan(self.low)

    @property
    def significant(self) -> bool:
        return self.has_interval and (self.low > 0 or self.high < 0)


def mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def std(xs: list[float]) -> float:
    """Sample standard deviation (n − 1); NaN below two values."""
    xs = [x for x in xs if not math.isnan(x)]
    if len(xs) < 2:
        return math.nan
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def paired(changes: list[float], confidence: float = CONFIDENCE) -> Change:
    """Mean, std and paired-t interval of per-seed changes (NaNs left out)."""
    from scipy import stats

    xs = [x for x in changes if not math.isnan(x)]
    n, m, s = len(xs), mean(xs), std(xs)
    if n < 2:
        return Change(n, m, s, math.nan, math.nan)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * s / math.sqrt(n)
    return Change(n, m, s, m - half, m + half)
