"""The run store: what the run directories of a sweep say, and what `ablate run` does with each arm.

The layout, the states and their writers are `core.rundir`'s; this module reads them for the
orchestrator (`observe`), decides per arm (`plan`), and prepares the folders of the arms to launch
(`prepare`). What is on disk decides: finished with the same hash → skip (what changed in how it runs
is recorded, not rerun), or re-score its newest kept checkpoint when its evaluation settings changed;
failed, stale or missing → (re)submit, with the sweep's settings; in flight (training, or being
evaluated) → skip; hash of what it trains changed → blocked until `--rerun NAME` or `--force`; a
corrupt record → left alone until `--rerun NAME`. What changed, by role: `ablate.running.since`.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import shutil
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ablate.errors import UserError, os_fault
from ablate.running.evaljobs import describe_eval_job, eval_in_flight
from ablate.running.launch import job_state, pid_alive
from ablate.running.since import Change, Ran, ran_with, unusable
from ablate.running.since import since as since_ran
from ablate.sweep.expand import RunSpec, read_config
from core.atomic import Unreadable
from core.lock import describe_writer, live_writer
from core.records import Job, Spec, Status, Writer
from core.rundir import (
    CANCELLED,
    DONE,
    FAILED,
    IN_FLIGHT,
    MISSING,
    QUEUED,
    RUNNING,
    STALE,
    UNREADABLE,
    RunDir,
    now,
)
from core.sweepdir import SweepDir
from trainer.identity import EVALUATES


@dataclass
class ArmView:
    """What an arm's run directory says about it."""

    name: str
    run_dir: Path
    state: str
    """missing | queued | submitted | running | done | failed | cancelled | stale (was in flight, its job
    is gone) | unreadable (a record is corrupt; the note names it)"""
    note: str = ""
    spec: Spec | None = None
    status: Status | None = None
    job: Job | None = None
    scheduler: str = ""
    """what the scheduler says of its job, when it was asked ('slurm: PENDING')"""
    writer: Writer | None = None
    """who holds the folder's writer lock now (a live trainer or eval job, however started), or None"""

    @property
    def hash(self) -> str | None:
        return None if self.spec is None else self.spec.hash

    @property
    def log_path(self) -> str | None:
        """Where the job's stdout goes (or went)."""
        return None if self.job is None else self.job.stdout


def not_a_run_folder(path: Path) -> str | None:
    """Why `path` cannot be an arm's run folder ablate writes (a symbolic link, a file), or None."""
    if path.is_symlink():
        return (
            f"{path}: a symbolic link (to {os.readlink(path)}), not a folder ablate made; "
            "ablate does not write through links"
        )
    if path.exists() and not path.is_dir():
        return f"{path}: a file, not a run folder"
    return None


