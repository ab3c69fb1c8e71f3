"""The `ablate` command line: run, status, rank.

Start-up imports no torch (the trainer's schema is imported only by `ablate run`, to
validate); a mistake in the user's input ends with one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ablate.errors import UserError
from ablate.store import IN_FLIGHT, STATUS, ArmView, Decision, last_log_line, observe
from ablate.sweep import Sweep, changes, load_sweep, show_value
from trainer.io import read_json

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Run controlled ablation studies: one baseline, single-factor deltas, ranked by their impact.",
)

SweepFile = Annotated[Path, typer.Argument(help="The sweep file (YAML).", show_default=False)]
POLL_S = 1.0  # how often `ablate run --wait` looks at the run directories


def _console() -> Console:
    # soft_wrap: messages with long paths stay on one line (tables still fit the width)
    return Console(width=None if sys.stdout.isatty() else 160, highlight=False, soft_wrap=True)


@app.command()
def run(
    sweep_file: SweepFile,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; create and submit nothing.")
    ] = False,
    rerun: Annotated[
        list[str] | None, typer.Option("--rerun", metavar="NAME", help="Run this arm afresh (repeatable).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Run afresh every arm whose config changed.")
    ] = False,
    wait: Annotated[
        bool | None,
        typer.Option(
            "--wait/--no-wait", help="Follow the arms until they end [default: wait, except for slurm]."
        ),
    ] = None,
) -> None:
    """Validate the sweep, then submit every arm that has not finished with its current config."""
    from ablate import launch
    from ablate.store import blocked_error, check_arm_names, plan, prepare, sweep_lock
    from ablate.sweep import expand

    console = _console()
    sweep = load_sweep(sweep_file)
    specs = expand(sweep)  # validates every arm before anything is created
    launcher = sweep.launcher
    wait = launcher.executor != "slurm" if wait is None else wait
    if launcher.executor == "debug" and not wait:
        raise UserError(
            "--no-wait with the debug executor, which runs the arms inside this process",
            "--wait, or launcher.executor: local",
            path="--no-wait",
        )

    if dry_run:
        decisions = plan(specs, sweep.root, rerun=rerun or (), force=force)
        _print_plan(console, sweep, decisions, detailed=True)
        if launcher.executor == "slurm":
            n = sum(d.launches for d in decisions)
            console.print(f"\nsbatch file for {n} arm(s), rendered by submitit:\n", style="bold")
            console.print(launch.sbatch_text(launcher, sweep.root, sweep.name, max(n, 1)), markup=False)
        if err := blocked_error(decisions):
            console.print(f"\nblocked: {err.render()}", style="yellow", markup=False)
        console.print("\ndry run: nothing created, nothing submitted", style="bold")
        return

    check_arm_names(specs, rerun or ())
    launch.check_available(launcher)
    sweep.root.mkdir(parents=True, exist_ok=True)  # everything checked: from here on, things get created
    jobs: list[Any] = []
    launched: list[str] = []
    try:
        with contextlib.ExitStack() as display:
            with sweep_lock(sweep.root):
                decisions = plan(specs, sweep.root, rerun=rerun or (), force=force)
                if err := blocked_error(decisions):
                    raise err
                _print_plan(console, sweep, decisions, detailed=False)
                run_dirs = prepare(decisions, sweep.root, sweep.name, launcher.executor)
                if not run_dirs:
                    console.print("nothing to submit: every arm is done or in flight")
                    return
                launched = [d.name for d in run_dirs]
                executor = launch.build_executor(launcher, sweep.root, sweep.name)
                if wait:
                    display.enter_context(_live_progress(console, sweep, launched))
                jobs = launch.submit(
                    executor, run_dirs, parallelism=launcher.array_parallelism, poll_s=POLL_S
                )
            if not wait:
                console.print(
                    f"submitted {len(jobs)} arm(s) ({launcher.executor}); follow them with `ablate status {sweep_file}`"
                )
                return
            launch.wait(jobs, poll_s=POLL_S)
    except KeyboardInterrupt:
        if launcher.executor == "slurm":
            note = "jobs already submitted keep running"
        else:
            note = "arms running on this machine stop with it"
        console.print(
            f"\ninterrupted: {note}; `ablate run {sweep_file}` resubmits unfinished arms, which resume from "
            "their newest checkpoint",
            style="yellow",
            markup=False,
        )
        raise typer.Exit(130) from None
    failed = _summary(console, sweep, launched)
    console.print(f"next: ablate rank {sweep_file}")
    if failed:
        raise typer.Exit(1)


@app.command()
def status(sweep_file: SweepFile) -> None:
    """Each arm's state, step, last loss, and where its logs are."""
    console = _console()
    sweep = load_sweep(sweep_file)
    console.print(f"sweep {sweep.name} → {sweep.root}", markup=False)
    table = Table()
    for column in ("arm", "state", "step", "loss", "updated", "log", "note"):
        table.add_column(column, overflow="fold")
    for name in sweep.arm_names():
        view = observe(sweep.root / name)
        table.add_row(*_arm_cells(view, with_log=True))
    console.print(table)


