"""The `ablate` command line: one function per command; what a command does beyond a few lines is in
`ablate/running/` (running a sweep) or `ablate/results/` (reading its results).

Start-up imports no torch (the trainer's schema is imported only by the commands that
validate arms: run, eval, weights, cache; and by status and rank once the sweep file was edited since
arms ran, to tell drift as `ablate run` does); a mistake in the user's input ends with one
`error: ...` line and exit code 2.
"""

from __future__ import annotations

import sys

import typer

from ablate.errors import UserError
from ablate.options import (
    AnyChange,
    Arm,
    Budget,
    ByOption,
    CacheDryRun,
    CancelArms,
    EvalArms,
    EvalStep,
    ExportStep,
    FdrOption,
    Force,
    Format,
    IntervalOption,
    MinEffect,
    OutDir,
    RankStep,
    Raw,
    Rerun,
    Resolve,
    RunDryRun,
    StackOut,
    StepOption,
    SweepFile,
    SyncDryRun,
    SyncTimeout,
    Top,
    ToWandb,
    Wait,
    WeightsDir,
)
from ablate.results import render
from ablate.running.export import export as export_arm
from ablate.running.launch import resolve_wait
from ablate.running.store import observe
from ablate.shown import InertConsole, inert
from ablate.sweep.schema import load_sweep

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Run controlled ablation studies: one baseline, single-factor deltas, ranked by their impact.",
)

weights_app = typer.Typer(
    no_args_is_help=True, help="The pretrained weights a sweep needs: check them, download them."
)
app.add_typer(weights_app, name="weights")


def _console() -> InertConsole:
    # soft_wrap: messages with long paths stay on one line (tables still fit the width); inert: whatever a
    # record or a path holds is printed as text, its control characters escaped (ablate/shown.py)
    return InertConsole(width=None if sys.stdout.isatty() else 160, highlight=False, soft_wrap=True)


@app.command()
def run(
    sweep_file: SweepFile,
    dry_run: RunDryRun = False,
    rerun: Rerun = None,
    force: Force = False,
    wait: Wait = None,
    resolve: Resolve = False,
    budget: Budget = None,
    min_effect: MinEffect = None,
) -> None:
    """Validate the sweep, then submit every arm that has not finished with its current config."""
    from ablate.running import launch, show
    from ablate.running.datacheck import check_data
    from ablate.running.follow import Training, submit_and_follow
    from ablate.running.ownership import check_owner, make_root
    from ablate.running.resolve import second_stage
    from ablate.running.stopcheck import stop_save_warning
    from ablate.running.store import check_names, plan
    from ablate.sweep.expand import expand

    console = _console()
    sweep = load_sweep(sweep_file)
    if resolve and not second_stage(console, sweep, budget, min_effect or [], dry_run):
        return
    specs = expand(sweep)  # validates every arm before anything is created
    needs_mark = check_owner(sweep)  # only in a folder ablate made (or one from before markers)
    wait = resolve_wait(sweep.launcher, wait)
    check_names([s.name for s in specs], rerun or (), "--rerun")
    if warning := stop_save_warning(specs, sweep.launcher):
        console.print(warning, style="yellow", markup=False)
    if dry_run:
        decisions = plan(specs, sweep.root, rerun=rerun or (), force=force)
        check_data(specs, console)
        show.dry_run(console, sweep, decisions)
        return
    launch.check_available(sweep.launcher)
    check_data(specs, console)  # where this machine sees the data: files and columns exist
    make_root(sweep)  # everything checked: from here on, things get created
    training = Training(console, sweep, sweep_file, specs, rerun=rerun or (), force=force)
    code = submit_and_follow(training, needs_mark=needs_mark, wait=wait)
    if code in (0, 1) and (not_done := training.rerun_not_done()):
        print(f"error: {not_done}", file=sys.stderr)  # what was asked was not done: not a success
        code = 1
    if code:
        raise typer.Exit(code)


