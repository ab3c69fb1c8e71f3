"""Ranking: how far each delta moves each `rank_by` metric away from the baseline.

Reads only run directories. For every delta and seed, the arm is paired with the baseline
arm of the same seed at the same step; the per-seed changes (delta − baseline, and relative
to the baseline in %) and throughput ratios (batches/s of the delta over the baseline's) are
averaged over seeds (with their standard deviation when there are several). Deltas are
sorted by the first metric's improvement, direction-aware (most improving first); arms that
are missing, running or failed are listed with their state, never dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from ablate.errors import UserError
from ablate.results import stats
from ablate.running.store import observe
from ablate.sweep.schema import BASELINE, Sweep, arm_name
from core.atomic import Unreadable
from core.rundir import DONE, UNREADABLE, RunDir

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class ArmResult:
    name: str
    delta: str
    seed: int
    state: str
    metrics_by_step: dict[int, dict[str, float]] = field(default_factory=dict)
    batches_per_s: float | None = None
    steps: int | None = None
    """steps trained (for GPU-hours)"""
    note: str = ""
    """why the arm is unreadable (the file named), from `observe` or its metrics and result"""


def collect(sweep: Sweep) -> list[ArmResult]:
    """Each arm's state, its metrics per step (eval/step_<N>.json, written during training and by
    `ablate eval`) and, once done, its throughput (result.json). An arm with a corrupt record is
    listed as unreadable, without numbers, its note naming the file; the other arms are unaffected."""
    arms = []
    for delta in (BASELINE, *sweep.deltas):
        for seed in sweep.seeds:
            run = RunDir(sweep.root / arm_name(delta, seed))
            view = observe(run.path, check_jobs=False)
            arm = ArmResult(
                view.name, delta, seed, view.state, note=view.note if view.state == UNREADABLE else ""
            )
            if view.state == UNREADABLE:
                arms.append(arm)
                continue
            try:
                arm.metrics_by_step = run.metrics_by_step()
                result = run.read_result() if view.state == DONE else None
            except Unreadable as e:
                arm.state, arm.metrics_by_step, result, arm.note = UNREADABLE, {}, None, str(e)
            except OSError as e:  # eval/ is not a folder it can read
                arm.state, arm.metrics_by_step, result = UNREADABLE, {}, None
                arm.note = f"{e.filename or run.eval_dir}: unreadable ({e.strerror or type(e).__name__})"
            if result is not None:
                arm.batches_per_s, arm.steps = result.throughput.batches_per_s, result.step
            arms.append(arm)
    return arms


def default_step(arms: list[ArmResult]) -> int | None:
    """The last step that every finished arm has metrics for (every arm with metrics, if none finished)."""
    finished = [a for a in arms if a.state == DONE and a.metrics_by_step]
    pool = finished or [a for a in arms if a.metrics_by_step]
    if not pool:
        return None
    common = set.intersection(*(set(a.metrics_by_step) for a in pool))
    return max(common) if common else None


def rank_table(
    arms: list[ArmResult],
    metrics: list[tuple[str, str]],
    step: int | None,
    *,
    by: str | None = None,
    devices: int = 1,
) -> pd.DataFrame:
    """One row per delta (baseline first), sorted by the improvement in `by` (default: the first metric).

    Columns: delta, state, seeds ("paired/total"); per metric m: `m` (mean value at `step`),
    `m_change` (mean of delta − baseline over the paired seeds), `m_change_std`, `m_change_pct`
    (mean of 100·(delta − baseline)/|baseline|), `m_ci_low`/`m_ci_high` (stats.INTERVAL; NaN
    below two pairs), `m_pairs`, `m_significant` (the interval excludes zero), `m_noise_floor`
    (the baseline's spread over seeds, on every row); then `batches_per_s`, `throughput_ratio`
    (mean of delta/baseline batches/s), `gpu_hours` (steps ÷ batches/s × `devices`, mean over
    seeds), `cost_ratio` (mean of delta/baseline GPU-hours) and `{first}_change_per_gpu_hour`.
    """
    import pandas as pd

    by_delta: dict[str, list[ArmResult]] = {}
    for arm in arms:
        by_delta.setdefault(arm.delta, []).append(arm)
    baseline = {a.seed: a for a in by_delta.get(BASELINE, [])}
    noise = {m: stats.std([_value(a, m, step) for a in baseline.values()]) for m, _ in metrics}
    rows = []
    for delta, group in by_delta.items():
        row: dict[str, Any] = {"delta": delta, "state": _state_summary(group, step)}
        for i, (metric, _) in enumerate(metrics):
            row |= _metric_columns(metric, delta, group, baseline, step, seeds=i == 0)
            row[f"{metric}_noise_floor"] = noise[metric]
        paired = [(a, baseline.get(a.seed)) for a in group] if delta != BASELINE else []
        row |= _cost_columns(group, paired, devices)
        first = metrics[0][0]
        row[f"{first}_change_per_gpu_hour"] = (
            row[f"{first}_change"] / row["gpu_hours"] if row["gpu_hours"] > 0 else math.nan
        )
        rows.append(row)

    key = by or metrics[0][0]
    direction = dict(metrics)[key]
    sign = -1.0 if direction == "lower" else 1.0

    def order(row: dict[str, Any]) -> tuple[int, float]:
        if row["delta"] == BASELINE:
            return (0, 0.0)
        improvement = sign * row[f"{key}_change"]
        return (2, 0.0) if math.isnan(improvement) else (1, -improvement)

    rows.sort(key=order)  # stable: deltas without numbers keep the sweep's order, at the end
    return pd.DataFrame(rows)


def _value(arm: ArmResult | None, metric: str, step: int | None) -> float:
    if arm is None or step is None:
        return math.nan
    v = arm.metrics_by_step.get(step, {}).get(metric)
    return math.nan if v is None else float(v)


def _metric_columns(
    metric: str,
    delta: str,
    group: list[ArmResult],
    baseline: dict[int, ArmResult],
    step: int | None,
    *,
    seeds: bool,
) -> dict[str, Any]:
    """A delta's columns for one metric: its value and its change against the baseline, paired by seed
    (with `seeds`, also the "paired/total" count)."""
    values = [_value(a, metric, step) for a in group]
    changes, pcts = [], []
    for a, v in zip(group, values, strict=True):
        b = _value(baseline.get(a.seed), metric, step)
        if delta != BASELINE and not (math.isnan(v) or math.isnan(b)):
            changes.append(v - b)
            pcts.append(100.0 * (v - b) / abs(b) if b else math.nan)
    columns: dict[str, Any] = {}
    if seeds:
        counted = len(changes) if delta != BASELINE else sum(not math.isnan(v) for v in values)
        columns["seeds"] = f"{counted}/{len(group)}"
    change = stats.paired(changes)
    columns[metric] = stats.mean(values)
    columns[f"{metric}_change"] = change.mean
    columns[f"{metric}_change_std"] = change.std
    columns[f"{metric}_change_pct"] = stats.mean(pcts)
    columns[f"{metric}_ci_low"], columns[f"{metric}_ci_high"] = change.low, change.high
    columns[f"{metric}_pairs"] = change.n
    columns[f"{metric}_significant"] = change.significant
    return columns


def _cost_columns(
    group: list[ArmResult], paired: list[tuple[ArmResult, ArmResult | None]], devices: int
) -> dict[str, float]:
    """A delta's throughput and GPU-hours, and both relative to the baseline at the same seed."""

    def hours(arm: ArmResult | None) -> float:
        if arm is None or not arm.batches_per_s or not arm.steps:
            return math.nan
        return arm.steps / arm.batches_per_s / 3600 * devices

    return {
        "batches_per_s": stats.mean([a.batches_per_s for a in group if a.batches_per_s]),
        "throughput_ratio": stats.mean(
            [
                a.batches_per_s / b.batches_per_s
                for a, b in paired
                if b and a.batches_per_s and b.batches_per_s
            ]
        ),
        "gpu_hours": stats.mean([hours(a) for a in group]),
        "cost_ratio": stats.mean([hours(a) / hours(b) for a, b in paired if b and hours(b) > 0]),
    }


def _state_summary(group: list[ArmResult], step: int | None) -> str:
    labels = []
    for a in group:
        if a.state == DONE and step is not None and step not in a.metrics_by_step:
            labels.append(f"done, no step {step}")
        else:
            labels.append(a.state)
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    if len(counts) == 1:
        return labels[0]
    return ", ".join(f"{n} {label}" for label, n in counts.items())


class Ranking(NamedTuple):
    table: pd.DataFrame
    step: int | None
    """the step ranked at"""
    arms: list[ArmResult]
    """every arm as read for it (the figures and the report read the same)"""


def rank(sweep: Sweep, step: int | None = None, by: str | None = None) -> Ranking:
    """The ranking table of a sweep at `step` (default: `default_step`) ordered by `by`, the step used, and
    the arms it was made from: the run folders are read once."""
    names = [m for m, _ in sweep.metrics]
    if by is not None and by not in names:
        raise UserError(
            f"'{by}' is not one of the sweep's rank_by metrics", f"one of: {', '.join(names)}", path="--by"
        )
    arms = collect(sweep)
    if step is None:
        step = default_step(arms)
    elif not any(step in a.metrics_by_step for a in arms):
        available = sorted({s for a in arms for s in a.metrics_by_step})
        raise UserError(
            f"no arm has metrics at step {step}",
            f"one of the evaluated steps: {', '.join(map(str, available))}"
            if available
            else "a step once arms have evaluated",
            path="--step",
        )
    launcher = sweep.launcher
    devices = launcher.nodes * (launcher.gpus_per_node or launcher.tasks_per_node)
    return Ranking(rank_table(arms, sweep.metrics, step, by=by, devices=devices), step, arms)


def flag_changed(df: pd.DataFrame, sweep: Sweep, changed: dict[str, str]) -> None:
    """Mark † in the state of every delta with an arm whose config changed since it ran (`drift`):
    still ranked, flagged (the footer says why)."""
    if not changed or not len(df):
        return
    flagged = {d for d in (*sweep.deltas, BASELINE) for s in sweep.seeds if arm_name(d, s) in changed}
    df["state"] = [f"{st} †" if d in flagged else st for d, st in zip(df["delta"], df["state"], strict=True)]
