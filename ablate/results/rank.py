"""Ranking: how far each delta moves each `rank_by` metric away from the baseline, and how sure that is.

Reads only run directories. Every delta is paired with the baseline at the same seed and step; its
change is the mean of the paired differences, with an interval that says which noise it covers
(stats.py: seed noise moderated across the deltas of a metric, eval noise from the prompt resamples
each eval step keeps), a p-value, and a q adjusted over the whole table. Speed is the median step
time over log windows (warm-up left out), with an interval over windows and seeds; cost follows
from it. Deltas are sorted by the first metric's improvement, direction-aware; arms that are
missing, running or failed are listed with their state, never dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ablate.errors import UserError
from ablate.results import stats
from ablate.results.speed import cost_columns
from ablate.running.store import observe
from ablate.sweep.schema import BASELINE, Sweep, arm_name
from core.atomic import Unreadable
from core.records import EvalRecord, Throughput
from core.rundir import DONE, UNREADABLE, RunDir

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class ArmResult:
    name: str
    delta: str
    seed: int
    state: str
    evals: dict[int, EvalRecord] = field(default_factory=dict)
    """its eval records by step"""
    throughput: Throughput | None = None
    steps: int | None = None
    """steps trained (for GPU-hours)"""
    note: str = ""
    """why the arm is unreadable (the file named), from `observe` or its metrics and result"""
    resamples: dict[str, np.ndarray] | None = None
    """at the ranked step: each metric on the eval's prompt resamples (`load_resamples`)"""

    @property
    def metrics_by_step(self) -> dict[int, dict[str, float | None]]:
        return {step: record.metrics for step, record in self.evals.items()}

    @property
    def batches_per_s(self) -> float | None:
        """Its steady-state speed: the median over log windows (the mean of older results without them)."""
        t = self.throughput
        if t is None:
            return None
        return 1 / t.step_s_median if t.step_s_median else t.batches_per_s


def collect(sweep: Sweep) -> list[ArmResult]:
    """Each arm's state, its metrics per step (eval/step_<N>.json, written during training and by
    `ablate eval`) and, once done, its throughput (result.json). An arm with a corrupt record is
    listed as unreadable, without numbers, its note naming the file; the other arms are unaffected."""
    return [_collect_arm(sweep, delta, seed) for delta, seed in sweep.arms()]


def _collect_arm(sweep: Sweep, delta: str, seed: int) -> ArmResult:
    run = RunDir(sweep.root / arm_name(delta, seed))
    view = observe(run.path, check_jobs=False)
    arm = ArmResult(view.name, delta, seed, view.state, note=view.note if view.state == UNREADABLE else "")
    if view.state == UNREADABLE:
        return arm
    try:
        arm.evals = run.eval_records()
        result = run.read_result() if view.state == DONE else None
    except Unreadable as e:
        arm.state, arm.evals, result, arm.note = UNREADABLE, {}, None, str(e)
    except OSError as e:  # eval/ is not a folder it can read
        arm.state, arm.evals, result = UNREADABLE, {}, None
        arm.note = f"{e.filename or run.eval_dir}: unreadable ({e.strerror or type(e).__name__})"
    if result is not None:
        arm.throughput, arm.steps = result.throughput, result.step
    return arm


def load_resamples(sweep: Sweep, arms: list[ArmResult], step: int | None) -> None:
    """Each arm's eval resamples at `step`, where it kept them; a damaged file is no resamples (its
    interval then covers what remains), never a stop."""
    if step is None:
        return
    for arm in arms:
        if arm.state != UNREADABLE and step in arm.evals:
            try:
                arm.resamples = RunDir(sweep.root / arm.name).read_resamples(arm.evals[step])
            except Unreadable:
                arm.resamples = None


def default_step(arms: list[ArmResult]) -> int | None:
    """The last step that every finished arm has metrics for (every arm with metrics, if none finished)."""
    finished = [a for a in arms if a.state == DONE and a.metrics_by_step]
    pool = finished or [a for a in arms if a.metrics_by_step]
    if not pool:
        return None
    common = set.intersection(*(set(a.metrics_by_step) for a in pool))
    return max(common) if common else None