@app.command()
def status(sweep_file: SweepFile) -> None:
    """Each arm's state, step, last loss, and where its logs are."""
    from ablate.running import show
    from ablate.sweep.drift import drift

    console = _console()
    sweep = load_sweep(sweep_file)
    console.print(f"sweep {sweep.name} → {sweep.root}", markup=False)
    changed = drift(sweep)
    views = [observe(sweep.root / name) for name in sweep.arm_names()]
    console.print(show.status_table(views, changed))
    show.problems(console, sweep_file, views, changed)


CANCEL_WAIT_S = 60  # how long `ablate cancel` waits for an `ablate run` to finish planning or submitting


@app.command()
def cancel(
    sweep_file: SweepFile,
    arm: CancelArms = None,
) -> None:
    """Stop arms' jobs, saying so once they are gone; they show as cancelled until `ablate run` resubmits them.

    A local job's whole process group is stopped (SIGINT, SIGTERM, SIGKILL) and seen gone; a SLURM job
    goes through scancel."""
    from ablate.running.cancel import cancel as cancel_arm
    from ablate.running.ownership import own, sweep_lock
    from ablate.running.store import check_names

    console = _console()
    sweep = load_sweep(sweep_file)
    check_names(sweep.arm_names(), arm or (), "--arm")
    if not sweep.root.is_dir():
        console.print(f"nothing to cancel: {sweep.root} does not exist", markup=False)
        return
    own(sweep)  # status.json is written only in a folder of this sweep's
    not_cancelled = 0
    # Not while `ablate run` plans or submits a wave; it takes the lock again for each wave it feeds.
    with sweep_lock(sweep.root, wait_s=CANCEL_WAIT_S, nothing="nothing cancelled"):
        for name in arm or sweep.arm_names():
            ok, what = cancel_arm(sweep.root / name)
            not_cancelled += not ok
            console.print(f"{name}: {what}", style="" if ok else "red", markup=False)
    console.print(
        f"next: ablate status {sweep_file}; `ablate run {sweep_file}` resubmits cancelled arms", markup=False
    )
    if not_cancelled:
        raise typer.Exit(1)


@app.command()
def rank(
    sweep_file: SweepFile,
    step: RankStep = None,
    fmt: Format = "table",
    by: ByOption = None,
    interval: IntervalOption = "moderated",
    fdr: FdrOption = "bh",
    to_wandb: ToWandb = False,
) -> None:
    """Every delta's change against the baseline, paired by seed, most improving first."""
    from ablate.results import rank as ranking
    from ablate.sweep.drift import drift

    if (out := render.FORMATS.get(fmt)) is None:
        raise UserError(f"unknown format '{fmt}'", f"one of: {', '.join(render.FORMATS)}", path="--format")
    sweep = load_sweep(sweep_file)
    if to_wandb:
        from ablate.running.ownership import check_owner

        check_owner(sweep)  # W&B writes its folder into the sweep's: only one ablate made
    df, used, arms = ranking.rank(sweep, step, by, ranking.Method.parse(interval, fdr))
    changed = drift(sweep)
    ranking.flag_changed(df, sweep, changed)
    table = out.render(df, sweep, used)
    if out.terminal:
        _console().print(table)
    else:
        sys.stdout.write(table)
    for line in render.footer(sweep, arms, changed):
        print(inert(line), file=sys.stdout if out.footer_on_stdout else sys.stderr)
    if to_wandb:
        from ablate.running.ownership import own
        from ablate.running.wandb_runs import log_table

        own(sweep)
        try:
            where = log_table(sweep, df, used)
        except RuntimeError as e:
            print(f"error: {inert(str(e))}", file=sys.stderr)
            raise typer.Exit(1) from None
        print(inert(f"impact table logged to {where}"), file=sys.stderr)


def _ranked_to_write(
    sweep_file: SweepFile, step: int | None, by: str | None, interval: str, fdr: str
) -> tuple:
    """(sweep, table, metrics used, arms) for a command that writes into the sweep's folder (figures, the
    report): the folder is checked to be one ablate made before ranking, and marked as this sweep's after."""
    from ablate.results import rank as ranking
    from ablate.running.ownership import check_owner, own

    sweep = load_sweep(sweep_file)
    check_owner(sweep)
    df, used, arms = ranking.rank(sweep, step, by, ranking.Method.parse(interval, fdr))
    own(sweep)
    return sweep, df, used, arms


