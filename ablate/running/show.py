"""What the running commands print: the plan of `ablate run` and `ablate eval`, and how the arms and
evaluations they submitted ended.

Rendering only: the commands decide, these functions put it on the console.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ablate.running.launch import resources
from ablate.running.store import ArmView, Decision, blocked_error, observe
from ablate.sweep.expand import changes, show_value
from ablate.sweep.schema import Sweep
from core.rundir import DONE, IN_FLIGHT

if TYPE_CHECKING:
    from ablate.running.rescore import Target


def plan(console: Console, sweep: Sweep, decisions: list[Decision], *, detailed: bool) -> None:
    """What `ablate run` does with each arm, and why; `detailed`: what each arm changes from the baseline."""
    baseline = {d.spec.seed: d.spec.config for d in decisions if d.spec.delta == "baseline"}
    console.print(f"sweep {sweep.name} → {sweep.root}", markup=False)
    table = Table()
    for column in ("arm", "action", "hash", "changes vs baseline" if detailed else "why"):
        table.add_column(column, overflow="fold")
    for d in decisions:
        if detailed:
            diff = [
                f"{key}: {show_value(old)} → {show_value(new)}"
                for key, old, new in changes(baseline[d.spec.seed], d.spec.config)
            ]
            last = "\n".join(diff) or "—"
            last += "" if d.action in ("submit",) else f"\n({d.reason})"
        else:
            last = d.reason
        style = {"skip": "dim", "blocked": "yellow"}.get(d.action, "")
        table.add_row(Text(d.spec.name), Text(d.action, style=style), Text(d.spec.hash), Text(last))
    console.print(table)
    console.print(resources(sweep.launcher), markup=False)


def dry_run(console: Console, sweep: Sweep, decisions: list[Decision]) -> None:
    """`ablate run --dry-run`: the detailed plan, what a scheduler would be handed, what blocks it."""
    launcher = sweep.launcher
    plan(console, sweep, decisions, detailed=True)
    if launcher.kind.submission_file is not None:  # a scheduler: show what it would be handed
        what, render = launcher.kind.submission_file
        n = sum(d.launches for d in decisions)
        console.print(f"\n{what} for {n} arm(s), rendered by submitit:\n", style="bold")
        console.print(render(launcher, sweep.root, sweep.name, max(n, 1)), markup=False)
    if err := blocked_error(decisions):
        console.print(f"\nblocked: {err.render()}", style="yellow", markup=False)
    console.print("\ndry run: nothing created, nothing submitted", style="bold")


def eval_plan(
    console: Console,
    sweep: Sweep,
    targets: list[Target],
    skipped: list[tuple[str, str]],
    hashes: dict[str, str],
) -> None:
    """The arms `ablate eval` scores and at which step, and the arms it leaves out with the reason."""
    console.print(f"sweep {sweep.name} → {sweep.root}", markup=False)
    table = Table()
    for column in ("arm", "state", "step", "note"):
        table.add_column(column, overflow="fold")
    for t in targets:
        ran = observe(t.run_dir, check_jobs=False).hash
        note = (
            f"config changed since it ran (hash {ran} → {hashes[t.name]}): evaluated with the config it ran with"
            if ran != hashes[t.name]
            else ""
        )
        table.add_row(t.name, t.state, str(t.step), Text(note, style="yellow"))
    for name, reason in skipped:
        table.add_row(Text(name, style="dim"), Text("left out", style="dim"), "", Text(reason, style="dim"))
    console.print(table)
    console.print(resources(sweep.launcher), markup=False)


def summary(console: Console, views: list[ArmView]) -> int:
    """Print how the launched arms ended; returns how many did not finish."""
    done = sum(v.state == DONE for v in views)
    console.print(f"{done}/{len(views)} arm(s) done")
    bad = [v for v in views if v.state != DONE and v.state not in IN_FLIGHT]
    for v in bad:
        console.print(
            f"  {v.name}: {v.state}"
            + (f" ({v.note})" if v.note else "")
            + f"; log: {v.log_path or v.run_dir}",
            style="red",
            markup=False,
        )
    return len(bad)


def eval_summary(console: Console, targets: list[Target]) -> int:
    """Print how each evaluation ended (from eval_job.json); returns how many did not finish."""
    from ablate.running.rescore import outcome

    bad = 0
    for t in targets:
        record = outcome(t)
        if record.state == DONE:
            metrics = ", ".join(f"{k} {v:.4g}" for k, v in (record.metrics or {}).items() if v is not None)
            console.print(f"  {t.name}: step {t.step}: {metrics}", markup=False)
            continue
        bad += 1
        log = record.stderr
        console.print(
            f"  {t.name}: step {t.step}: {record.state or '?'}"
            + (f" ({record.error})" if record.error else "")
            + (f"; log: {log}" if log and Path(log).exists() else ""),
            style="red",
            markup=False,
        )
    console.print(f"{len(targets) - bad}/{len(targets)} arm(s) evaluated")
    return bad
