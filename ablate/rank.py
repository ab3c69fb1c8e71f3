"""Ranking: how far each delta moves each `rank_by` metric away from the baseline.

Reads only run directories. For every delta and seed, the arm is paired with the baseline
arm of the same seed at the same step; the per-seed changes (delta − baseline, and relative
to the baseline in %) and throughput ratios (batches/s of the delta over the baseline's) are
averaged over seeds (with their standard deviation when there are several). Deltas are
sorted by the first metric's improvement, direction-aware (most improving first); arms that
are missing, running or failed are listed with their state, never dropped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ablate.errors import UserError
from ablate.store import observe
from ablate.sweep import BASELINE, Sweep, arm_name
from core.atomic import Unreadable
from core.rundir import DONE, UNREADABLE, RunDir

if TYPE_CHECKING:
    import pandas as pd

FORMATS = ("table", "csv", "markdown", "json")


@dataclass
class ArmResult:
    name: str
    delta: str
    seed: int
    state: str
    metrics_by_step: dict[int, dict[str, float]] = field(default_factory=dict)
    batches_per_s: float | None = None


def collect(sweep: Sweep) -> list[ArmResult]:
    """Each arm's state, its metrics per step (eval/step_<N>.json, written during training and by
    `ablate eval`) and, once done, its throughput (result.json). An arm with a corrupt record is
    listed as unreadable, without numbers."""
    arms = []
    for delta in (BASELINE, *sweep.deltas):
        for seed in sweep.seeds:
            run = RunDir(sweep.root / arm_name(delta, seed))
            view = observe(run.path, check_jobs=False)
            arm = ArmResult(view.name, delta, seed, view.state)
            try:
                arm.metrics_by_step = run.metrics_by_step()
                result = run.read_result() if view.state == DONE else None
            except Unreadable:
                arm.state, arm.metrics_by_step, result = UNREADABLE, {}, None
            if result is not None:
                arm.batches_per_s = result.get("throughput", {}).get("batches_per_s")
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


def rank_table(arms: list[ArmResult], metrics: list[tuple[str, str]], step: int | None) -> pd.DataFrame:
    """One row per delta (baseline first), sorted by the first metric's improvement.

    Columns: delta, state, seeds ("paired/total"), then per metric m: `m` (mean value at
    `step`), `m_change` (mean of delta − baseline over paired seeds), `m_change_std` (NaN for
    one seed), `m_change_pct` (mean of 100·(delta − baseline)/|baseline|); then
    `batches_per_s` (mean) and `throughput_ratio` (mean of delta/baseline batches/s).
    """
    import pandas as pd

    by_delta: dict[str, list[ArmResult]] = {}
    for arm in arms:
        by_delta.setdefault(arm.delta, []).append(arm)
    baseline = {a.seed: a for a in by_delta.get(BASELINE, [])}

    def value(arm: ArmResult | None, metric: str) -> float:
        if arm is None or step is None:
            return math.nan
        v = arm.metrics_by_step.get(step, {}).get(metric)
        return math.nan if v is None else float(v)

    rows = []
    for delta, group in by_delta.items():
        row: dict[str, Any] = {"delta": delta, "state": _state_summary(group, step)}
        for i, (metric, _) in enumerate(metrics):
            values = [value(a, metric) for a in group]
            changes, pcts = [], []
            for a, v in zip(group, values, strict=True):
                b = value(baseline.get(a.seed), metric)
                if delta != BASELINE and not (math.isnan(v) or math.isnan(b)):
                    changes.append(v - b)
                    pcts.append(100.0 * (v - b) / abs(b) if b else math.nan)
            if i == 0:
                row["seeds"] = (
                    f"{len(changes) if delta != BASELINE else sum(not math.isnan(v) for v in values)}/{len(group)}"
                )
            row[metric] = _mean([v for v in values if not math.isnan(v)])
            row[f"{metric}_change"] = _mean(changes)
            row[f"{metric}_change_std"] = _std(changes)
            row[f"{metric}_change_pct"] = _mean(pcts)
        speeds = [a.batches_per_s for a in group if a.batches_per_s]
        ratios = [
            a.batches_per_s / baseline[a.seed].batches_per_s
            for a in group
            if delta != BASELINE and a.batches_per_s and a.seed in baseline and baseline[a.seed].batches_per_s
        ]
        row["batches_per_s"] = _mean(speeds)
        row["throughput_ratio"] = _mean(ratios)
        rows.append(row)

    first, direction = metrics[0]
    sign = -1.0 if direction == "lower" else 1.0

    def order(row: dict[str, Any]) -> tuple[int, float]:
        if row["delta"] == BASELINE:
            return (0, 0.0)
        improvement = sign * row[f"{first}_change"]
        return (2, 0.0) if math.isnan(improvement) else (1, -improvement)

    rows.sort(key=order)  # stable: deltas without numbers keep the sweep's order, at the end
    return pd.DataFrame(rows)


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


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def _std(xs: list[float]) -> float:
    """Sample standard deviation (n − 1); NaN below two values."""
    if len(xs) < 2:
        return math.nan
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


# --- output --------------------------------------------------------------------------------------


def rank(sweep: Sweep, step: int | None = None) -> tuple[pd.DataFrame, int | None]:
    """The ranking table of a sweep at `step` (default: `default_step`), and the step used."""
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
    return rank_table(arms, sweep.metrics, step), step


def to_json(df: pd.DataFrame, sweep: Sweep, step: int | None) -> str:
    rows = [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
        for r in df.to_dict("records")
    ]
    return json.dumps({"sweep": sweep.name, "step": step, "rank_by": sweep.rank_by, "rows": rows}, indent=2)


def cells(df: pd.DataFrame, metrics: list[tuple[str, str]]) -> tuple[list[str], list[list[tuple[str, int]]]]:
    """Human-readable header and cells; each cell with its sign: +1 better, −1 worse, 0 neutral."""
    header = ["delta", "state", "seeds"]
    for metric, direction in metrics:
        header += [f"{metric} {'↓' if direction == 'lower' else '↑'}", "Δ", "Δ%"]
    header += ["batches/s", "speed"]
    out = []
    for r in df.to_dict("records"):
        row = [(str(r["delta"]), 0), (str(r["state"]), 0), (str(r["seeds"]), 0)]
        for metric, direction in metrics:
            change, std, pct = r[f"{metric}_change"], r[f"{metric}_change_std"], r[f"{metric}_change_pct"]
            good = (
                0
                if math.isnan(change) or change == 0
                else (1 if (change < 0) == (direction == "lower") else -1)
            )
            text = _num(change, "{:+.4g}") + ("" if math.isnan(std) else f" ± {std:.2g}")
            row += [(_num(r[metric], "{:.4g}"), 0), (text, good), (_num(pct, "{:+.1f}%"), good)]
        ratio = r["throughput_ratio"]
        row += [
            (_num(r["batches_per_s"], "{:.3g}"), 0),
            (
                _num(ratio, "{:.2f}x"),
                0 if math.isnan(ratio) else (1 if ratio > 1 else -1 if ratio < 1 else 0),
            ),
        ]
        out.append(row)
    return header, out


def _num(x: float, fmt: str) -> str:
    return "—" if x is None or math.isnan(x) else fmt.format(x)


LEGEND = (
    "↓ lower is better, ↑ higher is better. Δ = delta − baseline at the same seed, mean ± std over seeds "
    "(Δ% relative to the baseline). speed = batches/s relative to the baseline."
)


LEGEND_TERMINAL = (
    "↓ lower is better, ↑ higher is better; green = better than the baseline. Each metric: the value at the "
    "step, below it the change against the baseline at the same seed (mean ± std over seeds, and in %). "
    "speed = batches/s relative to the baseline. --format csv|markdown|json for every column."
)


def to_markdown(df: pd.DataFrame, metrics: list[tuple[str, str]]) -> str:
    header, rows = cells(df, metrics)
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|",
    ]
    lines += ["| " + " | ".join(text.replace("|", "\\|") for text, _ in row) + " |" for row in rows]
    return "\n".join([*lines, "", LEGEND])


def to_rich(df: pd.DataFrame, metrics: list[tuple[str, str]], title: str):
    from rich.table import Table
    from rich.text import Text

    header, rows = cells(df, metrics)
    # On a terminal each metric is one column, the value above "Δ (Δ%)", so four metrics fit 120 columns;
    # csv/markdown/json keep value, Δ and Δ% apart.
    merged_header = header[:3] + [header[3 + 3 * i] for i in range(len(metrics))] + header[-2:]
    table = Table(title=title, title_justify="left", caption=LEGEND_TERMINAL, caption_justify="left")
    for i, name in enumerate(merged_header):
        table.add_column(name, justify="left" if i < 3 else "right", no_wrap=True)
    for row in rows:
        out = [Text(t) for t, _ in row[:3]]
        for i in range(len(metrics)):
            (value, _), (change, good), (pct, _) = row[3 + 3 * i : 6 + 3 * i]
            out.append(
                Text(
                    value if pct == "—" else f"{value}\n{change} ({pct})",
                    style="green" if good > 0 else "red" if good < 0 else "",
                )
            )
        out += [Text(t, style="green" if g > 0 else "red" if g < 0 else "") for t, g in row[-2:]]
        table.add_row(*out)
    return table
