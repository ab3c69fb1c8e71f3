"""The statistics of a verdict: how far a delta moves a metric from the baseline, and how sure that is.

A delta's change is paired by seed: d_s = delta − baseline at the same seed, averaged over the seeds
both ran. Two noises blur it, and every interval says which it covers:

- **seed**: training again with another seed moves the metric. With two or more seeds the paired
  changes' variance is *moderated* (Smyth 2004, limma's squeezeVar): each delta's own variance is
  shrunk toward the variance pooled over every delta of the metric (twice the residual variance of an
  arm + seed fit, which also uses a baseline's extra seeds), with the prior's degrees of freedom
  estimated from the spread of the deltas' variances (limma's fitFDist) and capped at the pooled fit's,
  so seven deltas at two seeds get t with up to 7 df instead of 1. `interval="paired-t"` keeps each
  delta's own variance (n − 1 df).
- **eval**: the metric is measured on a finite prompt set. Each eval step keeps the metric on B
  resamples of its prompts, the same resamples for every arm, so Δ*_b = delta_b − baseline_b is a
  paired bootstrap over prompts. Its variance is added to the seed term; at one seed it is the whole
  interval (a measurement interval: it says nothing of training noise).

A significance mark controls the false-discovery rate over every delta × metric of the table
(Benjamini–Hochberg, or Holm's family-wise rule): each change gets its adjusted q. For a change not
yet resolved, `seeds_needed` says how many seeds would resolve one of its size at 80% power.
Distributions come from scipy.special (t, noncentral t); `../shared/notes/verdict-statistics.md` has
the formulas and their Monte Carlo checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
ALPHA = 0.05  # the false-discovery rate (BH) or family-wise error rate (Holm) a mark controls
POWER = 0.8
INTERVALS = ("moderated", "paired-t")
RULES = ("bh", "holm")
SEED, SEED_EVAL, EVAL = "seed", "seed+eval", "eval"


@dataclass
class Change:
    """One delta's change in one metric, with the interval of the noise it covers."""

    mean: float
    n: int
    """seeds paired with the baseline"""
    low: float = math.nan
    high: float = math.nan
    p: float = math.nan
    noise: str = ""
    """what the interval covers: seed, seed+eval, eval; '' when there is none"""
    df: float = math.nan
    """the t quantile's degrees of freedom (inf: the bootstrap's own quantiles)"""
    sd: float = math.nan
    """the paired changes' standard deviation over seeds, moderated (nan without one)"""
    eval_sd: float = math.nan
    """the standard deviation of the seed-averaged change over prompt resamples (nan without them)"""
    q: float = math.nan
    """p adjusted over the whole table (filled by `adjust`)"""
    significant: bool = False
    seeds_needed: int | None = None
    """seeds that would resolve a change of this size at 80% power (None: resolved, or unknown)"""


def t_quantile(df: float, p: float = 0.5 + CONFIDENCE / 2) -> float:
    from scipy.special import ndtri, stdtrit

    return float(ndtri(p)) if math.isinf(df) else float(stdtrit(df, p))


def t_pvalue(t: float, df: float) -> float:
    """Two-sided p of a t statistic."""
    from scipy.special import ndtr, stdtr

    cdf = ndtr(-abs(t)) if math.isinf(df) else stdtr(df, -abs(t))
    return float(min(1.0, 2.0 * cdf))


def two_way_variance(values: dict[tuple[str, int], float]) -> tuple[float, int]:
    """(σ², its df): the residual variance of y = μ + arm + seed + ε over every (arm, seed) value there is
    (least squares on indicator columns, so an unbalanced table, e.g. a baseline with extra seeds, is
    fine); (nan, 0) when nothing is left over."""
    cells = [(a, s, v) for (a, s), v in values.items() if math.isfinite(v)]
    arms, seeds = sorted({a for a, _, _ in cells}), sorted({s for _, s, _ in cells})
    if not cells:
        return math.nan, 0
    if len(cells) == len(arms) * len(seeds):  # complete: the closed form, no least squares of a large table
        rows, cols = {a: i for i, a in enumerate(arms)}, {s: j for j, s in enumerate(seeds)}
        y = np.empty((len(arms), len(seeds)))
        for a, s, v in cells:
            y[rows[a], cols[s]] = v
        df = (len(arms) - 1) * (len(seeds) - 1)
        resid = y - y.mean(1, keepdims=True) - y.mean(0, keepdims=True) + y.mean()
        return (float((resid**2).sum() / df), df) if df > 0 else (math.nan, 0)
    x = np.zeros((len(cells), len(arms) + len(seeds)))
    for i, (a, s, _) in enumerate(cells):
        x[i, arms.index(a)], x[i, len(arms) + seeds.index(s)] = 1.0, 1.0
    y = np.array([v for _, _, v in cells])
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    df = len(cells) - int(np.linalg.matrix_rank(x))
    return (float(((y - x @ beta) ** 2).sum() / df), df) if df > 0 else (math.nan, 0)