@app.command()
def plot(
    sweep_file: SweepFile,
    step: StepOption = None,
    by: ByOption = None,
    interval: IntervalOption = "moderated",
    fdr: FdrOption = "bh",
) -> None:
    """Write the sweep's figures as PNG: impact bars with intervals, metrics against step, speed/quality trade-off."""
    from ablate.results import plots

    sweep, df, _, arms = _ranked_to_write(sweep_file, step, by, interval, fdr)
    for name, path in plots.write(sweep, df, arms).items():
        print(inert(f"{name}: {path}"))


@app.command()
def report(
    sweep_file: SweepFile,
    step: StepOption = None,
    by: ByOption = None,
    interval: IntervalOption = "moderated",
    fdr: FdrOption = "bh",
) -> None:
    """Write one self-contained HTML page: impact table, figures, sample grids, what each delta changed, failures."""
    from ablate.results.report import build

    path = build(*_ranked_to_write(sweep_file, step, by, interval, fdr))
    print(inert(f"report: {path}"))


@app.command()
def stack(
    sweep_file: SweepFile,
    top: Top = 3,
    by: ByOption = None,
    any_change: AnyChange = False,
    out: StackOut = None,
    step: StepOption = None,
) -> None:
    """Write a sweep whose baseline stacks the K deltas that improved most, with one leave-one-out delta each."""
    from ablate.results import rank as ranking
    from ablate.sweep import stack as stacking

    sweep = load_sweep(sweep_file)
    df, used, _ = ranking.rank(sweep, step, by)
    chosen = stacking.winners(df, sweep, top, by, any_change)
    path = stacking.write(sweep, chosen, df, by, out or sweep_file.with_name(f"{sweep_file.stem}-stack.yaml"))
    print(inert(f"stacked {', '.join(chosen)} (step {used}) into {path}; every arm validates"))
    print(inert(f"next: ablate run {path}"))


@app.command()
def sync(
    sweep_file: SweepFile,
    dry_run: SyncDryRun = False,
    timeout_s: SyncTimeout = 900,
) -> None:
    """Upload the W&B runs the sweep's arms logged offline (on nodes without internet) with `wandb sync`."""
    from ablate.running.ownership import check_owner, own
    from ablate.running.wandb_runs import offline_runs
    from ablate.running.wandb_runs import sync as upload

    console = _console()
    sweep = load_sweep(sweep_file)
    check_owner(sweep)  # `wandb sync` marks the runs it uploaded in their folders
    runs = offline_runs(sweep)
    todo = [r for r in runs if not r.synced]
    console.print(
        f"sweep {sweep.name}: {len(runs)} offline W&B run(s), {len(todo)} not synced yet", markup=False
    )
    for r in runs:
        console.print(f"  {r.arm}: {r.folder.name}{' (synced)' if r.synced else ''}", markup=False)
    if dry_run or not todo:
        console.print("dry run: nothing uploaded" if dry_run else "nothing to upload", markup=False)
        return
    own(sweep)
    problem = upload(todo, timeout_s)
    if problem is not None:
        print(f"error: {inert(problem)}", file=sys.stderr)
        raise typer.Exit(1)
    console.print(f"{len(todo)} run(s) synced", markup=False)


@app.command("eval")
def eval_checkpoints(
    sweep_file: SweepFile,
    arm: EvalArms = None,
    step: EvalStep = None,
    wait: Wait = None,
) -> None:
    """Score checkpoints of arms that have ended again, without training, as jobs of the sweep's launcher."""
    from ablate.running import launch
    from ablate.running.follow import Evaluation, submit_and_follow
    from ablate.running.ownership import check_owner
    from ablate.running.rescore import select
    from ablate.running.store import check_names
    from ablate.sweep.expand import expand

    console = _console()
    sweep = load_sweep(sweep_file)
    check_names(sweep.arm_names(), arm or (), "--arm")
    hashes = {s.name: s.hash for s in expand(sweep)}  # validates the sweep, like `ablate run`
    wait = resolve_wait(sweep.launcher, wait)
    select(sweep, arm or [], step)  # every check before anything is written
    needs_mark = check_owner(sweep)
    launch.check_available(sweep.launcher)
    evaluation = Evaluation(console, sweep, sweep_file, arm or [], step, hashes)
    if code := submit_and_follow(evaluation, needs_mark=needs_mark, wait=wait):
        raise typer.Exit(code)


