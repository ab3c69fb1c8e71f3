"""What the running commands print: the plan of `ablate run` and `ablate eval`, the status table and
its notes, how submitted arms and evaluations ended, and the tables of `ablate weights` and `ablate cache`.

Rendering only: the commands decide, these functions put it on the console.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ablate.running.evaljobs import eval_note
from ablate.running.launch import resources
from ablate.running.since import ran_with
from ablate.running.store import ArmView, Decision, blocked_error, observe
from ablate.shown import inert, text
from ablate.sweep.drift import RESCORE
from ablate.sweep.expand import changes, show_value
from ablate.sweep.schema import Sweep
from core.atomic import Unreadable
from core.records import Requeue, Status
from core.rundir import CANCELLED, DONE, FAILED, IN_FLIGHT, STALE, UNREADABLE

if TYPE_CHECKING:
    from ablate.running.caches import CacheGroup
    from ablate.running.rescore import Target
    from ablate.running.weights import Weight

LOG_TAIL = 8  # lines of a failed arm's log `ablate status` shows


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
            last = "\n".join([d.reason, *d.changes()])
        style = {"skip": "dim", "blocked": "yellow", "rescore": "cyan"}.get(d.action, "")
        table.add_row(text(d.spec.name), text(d.action, style), text(d.spec.hash), text(last))
    console.print(table)
    console.print(resources(sweep.launcher), markup=False)


def dry_run(console: Console, sweep: Sweep, decisions: list[Decision]) -> None:
    """`ablate run --dry-run`: the detailed plan, what a scheduler would be handed, what blocks it."""
    launcher = sweep.launcher
    plan(console, sweep, decisions, detailed=True)
    if any(d.since for d in decisions):  # whole lines: what each change is, and what becomes of it
        console.print("\nchanged since they ran, by role (trains, runs or evaluates: trainer/identity.py):")
        for d in decisions:
            for line in d.changes():
                console.print(f"  {d.spec.name}: {line}", markup=False)
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
        ran = _trained(t.run_dir)
        note = (
            f"config changed since it ran (hash {ran} → {hashes[t.name]}): evaluated with the config it ran with"
            if ran != hashes[t.name]
            else ""
        )
        table.add_row(t.name, t.state, str(t.step), text(note, "yellow"))
    for name, reason in skipped:
        table.add_row(text(name, "dim"), text("left out", "dim"), "", text(reason, "dim"))
    console.print(table)
    console.print(resources(sweep.launcher), markup=False)


def _trained(run_dir: Path) -> str | None:
    """The hash of what the arm in `run_dir` trained, in today's HASH_VERSION (None: unreadable)."""
    spec = observe(run_dir, check_jobs=False).spec
    try:
        return None if spec is None else ran_with(run_dir, spec).hash
    except Unreadable:
        return None


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


def status_table(views: list[ArmView], changed: dict[str, str]) -> Table:
    """`ablate status`: one row per arm; `changed`: the arms whose config changed since they ran."""
    table = Table()
    for column in ("arm", "state", "step", "loss", "updated", "log", "note"):
        table.add_column(column, overflow="fold")
    for view in views:
        cells = _arm_cells(view)
        drifted = "settings changed since it ran (below)" if view.name in changed else ""
        extras = (
            drifted,
            _requeue_note(view),
            set_aside_note(view.status),
            view.scheduler,
            eval_note(view.run_dir),
        )
        for extra in extras:
            if extra:
                cells[-1].append(inert(("; " if cells[-1].plain else "") + extra, lines=True))
        table.add_row(*cells)
    return table