@app.command()
def rank(
    sweep_file: SweepFile,
    step: Annotated[
        int | None,
        typer.Option("--step", help="Rank at this step [default: the last step all finished arms reached]."),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="table | csv | markdown | json")] = "table",
) -> None:
    """Every delta's change against the baseline, paired by seed, most improving first."""
    from ablate import rank as ranking

    if fmt not in ranking.FORMATS:
        raise UserError(f"unknown format '{fmt}'", f"one of: {', '.join(ranking.FORMATS)}", path="--format")
    sweep = load_sweep(sweep_file)
    df, used = ranking.rank(sweep, step)
    if fmt == "csv":
        sys.stdout.write(df.to_csv(index=False))
    elif fmt == "json":
        print(ranking.to_json(df, sweep, used))
    elif fmt == "markdown":
        print(ranking.to_markdown(df, sweep.metrics))
    else:
        where = f"at step {used}" if used is not None else "(no arm has evaluated yet)"
        title = f"{sweep.name}: change vs baseline {where}, paired by seed"
        _console().print(ranking.to_rich(df, sweep.metrics, title))


# --- rendering -----------------------------------------------------------------------------------


def _print_plan(console: Console, sweep: Sweep, decisions: list[Decision], *, detailed: bool) -> None:
    from ablate.launch import resources

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


def _arm_cells(view: ArmView, *, with_log: bool) -> list[Text]:
    status = view.status or {}
    step, total = status.get("step"), status.get("total_steps")
    loss = status.get("loss")
    cells = [
        view.name,
        view.state,
        "" if step is None else f"{step}/{total}" if total else str(step),
        "" if loss is None else f"{loss:.4g}",
        str(status.get("updated_at", "")),
    ]
    if with_log:
        cells.append(view.log_path or (str(view.run_dir) if view.run_dir.exists() else ""))
    cells.append(view.note)
    style = {"done": "green", "failed": "red", "stale": "yellow"}.get(view.state, "")
    return [Text(c, style=style if i == 1 else "") for i, c in enumerate(cells)]


def _progress_table(sweep: Sweep, names: list[str]) -> Table:
    table = Table(box=None, pad_edge=False)
    for column in ("arm", "state", "step", "loss", "ETA"):
        table.add_column(column)
    for name in names:
        run_dir = sweep.root / name
        status = read_json(run_dir / STATUS, default={}) or {}
        last = last_log_line(run_dir) or {}
        step, total, loss = status.get("step"), status.get("total_steps"), status.get("loss")
        eta = last.get("eta_s") if status.get("state") == "running" else None
        table.add_row(
            name,
            str(status.get("state", "?")),
            "" if step is None else f"{step}/{total}",
            "" if loss is None else f"{loss:.4g}",
            "" if eta is None else _duration(eta),
        )
    return table


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


@contextlib.contextmanager
def _live_progress(console: Console, sweep: Sweep, names: list[str]):
    """A live line per arm on a terminal; elsewhere (logs, CI) a line each time an arm changes state."""
    if console.is_terminal:

        def render() -> Group:
            return Group(
                Text("following the arms (Ctrl-C to stop)", style="dim"), _progress_table(sweep, names)
            )

        with Live(get_renderable=render, console=console, refresh_per_second=1, transient=False):
            yield
        return

    seen: dict[str, str] = {}

    def report() -> None:
        for name in names:
            status = read_json(sweep.root / name / STATUS, default={}) or {}
            state = str(status.get("state", "?"))
            if seen.get(name) != state:
                seen[name] = state
                step = f" at step {status['step']}/{status.get('total_steps')}" if status.get("step") else ""
                console.print(f"{name}: {state}{step}", markup=False)

    stop = threading.Event()

    def follow() -> None:
        while not stop.wait(POLL_S):
            report()

    thread = threading.Thread(target=follow, name="ablate-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        report()
        console.print(_progress_table(sweep, names))


def _summary(console: Console, sweep: Sweep, names: list[str]) -> int:
    """Print how the launched arms ended; returns how many did not finish."""
    views = [observe(sweep.root / name) for name in names]
    done = sum(v.state == "done" for v in views)
    console.print(f"{done}/{len(views)} arm(s) done")
    bad = [v for v in views if v.state != "done" and v.state not in IN_FLIGHT]
    for v in bad:
        console.print(
            f"  {v.name}: {v.state}"
            + (f" ({v.note})" if v.note else "")
            + f"; log: {v.log_path or v.run_dir}",
            style="red",
            markup=False,
        )
    return len(bad)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: a UserError is one line on stderr and exit code 2."""
    try:
        app(args=argv, prog_name="ablate")
    except UserError as e:
        print(f"error: {e.render()}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