def observe(run_dir: Path, *, check_jobs: bool = True) -> ArmView:
    """Read an arm's run directory; with `check_jobs`, check in-flight arms' jobs are still alive
    (a process check, or sacct for slurm); without, their state is taken as written.

    A live writer (a process holding the folder's writer lock: `ablate run`'s job, `ablate eval`'s, or a
    trainer started by hand) makes the arm in flight whatever its records say. A corrupt or
    mistyped record makes only this arm `unreadable`, its note naming the file."""
    run = RunDir(run_dir)
    if (problem := not_a_run_folder(run.path)) is not None:
        return ArmView(run.name, run.path, UNREADABLE, problem)
    writer = live_writer(run)
    try:
        spec = run.read_spec()
        if spec is not None and run.config.is_file():
            read_config(run.config)  # what a resumption or a re-scoring reads: corrupt, the arm is unreadable
        status, job = run.read_status(), run.read_job()
    except Unreadable as e:
        if writer is not None:
            return ArmView(run.name, run.path, RUNNING, f"{_writing(writer)}; {e}", writer=writer)
        return ArmView(run.name, run.path, UNREADABLE, str(e))
    if spec is None and writer is None:
        return ArmView(run.name, run.path, MISSING)
    view = ArmView(run.name, run.path, STALE, "no status.json", spec, status, job, writer=writer)
    state = None if status is None else status.state
    if state == CANCELLED and writer is not None:  # scancel'd; the job dies within the cluster's KillWait
        view.state, view.note = (
            CANCELLED,
            f"cancelled at {status.cancelled_at or '?'}; {_writing(writer)} until it stops",
        )
        return view
    if writer is not None and not (state not in IN_FLIGHT and _eval_record_in_flight(run)):
        # Its trainer is alive (an `ablate eval` job on an arm that has ended keeps the arm's own state).
        view.state, view.note = RUNNING, _writing(writer)
        return view
    if state == DONE:
        try:
            result = run.read_result()
        except Unreadable as e:
            return ArmView(run.name, run.path, UNREADABLE, str(e), spec, status, job)
        if result is not None:
            view.state, view.note = DONE, ""
        else:
            view.state, view.note = FAILED, "status is done but result.json is missing"
    elif state == FAILED:
        view.state, view.note = FAILED, status.error or ""
    elif state == CANCELLED:
        view.state, view.note = CANCELLED, f"cancelled at {status.cancelled_at or '?'}"
    elif state in IN_FLIGHT:
        try:
            _in_flight(view, check_jobs)
        except (ValueError, TypeError, OSError) as e:  # a job id no scheduler knows: job.json is garbage
            return ArmView(run.name, run.path, UNREADABLE, f"{run.job}: unreadable (its job: {e})"[:300])
    elif state is not None:
        view.state, view.note = FAILED, f"unknown state {state!r} in status.json"
    if writer is not None:
        view.note = "; ".join(n for n in (view.note, f"being evaluated: {_writing(writer)}") if n)
    return view


def _in_flight(view: ArmView, check_jobs: bool) -> None:
    """An arm whose status says it is in flight: in flight still if its job (or, run by hand, its trainer
    process) lives or cannot be checked from here, else stale."""
    status, job = view.status, view.job
    alive, view.scheduler = (None, "") if job is None or not check_jobs else job_state(job)
    if check_jobs and alive is None and status.pid and status.host == socket.gethostname():
        alive = pid_alive(status.pid)  # the trainer's own process, e.g. run by hand
    if alive is False:
        owner = f"job {job.job_id}" if job and job.job_id else f"process {status.pid}"
        if job and not job.job_id:
            owner = f"`ablate run` (pid {job.submitter_pid})"
        view.note = f"was {status.state}, its {owner} is gone"
    else:
        view.state = status.state
        view.note = "" if alive or not check_jobs else "cannot check its job from here; assumed alive"


def _writing(writer: Writer) -> str:
    return f"{describe_writer(writer)} is writing it"


def _eval_record_in_flight(run: RunDir) -> bool:
    with contextlib.suppress(Unreadable):
        record = run.read_eval_job()
        return record is not None and record.state in IN_FLIGHT
    return False


# --- planning -----------------------------------------------------------------------------------


@dataclass
class Decision:
    spec: RunSpec
    view: ArmView
    action: str
    """submit (new) | resubmit (resume after failure) | rerun (move old aside, start fresh) | rescore (score
    its newest kept checkpoint again, no training) | skip | blocked"""
    reason: str
    since: list[Change] = field(default_factory=list)
    """each setting that differs from what the arm ran with, by role"""
    step: int | None = None
    """rescore: the checkpoint step scored again"""

    @property
    def launches(self) -> bool:
        return self.action in ("submit", "resubmit", "rerun")

    def changes(self) -> list[str]:
        """One line per setting changed since it ran: its role, old and new value, what this action does."""
        return [c.line(self.action, self.step) for c in self.since]