def _trigamma_inverse(v: float) -> float:
    """y with ψ'(y) = v, by limma's Newton iteration (trigammaInverse)."""
    from scipy.special import polygamma

    if v > 1e7:
        return 1.0 / math.sqrt(v)
    if v < 1e-6:
        return 1.0 / v
    y = 0.5 + 1.0 / v
    for _ in range(50):
        tri = float(polygamma(1, y))
        step = tri * (1.0 - tri / v) / float(polygamma(2, y))
        y += step
        if -step / y < 1e-8:
            break
    return y


def prior_df(variances: list[float], dfs: list[int]) -> float:
    """The prior degrees of freedom d0 of the deltas' variances (limma's fitFDist, by moments of log s²);
    inf when their spread is no more than sampling alone gives (every delta then shares one variance)."""
    from scipy.special import digamma, polygamma

    if len(variances) < 2:
        return math.inf
    s2, d = np.array(variances), np.array(dfs, float)
    s2 = np.maximum(s2, 1e-5 * np.median(s2)) if np.median(s2) > 0 else np.maximum(s2, 1e-300)
    e = np.log(s2) - digamma(d / 2) + np.log(d / 2)
    v = float(np.var(e, ddof=1) - np.mean(polygamma(1, d / 2)))
    return 2.0 * _trigamma_inverse(v) if v > 0 else math.inf


@dataclass(frozen=True)
class Pooled:
    """What a metric's deltas share: the prior variance of a paired change (s0²) and its df (d0, capped
    at the pooled fit's df)."""

    s0_2: float
    d0: float
    cap: int

    @classmethod
    def of(cls, values: dict[tuple[str, int], float], changes: dict[str, list[float]]) -> Pooled:
        sigma2, cap = two_way_variance(values)
        own = [(float(np.var(d, ddof=1)), len(d) - 1) for d in changes.values() if len(d) >= 2]
        d0 = prior_df([s for s, _ in own], [k for _, k in own]) if own else math.inf
        return cls(2.0 * sigma2, min(d0, cap), cap)

    def moderated(self, changes: list[float]) -> tuple[float, float]:
        """(s̃², df) of one delta's paired changes: its own variance shrunk toward s0²."""
        d = len(changes) - 1
        own = float(np.var(changes, ddof=1)) if d >= 1 else 0.0
        if self.cap == 0 or math.isnan(self.s0_2):
            return (own, d) if d >= 1 else (math.nan, 0)
        s2 = self.s0_2 if math.isinf(self.d0) else (self.d0 * self.s0_2 + d * own) / (self.d0 + d)
        return s2, min(self.d0 + d, self.cap)


def seed_change(changes: list[float], pooled: Pooled | None, boot: np.ndarray | None) -> Change:
    """A delta's change over its paired seeds: moderated with `pooled` (plain paired t without), with the
    eval resamples' variance `boot` (the seed-averaged Δ*) added when every pair kept them."""
    n, mean = len(changes), float(np.mean(changes)) if changes else math.nan
    if n == 0:
        return Change(math.nan, 0)
    s2, df = pooled.moderated(changes) if pooled is not None else _own(changes)
    eval_var = float(np.var(boot, ddof=1)) if boot is not None else math.nan
    if df < 1 or math.isnan(s2):
        return eval_change(mean, n, boot) if boot is not None else Change(mean, n)
    se = math.sqrt(s2 / n + (0.0 if math.isnan(eval_var) else eval_var))
    change = Change(
        mean, n, df=df, sd=math.sqrt(s2), eval_sd=math.sqrt(eval_var) if eval_var >= 0 else math.nan
    )
    change.noise = SEED if math.isnan(eval_var) else SEED_EVAL
    if se == 0:
        change.low = change.high = mean
        change.p = 1.0 if mean == 0 else 0.0
        return change
    half = t_quantile(df) * se
    change.low, change.high, change.p = mean - half, mean + half, t_pvalue(mean / se, df)
    return change


