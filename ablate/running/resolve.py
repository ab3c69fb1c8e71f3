"""`ablate run --resolve`: seeds spent only where a verdict is still open, by a rule that keeps the error
rates the table states.

The sweep's seeds are the first stage. A change they leave unresolved (q above 5%) is tested again in
a second, confirmatory stage: its delta and the baseline run on new seeds, and that change's verdict
comes from the new seeds alone, with the same moderated interval and false-discovery control over the
re-tested changes. The first stage only sizes the second (how many seeds resolve a change of the
target size at 80% power, from its seed spread), so looking at it cannot bias the verdict, as adding
seeds until something turns significant would (a type I error of 9-18% at a nominal 5%; see
../shared/notes/verdict-statistics.md §8). There is one second stage: its verdicts are final.

The target size of a change is `--min-effect METRIC=X` where given, else the change the first stage
saw. `--budget-gpu-hours H` caps the plan's cost (GPU-hours per arm measured on the first stage); the
deltas that need the most seeds are left open first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ablate.errors import UserError
from ablate.results import stats
from ablate.sweep.schema import BASELINE, Sweep
from core.records import Stage2
from core.rundir import DONE, now

if TYPE_CHECKING:
    from rich.console import Console

MOST_SEEDS = 16  # a change that would need more seeds than this is left open


@dataclass
class Plan:
    stage2: Stage2 | None
    lines: list[str] = field(default_factory=list)
    """what is re-tested, with how many seeds and why, and what stays open"""


def parse_min_effects(given: list[str], metrics: list[str]) -> dict[str, float]:
    """`--min-effect METRIC=X` (repeatable) as {metric: X}; a one-line error for a bad one."""
    out = {}
    for item in given:
        metric, _, value = item.partition("=")
        try:
            size = abs(float(value))
        except ValueError:
            size = math.nan
        if metric not in metrics or math.isnan(size) or size == 0:
            raise UserError(f"'{item}' is not METRIC=SIZE", f"a rank_by metric ({', '.join(metrics)}) and a non-zero size",
                            path="--min-effect")  # fmt: skip
        out[metric] = size
    return out


def plan(sweep: Sweep, ranking: Any, min_effect: dict[str, float], budget: float | None) -> Plan:
    """The second stage for the changes the first leaves open; raises a UserError when there cannot be one."""
    table, step, arms = ranking
    _check_first_stage(sweep, arms)
    rows = {r["delta"]: r for r in table.to_dict("records")}
    out, sizes, cells = Plan(None), {}, {}
    for delta, r in rows.items():
        if delta == BASELINE:
            continue
        for metric, _ in sweep.metrics:
            n, why = _seeds_for(r, metric, min_effect.get(metric))
            if n is not None:
                sizes[delta] = max(sizes.get(delta, 0), n)
                cells.setdefault(delta, []).append(metric)
            if why:
                out.lines.append(
                    f"{delta}: {metric} {'re-tested' if n is not None else 'stays open'} ({why})"
                )
    hours = {d: r["gpu_hours"] for d, r in rows.items()}
    sizes, dropped = _within(sizes, hours, budget)
    out.lines += [f"{d}: left open, the budget does not reach it" for d in dropped]
    if not sizes:
        out.lines.append("nothing to re-test: every verdict is resolved, or none can be within the limits")
        return out
    first = max(s for d in (BASELINE, *sweep.deltas) for s in sweep.first_seeds(d)) + 1
    out.stage2 = Stage2(first_seeds=sorted({s for d in (BASELINE, *sweep.deltas) for s in sweep.first_seeds(d)}),
                        baseline=list(range(first, first + max(sizes.values()))),
                        deltas={d: list(range(first, first + n)) for d, n in sizes.items()},
                        cells={d: cells[d] for d in sizes}, step=step, gpu_hours=_cost(sizes, hours), planned_at=now())  # fmt: skip
    return out


def _check_first_stage(sweep: Sweep, arms: list[Any]) -> None:
    if sweep.stage2 is not None:
        raise UserError("a second stage is planned already: its verdicts come from its own seeds and are final",
                        "`ablate run` (without --resolve) to finish its arms, then `ablate rank`", path="--resolve")  # fmt: skip
    unfinished = [a.name for a in arms if a.state != DONE]
    if unfinished:
        shown = ", ".join(unfinished[:4]) + (
            f" and {len(unfinished) - 4} more" if len(unfinished) > 4 else ""
        )
        raise UserError(f"the first stage has arms that are not done ({shown})",
                        "every arm of the sweep done before planning the second stage", path="--resolve")  # fmt: skip


def _seeds_for(r: dict[str, Any], metric: str, min_effect: float | None) -> tuple[int | None, str]:
    """(seeds in all that resolve this change at 80% power, why), or (None, why not)."""
    if r[f"{metric}_significant"]:
        return None, ""
    change, sd = r[f"{metric}_change"], r[f"{metric}_sd"]
    if math.isnan(change):
        return None, "no change measured"
    if math.isnan(sd):
        return None, "no seed spread yet: a second seed measures it"
    size = min_effect if min_effect is not None else abs(change)
    target = f"a change of {size:.3g} ({'--min-effect' if min_effect is not None else 'the one seen'})"
    n = stats.seeds_needed(stats.Change(size, 2, sd=sd), None, most=MOST_SEEDS)
    if n is None:
        return None, f"{target} would need more than {MOST_SEEDS} seeds"
    return n, f"{n} new seeds resolve {target} at 80% power, seed spread {sd:.3g}"


def _cost(sizes: dict[str, int], hours: dict[str, float]) -> float:
    """GPU-hours of new seeds `sizes` and the baseline seeds they pair with; an arm without a measured
    cost counts as the mean of those that have one."""
    known = [h for h in hours.values() if not math.isnan(h)]
    mean = sum(known) / len(known) if known else math.nan

    def each(delta: str) -> float:
        h = hours.get(delta, math.nan)
        return mean if math.isnan(h) else h

    return sum(n * each(d) for d, n in sizes.items()) + max(sizes.values(), default=0) * each(BASELINE)


def _within(
    sizes: dict[str, int], hours: dict[str, float], budget: float | None
) -> tuple[dict[str, int], list[str]]:
    """The plan cut down to the budget: the deltas that need the most seeds go first."""
    kept, dropped = dict(sizes), []
    while budget is not None and kept and _cost(kept, hours) > budget:
        worst = max(kept, key=lambda d: (kept[d], d))
        dropped.append(worst)
        del kept[worst]
    return kept, dropped


def second_stage(
    console: Console, sweep: Sweep, budget: float | None, min_effect: list[str], dry_run: bool
) -> bool:
    """Plan the confirmatory second stage of `--resolve` and say what it re-tests at what cost; record it
    in the sweep's folder (its arms then belong to the sweep) unless `dry_run`. Whether there is one."""
    from ablate.results import rank as ranking
    from ablate.running.ownership import own, sweep_lock
    from ablate.sweep.expand import expand
    from core.sweepdir import SweepDir

    found = plan(
        sweep, ranking.rank(sweep), parse_min_effects(min_effect, [m for m, _ in sweep.metrics]), budget
    )
    for line in found.lines:
        console.print(line, markup=False)
    if found.stage2 is None:
        return False
    arms = len(found.stage2.baseline) + sum(map(len, found.stage2.deltas.values()))
    console.print(f"second stage: {arms} arm(s), about {found.stage2.gpu_hours:.3g} GPU-hours", markup=False)
    sweep.stage2 = found.stage2
    expand(sweep)  # its arms validate before the plan is written
    if dry_run:
        console.print("dry run: the second stage is not recorded, nothing submitted", style="bold")
        return False
    own(sweep)
    with sweep_lock(sweep.root):
        SweepDir(sweep.root).write_stage2(found.stage2)
    return True