class Table:
    """The impact table: one row (a dict) per delta, baseline first, in ranked order; `attrs` says how its
    verdicts were made. pandas only when a format asks for a frame (`frame()`: csv, W&B): importing it
    would be a third of `ablate rank`'s time on a large sweep."""

    def __init__(self, rows: list[dict[str, Any]], attrs: dict[str, Any] | None = None):
        self.rows, self.attrs = rows, dict(attrs or {})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, column: str) -> list[Any]:
        return [r[column] for r in self.rows]

    def __setitem__(self, column: str, values: list[Any]) -> None:
        for r, v in zip(self.rows, values, strict=True):
            r[column] = v

    def to_dict(self, orient: str = "records") -> list[dict[str, Any]]:
        return self.rows

    def row(self, delta: str) -> dict[str, Any]:
        return next(r for r in self.rows if r["delta"] == delta)

    def frame(self) -> pd.DataFrame:
        import pandas as pd

        frame = pd.DataFrame(self.rows)
        frame.attrs.update(self.attrs)
        return frame


@dataclass(frozen=True)
class Method:
    """How the table's verdicts are made: the seed interval and the multiplicity rule."""

    interval: str = "moderated"
    rule: str = "bh"

    @classmethod
    def parse(cls, interval: str, rule: str) -> Method:
        """From --interval and --fdr; a one-line error for an unknown one."""
        if interval not in stats.INTERVALS:
            raise UserError(
                f"unknown interval '{interval}'", f"one of: {', '.join(stats.INTERVALS)}", path="--interval"
            )
        if rule not in stats.RULES:
            raise UserError(f"unknown rule '{rule}'", f"one of: {', '.join(stats.RULES)}", path="--fdr")
        return cls(interval, rule)


def rank_table(
    arms: list[ArmResult],
    metrics: list[tuple[str, str]],
    step: int | None,
    *,
    by: str | None = None,
    devices: int = 1,
    method: Method = Method(),
    cells: dict[str, list[str]] | None = None,
) -> Table:
    """One row per delta (baseline first), sorted by the improvement in `by` (default: the first metric).

    Columns: delta, state, seeds ("paired/total"); per metric m: `m` (mean value at `step`), `m_change`
    (mean over paired seeds), `m_change_pct`, `m_ci_low`/`m_ci_high` (95%), `m_noise` (what the interval
    covers: seed, seed+eval, eval), `m_df`, `m_sd` (the seed spread of a paired change, moderated;
    the baseline row: the metric's pooled one), `m_eval_sd`, `m_pairs`, `m_p`, `m_q` (adjusted over
    the table), `m_significant` (q ≤ 0.05), `m_seeds_needed`; then the speed and cost columns
    (speed.py). `df.attrs` says which interval and rule made them. With `cells` ({delta: metrics}), only
    those changes form the family the rule adjusts over (a second stage's).
    """
    groups: dict[str, list[ArmResult]] = {}
    for arm in arms:
        groups.setdefault(arm.delta, []).append(arm)
    verdicts = {m: _verdicts(m, groups, step, method.interval) for m, _ in metrics}
    family = [
        c
        for m, (found, _, _) in verdicts.items()
        for d, c in found.items()
        if cells is None or m in cells.get(d, ())
    ]
    stats.adjust(family, method.rule)
    level = stats.next_level(family, method.rule)  # what an open change must reach under the table's rule
    for found, pooled, _ in verdicts.values():
        for change in found.values():
            change.seeds_needed = (
                None if change.significant else stats.seeds_needed(change, pooled, alpha=level)
            )
    baseline = {a.seed: a for a in groups.get(BASELINE, [])}
    rows = []
    for delta, group in groups.items():
        row: dict[str, Any] = {"delta": delta, "state": _state_summary(group, step)}
        row["seeds"] = _seeds(group, baseline, metrics[0][0], step)
        for metric, _ in metrics:
            found, pooled, pcts = verdicts[metric]
            row |= _metric_columns(metric, group, step, found.get(delta), pooled)
            row[f"{metric}_change_pct"] = stats.mean(pcts.get(delta, []))
        row |= cost_columns(group, baseline, devices)
        rows.append(row)
    rows.sort(key=_order(by or metrics[0][0], dict(metrics)))
    return Table(rows, {"interval": method.interval, "rule": method.rule})