def plan(
    specs: list[RunSpec], root: Path, *, rerun: Iterable[str] = (), force: bool = False
) -> list[Decision]:
    """Decide, from what is on disk, what to do with each arm. Reads only; writes nothing.

    `rerun` names arms to start afresh (finished, failed, changed or unreadable); `force` does so
    for every arm whose config changed. An in-flight arm is never touched. Only a change in what an arm
    trains makes it changed; one in how it is scored re-scores it; one in how it runs is recorded.
    """
    rerun = list(rerun)  # the names are the sweep's arms: `ablate run` checked them (check_names)
    return [
        _decide(spec, observe(SweepDir(root).run(spec.name).path), spec.name in rerun, force)
        for spec in specs
    ]


def _decide(spec: RunSpec, view: ArmView, asked: bool, force: bool) -> Decision:
    ran = None
    if view.spec is not None and view.state != UNREADABLE:
        try:
            ran = ran_with(view.run_dir, view.spec)
        except Unreadable as e:
            if view.writer is None:
                view.state, view.note = UNREADABLE, str(e)
    since = [] if ran is None else since_ran(ran, spec)
    changed = ran is not None and ran.hash is not None and ran.hash != spec.hash
    if view.writer is not None:  # a live process writes the folder, however it was started
        reason = f"in flight ({view.state}: {_writing(view.writer)})"
        if changed or asked:
            reason += "; stop that process before rerunning it"
        return Decision(spec, view, "skip", reason, since)
    if view.state == MISSING:
        return _usable(Decision(spec, view, "submit", "new"), ran)
    if view.state == UNREADABLE:
        if asked:
            return Decision(spec, view, "rerun", view.note)
        return Decision(spec, view, "skip", f"{view.note}; {_afresh(spec.name)}")
    if view.state in IN_FLIGHT:
        reason = f"{view.state}" + (f", job {view.job.job_id}" if view.job and view.job.job_id else "")
        if changed or asked:
            reason += "; cancel its job before rerunning it"
        return Decision(spec, view, "skip", f"in flight ({reason})", since)
    if (evaluating := eval_in_flight(view.run_dir)) is not None:
        return Decision(
            spec, view, "skip", f"in flight (being evaluated: {describe_eval_job(evaluating)})", since
        )
    if changed and not (asked or force):
        return Decision(
            spec, view, "blocked", f"config changed since it ran (hash {ran.hash} → {spec.hash})", since
        )
    if changed or asked:
        return Decision(spec, view, "rerun", "config changed" if changed else "--rerun", since)
    if view.state == DONE:
        return _usable(_finished(spec, view, ran, since), ran)
    note = f"{view.state}" + (f": {view.note}" if view.note else "")
    return _usable(Decision(spec, view, "resubmit", note, since), ran)


def _usable(d: Decision, ran: Ran | None) -> Decision:
    """`d`, or a refusal (skipped, as an unreadable arm is) when its job could not use the arm's folder as
    it is (`since.unusable`: a planted link, a config.yaml the trainer refuses)."""
    if (problem := unusable(d.action, d.view.run_dir, ran, d.spec, d.since)) is None:
        return d
    if d.view.state != MISSING:  # `--rerun` moves a prepared folder aside
        problem += f"; {_afresh(d.spec.name)}"
    return Decision(d.spec, d.view, "skip", problem, d.since)


def _afresh(name: str) -> str:
    return f"`--rerun {name}` starts it afresh (the folder is kept under .replaced/)"


def _finished(spec: RunSpec, view: ArmView, ran: Ran | None, since: list[Change]) -> Decision:
    """A done arm that trained what the sweep asks: skipped, or re-scored if its newest scores were made
    with other evaluation settings than the sweep's now."""
    if ran is None or ran.scored is None or ran.scored == spec.eval_hash:
        return Decision(spec, view, "skip", "done", since)
    why = "evaluation settings changed"
    if not any(c.role == EVALUATES for c in since):  # its config.yaml has them, its newest scores do not
        why = "its newest scores were made with other evaluation settings (a re-score that did not finish?)"
    kept = RunDir(view.run_dir).checkpoint_steps()
    if not kept:
        again = f"no checkpoint kept to re-score; `--rerun {spec.name}` trains it again"
        return Decision(spec, view, "skip", f"done; {why}, {again}", since)
    return Decision(spec, view, "rescore", f"done; {why}: re-score step {kept[-1]}", since, kept[-1])


def check_names(arms: list[str], names: Iterable[str], option: str) -> None:
    """Every name given with `option` must be one of `arms`; else a UserError with the closest match."""
    for name in names:
        if name not in arms:
            close = difflib.get_close_matches(name, arms, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"no arm named '{name}'{hint}", f"one of: {', '.join(arms)}", path=option)


def blocked_error(decisions: list[Decision]) -> UserError | None:
    blocked = [d.spec.name for d in decisions if d.action == "blocked"]
    if not blocked:
        return None
    return UserError(
        f"config changed for {len(blocked)} arm(s) that already ran: {', '.join(blocked)}; nothing submitted",
        "`--rerun NAME` for each arm to run afresh (the old run directory is kept under .replaced/), "
        "or --force for all of them",
    )


# --- writing ------------------------------------------------------------------------------------


def prepare(
    decisions: list[Decision], root: Path, sweep_name: str, executor: str, code: Any = None
) -> list[Path]:
    """Create or refresh the run directories of the arms to launch; returns them in order.

    Each gets status `queued` and a job.json naming this process as its owner until a job is
    submitted for it (and, with `code`, the snapshot its job runs: snapshot.Code). Arms to rerun are
    moved aside first, so no stale checkpoint is resumed. Only real folders are written: a run folder
    that is a link is refused, and a link planted in place of a record is replaced, never followed.

    An operating fault (disk full, permission denied, read-only file system) is a UserError naming the
    path; the folders this call created are removed again and arms it moved aside are moved back, so a
    later `ablate run` finds them as they were.
    """
    sweep = SweepDir(root)
    run_dirs: list[Path] = []
    where = root
    created: list[Path] = []
    moved: list[tuple[Path, Path]] = []
    try:
        for d in decisions:
            if not d.launches:
                continue
            run = sweep.run(d.spec.name)
            where = run.path
            if d.action == "rerun":
                moved.append((run.path, sweep.move_aside(run, d.view.hash)))
            if (problem := not_a_run_folder(run.path)) is not None:
                raise UserError(f"{problem}; nothing submitted", f"`--rerun {d.spec.name}` to move it aside")
            if d.action in ("submit", "rerun") or d.since or not run.config.is_file():  # the new settings
                if not run.path.exists():
                    run.path.mkdir(parents=True)
                    created.append(run.path)
                run.write_config(yaml.safe_dump(d.spec.config, sort_keys=False))
                run.write_spec(d.spec.record(sweep_name))
            run.write_job(Job(executor=executor, host=socket.gethostname(), submitter_pid=os.getpid(),
                              queued_at=now()))  # fmt: skip
            run.set_status(QUEUED, fresh=True, job_id=None)
            if code is not None:
                run.write_code(code.record, code.diff)
            run_dirs.append(run.path)
    except UserError:
        _undo(created, moved)
        raise
    except OSError as e:
        _undo(created, moved)
        raise os_fault(e, "cannot prepare the run folders; nothing submitted", where) from None
    return run_dirs


def _undo(created: list[Path], moved: list[tuple[Path, Path]]) -> None:
    """Take back what `prepare` did before a fault: its new folders go, folders it moved aside come back."""
    for path in created:
        shutil.rmtree(path, ignore_errors=True)
    for back, aside in reversed(moved):
        with contextlib.suppress(OSError):
            if back.exists():
                shutil.rmtree(back)
            os.rename(aside, back)