@app.command()
def export(
    sweep_file: SweepFile, arm: Arm, step: ExportStep = None, raw: Raw = False, out: OutDir = None
) -> None:
    """Write an arm's checkpoint as a diffusers folder: what PRXTransformer2DModel.from_pretrained loads."""
    print("\n".join(map(inert, export_arm(load_sweep(sweep_file), arm, step, raw, out))))


@weights_app.command("check")
def weights_check(sweep_file: SweepFile, folder: WeightsDir = None) -> None:
    """List every pretrained weight the sweep's arms need (denoiser and eval side), present or missing.

    Exit code 0 when all are present, 1 when any is missing.
    """
    from ablate.running import show
    from ablate.running import weights as weights

    console = _console()
    sweep = load_sweep(sweep_file)
    needed = weights.needed(sweep, folder)
    states = weights.states(needed)
    console.print(f"sweep {sweep.name}: {len(needed)} pretrained weight(s)", markup=False)
    if needed:
        console.print(show.weights_table(needed, states))
    missing = [problem for problem in states.values() if problem is not None]
    for problem in missing:
        console.print(f"missing: {problem}", style="red", markup=False)
    if missing:
        command = f"ablate weights download {sweep_file}" + (f" --dir {folder}" if folder is not None else "")
        console.print(
            f"{len(missing)} of {len(needed)} missing; fetch them with network: {command}", markup=False
        )
        raise typer.Exit(1)
    console.print("all present", markup=False)


@weights_app.command("download")
def weights_download(sweep_file: SweepFile, folder: WeightsDir = None) -> None:
    """Fetch every pretrained weight the sweep needs that is not here yet (needs network)."""
    from ablate.running import weights as weights

    console = _console()
    sweep = load_sweep(sweep_file)
    needed = weights.needed(sweep, folder)
    console.print(f"sweep {sweep.name}: {len(needed)} pretrained weight(s)", markup=False)
    if failures := weights.fetch_missing(needed, say=lambda line: console.print(line, markup=False)):
        problem = f"{failures} of {len(needed)} weight(s) not fetched"
        print(inert(f"error: {problem}: {weights.NETWORK_HINT}"), file=sys.stderr)
        raise typer.Exit(1)
    console.print("all present", markup=False)


@app.command()
def cache(
    sweep_file: SweepFile,
    dry_run: CacheDryRun = False,
) -> None:
    """Precompute the latent and caption-embedding caches the sweep's arms read (their `cache: {dir}`).

    Arms whose data, captions, tokenizer and text encoder agree share one cache; complete caches are kept.
    """
    from ablate.running import caches as caches
    from ablate.running import show
    from ablate.running.ownership import own_if_within

    console = _console()
    sweep = load_sweep(sweep_file)
    groups, without = caches.plan(sweep)
    console.print(f"sweep {sweep.name}: {len(groups)} cache(s)", markup=False)
    if groups:
        console.print(show.cache_table(groups))
    if without:
        console.print(f"not using a cache (no `cache:` set): {', '.join(without)}", markup=False)
    if dry_run:
        console.print("dry run: nothing computed", style="bold")
        return
    todo = [g for g in groups if g.state != "complete"]
    for g in todo:  # a cache inside the sweep's output folder: only one ablate made, reached by no link
        own_if_within(sweep, g.config.cache.dir)
    for g in todo:
        caches.fill(g, log=lambda line: console.print(line, markup=False))
    console.print(f"{len(todo)} cache(s) computed, {len(groups) - len(todo)} already complete", markup=False)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: a UserError is one line on stderr and exit code 2."""
    try:
        app(args=argv, prog_name="ablate")
    except UserError as e:
        print(f"error: {e.render()}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # disk full, permission denied, read-only: an operating fault, not a bug
        from ablate.errors import FAULTS, os_fault

        if e.errno not in FAULTS:
            raise
        print(f"error: {os_fault(e, 'stopped').render()}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
