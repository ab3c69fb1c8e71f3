"""Speed and cost with their noise.

An arm's speed is its median step time over log windows, warm-up left out (result.json keeps the
windows): a stall, an evaluation or a neighbour's job on a shared node moves a median less than a
mean. A delta's speed is the baseline's median step time over its own at the same seed, averaged
over seeds in log space; its interval covers the windows (a bootstrap of each median) and, with
two or more seeds, the spread between seeds. An arm whose step time drifted by more than `DRIFT`
between the first and the last third of its windows (a shared or throttled node) is flagged. Cost
(GPU-hours) follows from the median.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ablate.results import stats

if TYPE_CHECKING:
    from ablate.results.rank import ArmResult

DRIFT = 1.25  # a step time this much slower (or faster) at the end than at the start is flagged
RESAMPLES = 400
_SEED = 11


def _step_s(arm: ArmResult | None) -> float:
    return 1 / arm.batches_per_s if arm is not None and arm.batches_per_s else math.nan


def _window_medians(arm: ArmResult, rng: np.random.Generator) -> np.ndarray | None:
    """The median step time over a bootstrap of the arm's log windows, (RESAMPLES,); None without them."""
    windows = np.array(arm.throughput.windows) if arm.throughput is not None else np.array([])
    if len(windows) < 3:
        return None
    draws = rng.integers(0, len(windows), size=(RESAMPLES, len(windows)))
    return np.median(windows[draws], axis=1)


def speed_interval(pairs: list[tuple[ArmResult, ArmResult]]) -> tuple[float, float, float]:
    """(ratio, low, high): the delta's speed over the baseline's (geometric mean over paired seeds) and its
    95% interval over windows and seeds; NaNs where the windows are missing."""
    logs = [math.log(_step_s(b) / _step_s(a)) for a, b in pairs if _step_s(a) > 0 and _step_s(b) > 0]
    if not logs:
        return math.nan, math.nan, math.nan
    ratio = math.exp(sum(logs) / len(logs))
    rng = np.random.default_rng(_SEED)
    boots = []
    for a, b in pairs:
        ma, mb = _window_medians(a, rng), _window_medians(b, rng)
        if ma is None or mb is None:
            return ratio, math.nan, math.nan
        boots.append(np.log(mb) - np.log(ma))
    centred = np.mean(boots, axis=0) - np.mean(boots) + math.log(ratio)  # around the estimate
    var = float(np.var(centred, ddof=1)) + (float(np.var(logs, ddof=1)) / len(logs) if len(logs) > 1 else 0.0)
    half = stats.t_quantile(len(logs) - 1 if len(logs) > 1 else math.inf) * math.sqrt(var)
    return ratio, math.exp(math.log(ratio) - half), math.exp(math.log(ratio) + half)


def drifted(group: list[ArmResult]) -> float:
    """The largest drift (last third's median step time over the first third's) beyond DRIFT among the
    arms of a delta, NaN when none drifted."""
    found = [a.throughput.drift for a in group if a.throughput is not None and a.throughput.drift]
    worst = max(found, key=lambda d: abs(math.log(d)), default=math.nan)
    return worst if not math.isnan(worst) and (worst > DRIFT or worst < 1 / DRIFT) else math.nan


def cost_columns(group: list[ArmResult], baseline: dict[int, ArmResult], devices: int) -> dict[str, Any]:
    """A delta's speed and GPU-hours, and both relative to the baseline at the same seed."""

    def hours(arm: ArmResult | None) -> float:
        if arm is None or not arm.steps or math.isnan(step_s := _step_s(arm)):
            return math.nan
        return arm.steps * step_s / 3600 * devices

    paired = [(a, b) for a in group if (b := baseline.get(a.seed)) is not None and a is not b]
    ratio, low, high = speed_interval(paired) if paired else (math.nan, math.nan, math.nan)
    return {
        "batches_per_s": stats.mean([a.batches_per_s for a in group if a.batches_per_s]),
        "throughput_ratio": ratio,
        "speed_low": low,
        "speed_high": high,
        "speed_drift": drifted(group),
        "gpu_hours": stats.mean([hours(a) for a in group]),
        "cost_ratio": stats.mean([hours(a) / hours(b) for a, b in paired if hours(b) > 0]),
    }