def _own(changes: list[float]) -> tuple[float, float]:
    return (float(np.var(changes, ddof=1)), len(changes) - 1) if len(changes) >= 2 else (math.nan, 0)


def eval_change(mean: float, n: int, boot: np.ndarray) -> Change:
    """The measurement interval of a change: the bootstrap distribution of Δ* over prompt resamples,
    centred on the change (its resampling bias removed), percentile endpoints; p from the same."""
    centred = np.asarray(boot, float) - float(np.mean(boot)) + mean
    low, high = np.quantile(centred, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    b = len(centred)
    below, above = (np.sum(centred <= 0) + 1) / (b + 1), (np.sum(centred >= 0) + 1) / (b + 1)
    return Change(mean, n, float(low), float(high), float(min(1.0, 2 * min(below, above))), EVAL, math.inf,
                  eval_sd=float(np.std(boot, ddof=1)))  # fmt: skip


def adjust(changes: list[Change], rule: str = "bh", alpha: float = ALPHA) -> None:
    """Fill q and `significant` over the whole family (every change with a p): Benjamini–Hochberg adjusted
    p-values (scipy's false_discovery_control formula), or Holm's step-down."""
    tested = [c for c in changes if not math.isnan(c.p)]
    if not tested:
        return
    p = np.array([c.p for c in tested])
    order, m = np.argsort(p), len(p)
    if rule == "bh":
        ranked = p[order] * m / np.arange(1, m + 1)
        q_sorted = np.minimum.accumulate(ranked[::-1])[::-1]
    elif rule == "holm":
        q_sorted = np.maximum.accumulate(p[order] * (m - np.arange(m)))
    else:
        raise ValueError(f"unknown multiplicity rule {rule!r}; one of: {', '.join(RULES)}")
    q = np.empty(m)
    q[order] = np.minimum(q_sorted, 1.0)
    for change, value in zip(tested, q, strict=True):
        change.q, change.significant = float(value), bool(value <= alpha)


def next_level(changes: list[Change], rule: str = "bh", alpha: float = ALPHA) -> float:
    """The p a change not yet marked must reach to be marked too, the others' verdicts as they are: the
    next Benjamini–Hochberg step, alpha·(R+1)/m, or Holm's, alpha/(m−R), with R of m changes marked."""
    tested = [c for c in changes if not math.isnan(c.p)]
    m, marked = len(tested), sum(c.significant for c in tested)
    if m == 0 or marked == m:
        return alpha
    return alpha * (marked + 1) / m if rule == "bh" else alpha / (m - marked)


def power(n: int, effect: float, sd: float, df: float, alpha: float = ALPHA) -> float:
    """Two-sided power of the paired t at level `alpha` at n seeds against a change `effect` whose seed
    spread is `sd`."""
    from scipy.special import nctdtr

    if df < 1:
        return math.nan
    crit, shift = t_quantile(df, 1 - alpha / 2), abs(effect) * math.sqrt(n) / sd
    return float(1.0 - nctdtr(df, shift, crit) + nctdtr(df, shift, -crit))


def seeds_needed(change: Change, pooled: Pooled | None, most: int = 64, alpha: float = ALPHA) -> int | None:
    """The seeds (in all) that would resolve a change of `change.mean` at 80% power at level `alpha`
    (`next_level` in a table), with the moderated seed spread and the df it would have at that many
    seeds; None when it cannot be said (no spread yet) or more than `most` would be needed."""
    if math.isnan(change.sd) or change.sd == 0 or math.isnan(change.mean) or change.mean == 0:
        return None
    from scipy.special import ndtri

    extra = 0.0 if pooled is None else (pooled.d0 if math.isfinite(pooled.d0) else pooled.cap)
    # the z test's size is a lower bound of the t test's: start there (a few power evaluations, not dozens)
    z = math.ceil(((ndtri(1 - alpha / 2) + ndtri(POWER)) * change.sd / abs(change.mean)) ** 2)
    for n in range(max(change.n, 2, z), most + 1):
        if power(n, change.mean, change.sd, extra + n - 1, alpha) >= POWER:
            return n
    return None


def mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan
