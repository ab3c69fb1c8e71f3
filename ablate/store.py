"""The run store: what the run directories of a sweep say, and what `ablate run` does with each arm.

The layout, the states and their writers are `core.rundir`'s; this module reads them for the
orchestrator (`observe`), decides per arm (`plan`), and prepares the folders of the arms to launch
(`prepare`). What is on disk decides: finished with the same hash → skip; failed, stale or missing
→ (re)submit; in flight (training, or being evaluated by `ablate eval`) → skip; config hash changed
→ blocked until `--rerun NAME` or `--force`; a corrupt record → left alone until `--rerun NAME`.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ablate import launch
from ablate.errors import UserError
from ablate.launch import job_alive, job_state, pid_alive
from ablate.sweep import RunSpec, recorded_hash
from core.atomic import Unreadable
from core.rundir import (
    CANCELLED,
    DONE,
    FAILED,
    IN_FLIGHT,
    MISSING,
    QUEUED,
    STALE,
    UNREADABLE,
    RunDir,
    SweepDir,
    now,
)


@dataclass
class ArmView:
    """What an arm's run directory says about it."""

    name: str
    run_dir: Path
    state: str
    """missing | queued | submitted | running | done | failed | cancelled | stale (was in flight, its job
    is gone) | unreadable (a record is corrupt; the note names it)"""
    note: str = ""
    spec: dict[str, Any] | None = None
    status: dict[str, Any] | None = None
    job: dict[str, Any] | None = None
    scheduler: str = ""
    """what the scheduler says of its job, when it was asked ('slurm: PENDING')"""

    @property
    def hash(self) -> str | None:
        return None if self.spec is None else self.spec.get("hash")

    @property
    def log_path(self) -> str | None:
        """Where the job's stdout goes (or went)."""
        return None if self.job is None else self.job.get("stdout")


def observe(run_dir: Path, *, check_jobs: bool = True) -> ArmView:
    """Read an arm's run directory; with `check_jobs`, check in-flight arms' jobs are still alive
    (a process check, or sacct for slurm); without, their state is taken as written."""
    run = RunDir(run_dir)
    try:
        spec = run.read_spec()
        if spec is None:
            return ArmView(run.name, run.path, MISSING)
        spec = {**spec, "hash": recorded_hash(spec, run.config)}
        status, job = run.read_status(), run.read_job()
    except Unreadable as e:
        return ArmView(run.name, run.path, UNREADABLE, str(e))
    view = ArmView(run.name, run.path, STALE, "no status.json", spec, status, job)
    state = None if status is None else status.get("state")
    if state == DONE:
        if run.result.exists():
            view.state, view.note = DONE, ""
        else:
            view.state, view.note = FAILED, "status is done but result.json is missing"
    elif state == FAILED:
        view.state, view.note = FAILED, str(status.get("error") or "")
    elif state == CANCELLED:
        view.state, view.note = CANCELLED, f"cancelled at {status.get('cancelled_at', '?')}"
    elif state in IN_FLIGHT:
        alive, view.scheduler = (None, "") if job is None or not check_jobs else job_state(job)
        if check_jobs and alive is None and status.get("pid") and status.get("host") == socket.gethostname():
            alive = pid_alive(int(status["pid"]))  # the trainer's own process, e.g. run by hand
        if alive is False:
            owner = f"job {job['job_id']}" if job and job.get("job_id") else f"process {status.get('pid')}"
            if job and not job.get("job_id"):
                owner = f"`ablate run` (pid {job.get('submitter_pid')})"
            view.note = f"was {state}, its {owner} is gone"
        else:
            view.state = state
            view.note = "" if alive or not check_jobs else "cannot check its job from here; assumed alive"
    elif state is not None:
        view.state, view.note = FAILED, f"unknown state {state!r} in status.json"
    return view


# --- planning -----------------------------------------------------------------------------------


@dataclass
class Decision:
    spec: RunSpec
    view: ArmView
    action: str
    """submit (new) | resubmit (resume after failure) | rerun (move old aside, start fresh) | skip | blocked"""
    reason: str

    @property
    def launches(self) -> bool:
        return self.action in ("submit", "resubmit", "rerun")


def plan(
    specs: list[RunSpec], root: Path, *, rerun: Iterable[str] = (), force: bool = False
) -> list[Decision]:
    """Decide, from what is on disk, what to do with each arm. Reads only; writes nothing.

    `rerun` names arms to start afresh (finished, failed, changed or unreadable); `force` does so
    for every arm whose config changed. An in-flight arm is never touched.
    """
    rerun = list(rerun)
    check_names([s.name for s in specs], rerun, "--rerun")
    decisions = []
    for spec in specs:
        view = observe(SweepDir(root).run(spec.name).path)
        asked = spec.name in rerun
        changed = view.hash is not None and view.hash != spec.hash
        if view.state == MISSING:
            d = Decision(spec, view, "submit", "new")
        elif view.state == UNREADABLE:
            d = Decision(
                spec,
                view,
                "rerun" if asked else "skip",
                view.note
                if asked
                else (
                    f"{view.note}; `--rerun {spec.name}` starts it afresh (the folder is kept under .replaced/)"
                ),
            )
        elif view.state in IN_FLIGHT:
            reason = f"{view.state}" + (
                f", job {view.job.get('job_id')}" if view.job and view.job.get("job_id") else ""
            )
            if changed or asked:
                reason += "; cancel its job before rerunning it"
            d = Decision(spec, view, "skip", f"in flight ({reason})")
        elif (evaluating := eval_in_flight(view.run_dir)) is not None:
            d = Decision(spec, view, "skip", f"in flight (being evaluated: {describe_eval_job(evaluating)})")
        elif changed and not (asked or force):
            d = Decision(
                spec, view, "blocked", f"config changed since it ran (hash {view.hash} → {spec.hash})"
            )
        elif changed or asked:
            d = Decision(spec, view, "rerun", "config changed" if changed else "--rerun")
        elif view.state == DONE:
            d = Decision(spec, view, "skip", "done")
        else:
            d = Decision(spec, view, "resubmit", f"{view.state}" + (f": {view.note}" if view.note else ""))
        decisions.append(d)
    return decisions


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


@contextlib.contextmanager
def sweep_lock(root: Path) -> Iterator[None]:
    """Hold the sweep's lock; a second `ablate run` on the same sweep fails fast instead of double-submitting."""
    import filelock

    path = SweepDir(root).lock
    lock = filelock.FileLock(path)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise UserError(
            f"another `ablate run` is submitting this sweep (lock {path} is held); nothing submitted",
            "to run again once it has finished submitting (`ablate status` shows the arms meanwhile)",
        ) from None
    try:
        yield
    finally:
        lock.release()


def prepare(decisions: list[Decision], root: Path, sweep_name: str, executor: str) -> list[Path]:
    """Create or refresh the run directories of the arms to launch; returns them in order.

    Each gets status `queued` and a job.json naming this process as its owner until a job is
    submitted for it. Arms to rerun are moved aside first, so no stale checkpoint is resumed.
    """
    sweep = SweepDir(root)
    run_dirs = []
    for d in decisions:
        if not d.launches:
            continue
        run = sweep.run(d.spec.name)
        if d.action == "rerun":
            sweep.move_aside(run, d.view.hash)
        if d.action in ("submit", "rerun"):
            run.path.mkdir(parents=True, exist_ok=True)
            run.write_config(yaml.safe_dump(d.spec.config, sort_keys=False))
            run.write_spec(d.spec.spec_json(sweep_name))
        run.write_job({"executor": executor, "job_id": None, "host": socket.gethostname(),
                       "submitter_pid": os.getpid(), "queued_at": now()})  # fmt: skip
        run.set_status(QUEUED, fresh=True, job_id=None)
        run_dirs.append(run.path)
    return run_dirs


def cancel(run_dir: Path) -> tuple[bool, str]:
    """Cancel an arm's jobs in flight (training, and an `ablate eval` job) through their scheduler; the
    arm is then `cancelled` until `ablate run` resubmits it. Returns (whether all went, what happened)."""
    run, view = RunDir(run_dir), observe(run_dir)
    done: list[str] = []
    if view.state in IN_FLIGHT:
        job = view.job or {}
        if (problem := launch.cancel(job)) is not None:
            return False, f"not cancelled: {problem}"
        run.set_status(CANCELLED, only_from=IN_FLIGHT, cancelled_at=now())
        done.append(f"job {job.get('job_id')} cancelled")
    if (record := eval_in_flight(run_dir)) is not None:
        if (problem := launch.cancel(record)) is not None:
            return False, "; ".join([*done, f"its `ablate eval` job not cancelled: {problem}"])
        run.set_eval_job(CANCELLED, only_from=IN_FLIGHT)
        done.append(f"`ablate eval` job {record.get('job_id')} cancelled")
    return True, "; ".join(done) or f"nothing in flight ({view.state})"


# --- `ablate eval` jobs ---------------------------------------------------------------------------


def eval_in_flight(run_dir: Path) -> dict[str, Any] | None:
    """The arm's `ablate eval` record (eval_job.json) while its job is queued or running, else None."""
    try:
        record = RunDir(run_dir).read_eval_job()
    except Unreadable:
        return None
    if record is None or record.get("state") not in IN_FLIGHT:
        return None
    return None if job_alive(record) is False else record


def describe_eval_job(record: dict[str, Any]) -> str:
    owner = f"job {record['job_id']}" if record.get("job_id") else f"pid {record.get('submitter_pid')}"
    return f"step {record.get('step')}, {record.get('state')}, {owner}"


def eval_note(run_dir: Path) -> str:
    """One line on the arm's latest `ablate eval` job for `ablate status` ('' when there was none)."""
    try:
        record = RunDir(run_dir).read_eval_job()
    except Unreadable as e:
        return str(e)
    if record is None:
        return ""
    state = record.get("state")
    if state in IN_FLIGHT and eval_in_flight(run_dir) is None:
        state = f"was {state}, its job is gone"
    error = f": {record['error']}" if state == FAILED and record.get("error") else ""
    return f"eval step {record.get('step')}: {state}{error}"


def mark_eval_queued(run_dir: Path, step: int, executor: str) -> None:
    """Before submission: eval_job.json names this process as the owner of the arm's evaluation at `step`."""
    RunDir(run_dir).new_eval_job(QUEUED, step=step, executor=executor, job_id=None, host=socket.gethostname(),
                                 submitter_pid=os.getpid(), queued_at=now())  # fmt: skip
