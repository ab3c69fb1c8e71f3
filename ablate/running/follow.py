"""Submit and follow: the one way `ablate run` and `ablate eval` hand jobs to the sweep's executor.

Under the sweep lock (one submission at a time): claim the folder, decide what to submit and show
it, snapshot the code, write the run folders' records, build the executor and submit. Then, with
--wait, follow the jobs until they end and print how they did; on Ctrl-C, say what keeps running.
What differs between the two commands is their `Submission`: `Training` (`ablate run`) and
`Evaluation` (`ablate eval`).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ablate.errors import os_fault
from ablate.running import evaljobs, launch, ownership, show, snapshot, store
from ablate.running import jobs as arm_jobs
from ablate.running.rescore import Target, queue, select
from ablate.sweep.expand import RunSpec
from ablate.sweep.schema import Sweep
from core.atomic import Unreadable
from core.records import Job, Status
from core.rundir import RUNNING, RunDir

POLL_S = 1.0  # how often a followed submission looks at the run directories


class Submission(ABC):
    """What `ablate run` and `ablate eval` submit differently; the rest is `submit_and_follow`."""

    live = False
    """follow the jobs with a line per arm (state, step, loss, ETA)"""

    def __init__(self, console: Console, sweep: Sweep, sweep_file: Path, job_name: str) -> None:
        self.console, self.sweep, self.sweep_file, self.job_name = console, sweep, sweep_file, job_name

    @abstractmethod
    def plan(self) -> bool:
        """Decide what to submit and show it (before the code is snapshotted); False when there is nothing to."""

    @abstractmethod
    def prepare(self, code: snapshot.Snapshot) -> list[Path]:
        """Write the records of what is about to be submitted, the code snapshot's included; returns
        the run folders, one job each."""

    def job(self) -> Callable[[str], Any] | None:
        """What each job calls with its run folder (None: train the arm)."""
        return None

    def batches(self, run_dirs: list[Path]) -> list[tuple[list[Path], Callable[[str], Any] | None]]:
        """The run folders `prepare` returned, grouped by what their jobs call: one array each."""
        return [(run_dirs, self.job())]

    def fault(self, e: OSError, run_dirs: list[Path]) -> Exception:
        """What an operating fault while submitting becomes (by default itself, which `main` says in one line)."""
        return e

    @abstractmethod
    def submitted(self, n: int) -> str:
        """The line after submitting `n` jobs without following them."""

    @abstractmethod
    def interrupted(self) -> tuple[str, str]:
        """On Ctrl-C: what stops when the jobs run on this machine, and how to pick up."""

    @abstractmethod
    def summary(self) -> int:
        """Print how the jobs ended and what to do next; returns how many did not finish."""


def submit_and_follow(submission: Submission, *, needs_mark: bool, wait: bool) -> int:
    """Plan and prepare under the sweep lock, then submit (each wave under it again: `ablate cancel` can
    come in between); with `wait`, follow the jobs until they end and print how they did. Returns the
    exit code: 0, 1 when a job did not finish, 130 on Ctrl-C (which stops the jobs that die with `ablate`)."""
    console, sweep = submission.console, submission.sweep
    launcher = sweep.launcher
    batches: list[tuple[list[Path], Callable[[str], Any] | None]] = []
    try:
        with contextlib.ExitStack() as display:
            with ownership.sweep_lock(sweep.root):  # not while another `ablate run` or `ablate eval` submits
                if needs_mark:
                    ownership.claim(sweep)
                if not submission.plan():
                    return 0
                code = _snapshot(sweep, console)
                run_dirs = submission.prepare(code)
                executor = launch.build_executor(launcher, sweep.root, submission.job_name, code.job_setup())
            if wait and submission.live and run_dirs:
                display.enter_context(_live_progress(console, sweep, [d.name for d in run_dirs]))
            batches = submission.batches(run_dirs)
            hold = functools.partial(ownership.sweep_lock, sweep.root, wait_s=-1)
            try:
                jobs = [
                    job
                    for dirs, fn in batches
                    for job in arm_jobs.submit(
                        executor,
                        dirs,
                        parallelism=launcher.array_parallelism,
                        fn=fn,
                        poll_s=POLL_S,
                        hold=hold,
                    )
                ]
            except OSError as e:
                raise submission.fault(e, run_dirs) from None
            if not wait:
                console.print(submission.submitted(len(jobs)))
                return 0
            arm_jobs.wait(jobs, poll_s=POLL_S)
    except KeyboardInterrupt:
        launch.stop(arm_jobs.recorded(batches))
        local_note, again = submission.interrupted()
        note = "jobs already submitted keep running" if launcher.kind.outlives_cli else local_note
        console.print(f"\ninterrupted: {note}; {again}", style="yellow", markup=False)
        return 130
    return 1 if submission.summary() else 0


class Training(Submission):
    """`ablate run`: a training job for every arm that has not finished with its current config, and an
    evaluation job for every done arm whose evaluation settings changed (`rescore.queue`)."""

    live = True

    def __init__(
        self,
        console: Console,
        sweep: Sweep,
        sweep_file: Path,
        specs: list[RunSpec],
        *,
        rerun: Sequence[str],
        force: bool,
    ) -> None:
        super().__init__(console, sweep, sweep_file, sweep.name)
        self.specs, self.rerun, self.force = specs, rerun, force
        self.decisions: list[store.Decision] = []
        self.names: list[str] = []
        self.rescores: list[Target] = []

    def plan(self) -> bool:
        self.decisions = store.plan(self.specs, self.sweep.root, rerun=self.rerun, force=self.force)
        if err := store.blocked_error(self.decisions):
            raise err
        show.plan(self.console, self.sweep, self.decisions, detailed=False)
        if not any(d.launches or d.action == "rescore" for d in self.decisions):
            self.console.print("nothing to submit: every arm is done or in flight")
            return False
        return True

    def rerun_not_done(self) -> str | None:
        """What `--rerun` asked and was not done (arms skipped as in flight), as one line; None when all was."""
        skipped = [
            f"{d.spec.name}: {d.reason}"
            for d in self.decisions
            if d.spec.name in self.rerun and not d.launches
        ]
        return f"--rerun not done for {'; '.join(skipped)}" if skipped else None

    def prepare(self, code: snapshot.Snapshot) -> list[Path]:
        sweep, executor = self.sweep, self.sweep.launcher.executor
        run_dirs = store.prepare(self.decisions, sweep.root, sweep.name, executor, code=code)
        self.names = [d.name for d in run_dirs]
        self.rescores = queue(self.decisions, sweep.name, executor, code=code)
        return run_dirs

    def batches(self, run_dirs: list[Path]) -> list[tuple[list[Path], Callable[[str], Any] | None]]:
        scores = arm_jobs.EvalArm({str(t.run_dir): t.step for t in self.rescores})
        return [(run_dirs, None), ([t.run_dir for t in self.rescores], scores)]

    def fault(self, e: OSError, run_dirs: list[Path]) -> Exception:
        """How far submission got, and what to do."""
        sent = 0
        for run_dir in run_dirs:
            with contextlib.suppress(Exception):
                sent += bool((RunDir(run_dir).read_job() or Job()).job_id)
        return os_fault(
            e,
            f"cannot submit the arms ({sent} of {len(run_dirs)} submitted before it; "
            f"`ablate run` again submits the rest)",
            self.sweep.root,
        )

    def submitted(self, n: int) -> str:
        executor, scores = self.sweep.launcher.executor, len(self.rescores)
        what = f"{n - scores} arm(s)" + (f" and {scores} re-scoring(s)" if scores else "")
        return f"submitted {what} ({executor}); follow them with `ablate status {self.sweep_file}`"

    def interrupted(self) -> tuple[str, str]:
        again = f"`ablate run {self.sweep_file}` resubmits unfinished arms, which resume from their newest checkpoint"
        return "arms running on this machine stop with it", again

    def summary(self) -> int:
        failed = 0
        if self.names:
            failed = show.summary(
                self.console, [store.observe(self.sweep.root / name) for name in self.names]
            )
        if self.rescores:
            failed += show.eval_summary(self.console, self.rescores)
        self.console.print(f"next: ablate rank {self.sweep_file}")
        return failed


class Evaluation(Submission):
    """`ablate eval`: an evaluation job for a checkpoint of every arm asked for that has ended."""

    def __init__(
        self,
        console: Console,
        sweep: Sweep,
        sweep_file: Path,
        arms: list[str],
        step: int | None,
        hashes: dict[str, str],
    ) -> None:
        super().__init__(console, sweep, sweep_file, f"{sweep.name}-eval")
        self.arms, self.step, self.hashes = arms, step, hashes
        self.targets: list[Target] = []

    def plan(self) -> bool:
        """Choose the checkpoints, show them, and mark each evaluation queued."""
        self.targets, skipped = select(self.sweep, self.arms, self.step)
        show.eval_plan(self.console, self.sweep, self.targets, skipped, self.hashes)
        for t in self.targets:
            try:
                evaljobs.mark_eval_queued(t.run_dir, t.step, self.sweep.launcher.executor)
            except OSError as e:
                raise os_fault(e, "cannot queue the evaluation; nothing submitted", t.run_dir) from None
        return True

    def prepare(self, code: snapshot.Snapshot) -> list[Path]:
        for t in self.targets:
            try:
                RunDir(t.run_dir).write_code(code.record, code.diff)
            except OSError as e:
                raise os_fault(e, "cannot record the code snapshot; nothing submitted", t.run_dir) from None
        return [t.run_dir for t in self.targets]

    def job(self) -> Callable[[str], Any]:
        return arm_jobs.EvalArm({str(t.run_dir): t.step for t in self.targets})

    def submitted(self, n: int) -> str:
        executor = self.sweep.launcher.executor
        return f"submitted {n} evaluation(s) ({executor}); each arm's eval_job.json says how it went"

    def interrupted(self) -> tuple[str, str]:
        return (
            "evaluations on this machine stop with it",
            f"`ablate eval {self.sweep_file}` submits them again",
        )

    def summary(self) -> int:
        failed = show.eval_summary(self.console, self.targets)
        steps = sorted({t.step for t in self.targets})
        step_arg = steps[0] if len(steps) == 1 else "N"
        self.console.print(f"next: ablate rank {self.sweep_file} --step {step_arg}", markup=False)
        return failed


def _snapshot(sweep: Sweep, console: Console) -> snapshot.Snapshot:
    """Snapshot the code for the jobs about to be submitted; an operating fault (disk full ...) is one
    line naming the path, with nothing submitted."""
    try:
        code = snapshot.take(sweep.root)
    except OSError as e:
        raise os_fault(e, "cannot snapshot the code for the jobs; nothing submitted", sweep.root) from None
    if note := snapshot.left_out_note(code.record):
        console.print(note, style="yellow", markup=False)
    if code.folder is not None and (warning := snapshot.shadowing_warning()):
        console.print(f"warning: {warning}", style="yellow", markup=False)
    return code


# --- the live progress ---------------------------------------------------------------------------


@contextlib.contextmanager
def _live_progress(console: Console, sweep: Sweep, names: list[str]) -> Iterator[None]:
    """A live line per arm on a terminal; elsewhere (logs, CI) a line each time an arm changes state. The
    last table asks whether each job still runs (a job gone shows `stale`, as the summary below it says)."""
    if console.is_terminal:
        final = False

        def render() -> Group:
            return Group(
                Text("following the arms (Ctrl-C to stop)", style="dim"),
                _progress_table(sweep, names, final=final),
            )

        with Live(get_renderable=render, console=console, refresh_per_second=1, transient=False) as live:
            try:
                yield
            finally:
                final = True
                live.refresh()
        return

    seen: dict[str, str] = {}

    def report(final: bool = False) -> None:
        for name in names:
            state, status = _status(RunDir(sweep.root / name), final=final)
            if seen.get(name) != state:
                seen[name] = state
                step = f" at step {status.step}/{status.total_steps}" if status.step else ""
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
        report(final=True)
        console.print(_progress_table(sweep, names, final=True))


def _progress_table(sweep: Sweep, names: list[str], *, final: bool = False) -> Table:
    table = Table(box=None, pad_edge=False)
    for column in ("arm", "state", "step", "loss", "ETA"):
        table.add_column(column)
    for name in names:
        run = RunDir(sweep.root / name)
        state, status = _status(run, final=final)
        last = run.last_log_row()
        step, total, loss = status.step, status.total_steps, status.loss
        eta = last.eta_s if last is not None and state == RUNNING else None
        table.add_row(
            name,
            state,
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


def _status(run: RunDir, *, final: bool = False) -> tuple[str, Status]:
    """The arm's state and status for progress lines ('?' while absent; a corrupt one says so). While
    following, the state as status.json says; with `final`, as `ablate status` says (a job gone: stale)."""
    if final:
        view = store.observe(run.path)
        return view.state, view.status or Status()
    try:
        status = run.read_status() or Status()
    except Unreadable as e:
        return f"unreadable ({e.reason})", Status()
    return status.state or "?", status