def _value(arm: ArmResult | None, metric: str, step: int | None) -> float:
    if arm is None or step is None:
        return math.nan
    v = arm.metrics_by_step.get(step, {}).get(metric)
    return math.nan if v is None else float(v)


def _verdicts(
    metric: str, groups: dict[str, list[ArmResult]], step: int | None, interval: str
) -> tuple[dict[str, stats.Change], stats.Pooled | None, dict[str, list[float]]]:
    """{delta: its change in `metric`}, what the deltas share (the moderated prior), and {delta: its
    paired changes in % of the baseline's value}."""
    values = {(a.delta, a.seed): _value(a, metric, step) for group in groups.values() for a in group}
    base = {a.seed: a for a in groups.get(BASELINE, [])}
    paired: dict[str, list[tuple[ArmResult, ArmResult]]] = {}
    for delta, group in groups.items():
        if delta != BASELINE:
            paired[delta] = [(a, base[a.seed]) for a in group if a.seed in base
                             and not math.isnan(values[delta, a.seed]) and not math.isnan(values[BASELINE, a.seed])]  # fmt: skip
    changes = {
        d: [values[d, a.seed] - values[BASELINE, a.seed] for a, _ in pairs] for d, pairs in paired.items()
    }
    pcts = {d: [100.0 * (values[d, a.seed] - b) / abs(b) if (b := values[BASELINE, a.seed]) else math.nan
                for a, _ in pairs] for d, pairs in paired.items()}  # fmt: skip
    finite = {k: v for k, v in values.items() if not math.isnan(v)}
    pooled = stats.Pooled.of(finite, changes) if interval == "moderated" else None
    found = {d: stats.seed_change(changes[d], pooled, _boot(metric, pairs)) for d, pairs in paired.items()}
    return found, pooled, pcts


def _boot(metric: str, pairs: list[tuple[ArmResult, ArmResult]]) -> np.ndarray | None:
    """The seed-averaged change on each prompt resample, when every pair kept the same resamples."""
    reps = [(a.resamples or {}).get(metric) for pair in pairs for a in pair]
    if not pairs or any(r is None for r in reps) or len({len(r) for r in reps}) != 1:
        return None
    return np.mean([(a.resamples[metric] - b.resamples[metric]) for a, b in pairs], axis=0)


def _metric_columns(
    metric: str,
    group: list[ArmResult],
    step: int | None,
    change: stats.Change | None,
    pooled: stats.Pooled | None,
) -> dict[str, Any]:
    """A delta's columns for one metric (the baseline's: its value and the metric's noise)."""
    values = [_value(a, metric, step) for a in group]
    out: dict[str, Any] = {metric: stats.mean(values)}
    if change is None:  # the baseline: what a change must beat
        out[f"{metric}_sd"] = (
            math.sqrt(pooled.s0_2) if pooled and pooled.cap and pooled.s0_2 >= 0 else math.nan
        )
        evals = [
            float(np.std(a.resamples[metric], ddof=1))
            for a in group
            if (a.resamples or {}).get(metric) is not None
        ]
        out[f"{metric}_eval_sd"] = stats.mean(evals)
        change = stats.Change(math.nan, 0)
    else:
        out[f"{metric}_sd"], out[f"{metric}_eval_sd"] = change.sd, change.eval_sd
    out[f"{metric}_change"] = change.mean
    out[f"{metric}_ci_low"], out[f"{metric}_ci_high"] = change.low, change.high
    out |= {
        f"{metric}_{k}": getattr(change, k) for k in ("noise", "df", "p", "q", "significant", "seeds_needed")
    }
    out[f"{metric}_pairs"] = change.n
    return out