def problems(console: Console, sweep_file: Path, views: list[ArmView], changed: dict[str, str]) -> None:
    """Under the status table, whole (the table folds long notes): what to do about unreadable arms,
    the end of failed arms' logs, and the arms whose config changed since they ran."""
    for view in (v for v in views if v.state == UNREADABLE):
        console.print(
            f"\n{view.name} is unreadable: {view.note}; `ablate run {sweep_file} --rerun {view.name}` starts it "
            "afresh (the folder is kept under .replaced/)",
            style="red",
            markup=False,
        )
    for view in (v for v in views if v.state == FAILED):  # what went wrong, where a person looks first
        console.print(f"\n{view.name} failed: {view.note or 'no error recorded'}", style="red", markup=False)
        log = view.job.stderr if view.job else None
        for line in _tail(Path(log) if log else None, LOG_TAIL):
            console.print(f"  │ {line}", markup=False)
        if log:
            console.print(f"  (last {LOG_TAIL} lines of {log})", style="dim", markup=False)
    if changed:
        console.print("", markup=False)
        for name, note in changed.items():
            console.print(f"{name}: {note}", style="yellow", markup=False)
        trained = [name for name, note in changed.items() if not note.startswith(RESCORE)]
        if trained:
            console.print(
                f"config changed for {len(trained)} arm(s) since they ran: their results are for the old config; "
                f"`ablate run {sweep_file} --rerun NAME` (or --force) runs them again",
                style="yellow",
                markup=False,
            )
        if len(trained) < len(changed):
            console.print(
                f"evaluation settings changed for {len(changed) - len(trained)} arm(s) since they were scored; "
                f"`ablate run {sweep_file}` re-scores them",
                style="yellow",
                markup=False,
            )


def weights_table(needed: list[Weight], states: dict[Weight, str | None]) -> Table:
    """`ablate weights check`: each weight, what needs it, where it goes, whether it is here."""
    table = Table()
    table.add_column("weight", no_wrap=True)  # whole, to be copied
    for column in ("for", "arms", "folder", "state"):
        table.add_column(column, overflow="fold")
    for w in needed:
        if not w.downloadable:
            state = text(w.note, "dim")
        elif states[w] is None:
            state = Text("present", style="green")
        else:
            state = Text("missing", style="red")
        table.add_row(w.label, ", ".join(w.used_by), w.arms_text, w.where, state)
    return table


def cache_table(groups: list[CacheGroup]) -> Table:
    """`ablate cache`: each cache folder, whether it is complete, and the arms that read it."""
    table = Table()
    for column in ("cache key", "folder", "state", "arms"):
        table.add_column(column, overflow="fold")
    for g in groups:
        style = {"complete": "green", "incomplete": "yellow"}.get(g.state, "")
        table.add_row(g.key, str(g.path), text(g.state, style), ", ".join(g.arms))
    return table


def _arm_cells(view: ArmView) -> list[Text]:
    status = view.status or Status()
    step, total, loss = status.step, status.total_steps, status.loss
    cells = [
        view.name,
        view.state,
        "" if step is None else f"{step}/{total}" if total else str(step),
        "" if loss is None else f"{loss:.4g}",
        status.updated_at or "",
        view.log_path or (str(view.run_dir) if view.run_dir.exists() else ""),
        view.note,
    ]
    style = {DONE: "green", FAILED: "red", STALE: "yellow", CANCELLED: "yellow"}.get(view.state, "")
    return [text(c, style if i == 1 else "") for i, c in enumerate(cells)]


def _requeue_note(view: ArmView) -> str:
    status = view.status or Status()
    if not status.requeues:
        return ""
    last = status.last_requeue or Requeue()
    return f"requeued {status.requeues}× (last: {last.reason or '?'}, saved at step {last.step or '?'})"


def _tail(path: Path | None, n: int) -> list[str]:
    """The last `n` lines of a log file (reading only its end); [] when there is none."""
    if path is None:
        return []
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 16384))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    return [line.rstrip() for line in lines if line.strip()][-n:]


def set_aside_note(status: Status | None) -> str:
    """One line on the checkpoints set aside for failing verification and a restart from step 0 ('' when
    none): `ablate status` and the report show it, so a `done` arm that trained twice says so."""
    if status is None or not (status.set_aside or status.restarted_from_zero):
        return ""
    parts = [
        f"{s.checkpoint or '?'} set aside ({s.reason or 'failed verification'})" for s in status.set_aside
    ]
    if status.restarted_from_zero:
        parts.append("restarted from step 0")
    return "; ".join(parts)