def _seeds(group: list[ArmResult], baseline: dict[int, ArmResult], metric: str, step: int | None) -> str:
    """ "paired/total": seeds with a value at the step (paired with the baseline's, for a delta)."""
    have = [a for a in group if not math.isnan(_value(a, metric, step))]
    if group and group[0].delta != BASELINE:
        have = [a for a in have if not math.isnan(_value(baseline.get(a.seed), metric, step))]
    return f"{len(have)}/{len(group)}"


def _order(key: str, directions: dict[str, str]):
    sign = -1.0 if directions[key] == "lower" else 1.0

    def order(row: dict[str, Any]) -> tuple[int, float]:
        if row["delta"] == BASELINE:
            return (0, 0.0)
        improvement = sign * row[f"{key}_change"]
        return (2, 0.0) if math.isnan(improvement) else (1, -improvement)

    return order  # stable: deltas without numbers keep the sweep's order, at the end


def _state_summary(group: list[ArmResult], step: int | None) -> str:
    labels = [f"done, no step {step}" if a.state == DONE and step is not None and step not in a.metrics_by_step
              else a.state for a in group]  # fmt: skip
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    if len(counts) == 1:
        return labels[0]
    return ", ".join(f"{n} {label}" for label, n in counts.items())


class Ranking(NamedTuple):
    table: Table
    step: int | None
    """the step ranked at"""
    arms: list[ArmResult]
    """every arm as read for it (the figures and the report read the same)"""


def rank(sweep: Sweep, step: int | None = None, by: str | None = None, method: Method = Method()) -> Ranking:
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
    load_resamples(sweep, arms, step)
    launcher = sweep.launcher
    devices = launcher.nodes * (launcher.gpus_per_node or launcher.tasks_per_node)
    first = [a for a in arms if a.seed in sweep.first_seeds(a.delta)]
    table = rank_table(first, sweep.metrics, step, by=by, devices=devices, method=method)
    if (plan := sweep.stage2) is not None:
        table = _with_stage2(table, arms, plan, sweep.metrics, step, devices, method, by)
    return Ranking(table, step, arms)


def _with_stage2(
    table: Table, arms: list[ArmResult], plan: Any, metrics: list[tuple[str, str]],
    step: int | None, devices: int, method: Method, by: str | None,
) -> Table:  # fmt: skip
    """The table with each re-tested change's columns from the second stage's seeds alone."""
    seeds = {BASELINE: set(plan.baseline), **{d: set(s) for d, s in plan.deltas.items()}}
    second = [a for a in arms if a.seed in seeds.get(a.delta, ())]
    again = {
        r["delta"]: r
        for r in rank_table(second, metrics, step, devices=devices, method=method, cells=plan.cells).rows
    }
    for row in table.rows:
        row["stage"] = 1
        retested = plan.cells.get(row["delta"], []) if row["delta"] in again else []
        for metric in retested:
            row |= {k: v for k, v in again[row["delta"]].items() if k == metric or k.startswith(f"{metric}_")}
        if retested:
            row["stage"], row["seeds"] = 2, f"{row['seeds']}, then {again[row['delta']]['seeds']}"
    rows = sorted(table.rows, key=_order(by or metrics[0][0], dict(metrics)))
    return Table(rows, {**table.attrs, "stage2": plan.first_seeds})


def flag_changed(df: Table, sweep: Sweep, changed: dict[str, str]) -> None:
    """Mark † in the state of every delta with an arm whose config changed since it ran (`drift`):
    still ranked, flagged (the footer says why)."""
    if not changed or not len(df):
        return
    flagged = {d for d, s in sweep.arms() if arm_name(d, s) in changed}
    df["state"] = [f"{st} †" if d in flagged else st for d, st in zip(df["delta"], df["state"], strict=True)]
