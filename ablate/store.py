"""The run store: one sweep directory, one run directory per arm.

    <root>/                      the sweep directory (Sweep.root)
      .ablate.lock               held by `ablate run` while it plans and submits
      .submitit/<job id>/        submitit's pickles and the jobs' stdout/stderr
      .replaced/<arm>-<hash>-<time>/   run directories moved aside by --rerun/--force
      <arm>/                     one per arm, named <delta>-s<seed>
        config.yaml  spec.json   written here before submission (the resolved config, identity)
        job.json                 written here: executor, job id, host, submitter pid, log paths
        status.json              `queued`/`submitted` written here; `running`/`done`/`failed` by the trainer
        log.jsonl checkpoints/ eval/ result.json   written by the trainer
        eval_job.json            `ablate eval`'s latest job: step, job id, logs; its state written by the job

What is on disk decides what `ablate run` does with each arm (`plan`): finished with the
same hash → skip; failed, stale or missing → (re)submit; in flight (training, or being
evaluated by `ablate eval`) → skip; config hash changed → blocked until `--rerun NAME` or `--force`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import difflib
import json
import os
import shutil
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ablate.errors import UserError
from ablate.sweep import RunSpec
from trainer.io import atomic_write_json, atomic_write_text, read_json

CONFIG, SPEC, STATUS, JOB, RESULT, LOG = (
    "config.yaml",
    "spec.json",
    "status.json",
    "job.json",
    "result.json",
    "log.jsonl",
)
EVAL_JOB = "eval_job.json"
LOCK, SUBMITIT, REPLACED = ".ablate.lock", ".submitit", ".replaced"
IN_FLIGHT = ("queued", "submitted", "running")
# sacct states of a job that still holds (or will again hold) its arm.
_SLURM_ALIVE = {
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
    "SUSPENDED", "RESIZING", "PREEMPTED", "STOPPED", "SIGNALING", "STAGE_OUT",
}  # fmt: skip


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class ArmView:
    """What an arm's run directory says about it."""

    name: str
    run_dir: Path
    state: str
    """missing | queued | submitted | running | done | failed | stale (was in flight, its job is gone)"""
    note: str = ""
    spec: dict[str, Any] | None = None
    status: dict[str, Any] | None = None
    job: dict[str, Any] | None = None

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
    name = run_dir.name
    spec = read_json(run_dir / SPEC)
    if spec is None:
        return ArmView(name, run_dir, "missing")
    status, job = read_json(run_dir / STATUS), read_json(run_dir / JOB)
    view = ArmView(name, run_dir, "stale", "no status.json", spec, status, job)
    state = None if status is None else status.get("state")
    if state == "done":
        if (run_dir / RESULT).exists():
            view.state, view.note = "done", ""
        else:
            view.state, view.note = "failed", "status is done but result.json is missing"
    elif state == "failed":
        view.state, view.note = "failed", str(status.get("error") or "")
    elif state in IN_FLIGHT:
        alive = None if job is None or not check_jobs else job_alive(job)
        if check_jobs and alive is None and status.get("pid") and status.get("host") == socket.gethostname():
            alive = _pid_alive(int(status["pid"]))  # the trainer's own process, e.g. run by hand
        if alive is False:
            owner = f"job {job['job_id']}" if job and job.get("job_id") else f"process {status.get('pid')}"
            if job and not job.get("job_id"):
                owner = f"`ablate run` (pid {job.get('submitter_pid')})"
            view.note = f"was {state}, its {owner} is gone"
        else:
            view.state = state
            view.note = "" if alive or not check_jobs else "cannot check its job from here; assumed alive"
    elif state is not None:
        view.state, view.note = "failed", f"unknown state {state!r} in status.json"
    return view


def job_alive(job: dict[str, Any]) -> bool | None:
    """Whether the job recorded in job.json still runs: True, False, or None (cannot tell)."""
    executor, job_id = job.get("executor"), job.get("job_id")
    if executor == "slurm" and job_id:
        return _slurm_alive(str(job_id), job.get("folder", "."))
    if job.get("host") != socket.gethostname():
        return None
    if executor == "local" and job_id:
        return _pid_alive(int(job_id), must_contain=b"submitit")  # the local job's controller
    # debug jobs, and arms still queued for a slot, live as long as the `ablate run` that owns them
    return _pid_alive(job.get("submitter_pid"))


def _pid_alive(pid: int | None, must_contain: bytes = b"") -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path(f"/proc/{pid}")
    if proc.exists():  # Linux: a zombie is dead; a reused pid runs something else
        with contextlib.suppress(OSError):
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False
            if must_contain and must_contain not in (proc / "cmdline").read_bytes():
                return False
    return True


def _slurm_alive(job_id: str, folder: str) -> bool | None:
    import submitit

    state = submitit.SlurmJob(folder=folder, job_id=job_id).get_info(mode="force").get("State", "")
    state = state.split()[0] if state else "UNKNOWN"  # "CANCELLED by 123"
    if state == "UNKNOWN":
        return None
    return state in _SLURM_ALIVE


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

    `rerun` names arms to start afresh (finished, failed or changed); `force` does so for every
    arm whose config changed. An in-flight arm is never touched.
    """
    rerun = list(rerun)
    check_arm_names(specs, rerun)
    decisions = []
    for spec in specs:
        view = observe(root / spec.name)
        asked = spec.name in rerun
        changed = view.hash is not None and view.hash != spec.hash
        if view.state == "missing":
            d = Decision(spec, view, "submit", "new")
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
        elif view.state == "done":
            d = Decision(spec, view, "skip", "done")
        else:
            d = Decision(spec, view, "resubmit", f"{view.state}" + (f": {view.note}" if view.note else ""))
        decisions.append(d)
    return decisions


def check_arm_names(specs: list[RunSpec], names: Iterable[str]) -> None:
    """Every name given on the command line (--rerun) must be an arm of the sweep."""
    check_names([s.name for s in specs], names, "--rerun")


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
    """Hold `<root>/.ablate.lock`; a second `ablate run` on the same sweep fails fast instead of double-submitting."""
    import filelock

    lock = filelock.FileLock(root / LOCK)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise UserError(
            f"another `ablate run` is submitting this sweep (lock {root / LOCK} is held); nothing submitted",
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
    run_dirs = []
    for d in decisions:
        if not d.launches:
            continue
        run_dir = root / d.spec.name
        if d.action == "rerun":
            stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
            target = root / REPLACED / f"{d.spec.name}-{d.view.hash}-{stamp}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(run_dir), target)
        if d.action in ("submit", "rerun"):
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / CONFIG, yaml.safe_dump(d.spec.config, sort_keys=False))
            atomic_write_json(run_dir / SPEC, d.spec.spec_json(sweep_name))
        atomic_write_json(
            run_dir / JOB,
            {"executor": executor, "job_id": None, "host": socket.gethostname(), "submitter_pid": os.getpid(),
             "queued_at": now()},
        )  # fmt: skip
        atomic_write_json(run_dir / STATUS, {"state": "queued", "updated_at": now(), "job_id": None})
        run_dirs.append(run_dir)
    return run_dirs


def mark_submitted(run_dir: Path, job_id: str, folder: Path, stdout: Path, stderr: Path) -> None:
    """Record the job of an arm; status becomes `submitted` unless the job already started."""
    job = read_json(run_dir / JOB, default={})
    job.update(job_id=job_id, folder=str(folder), stdout=str(stdout), stderr=str(stderr), submitted_at=now())
    atomic_write_json(run_dir / JOB, job)
    status = read_json(run_dir / STATUS, default={})
    if status.get("state") == "queued":  # the trainer may already have written `running`
        atomic_write_json(run_dir / STATUS, {"state": "submitted", "updated_at": now(), "job_id": job_id})
    link = run_dir / "launcher"  # the run directory leads to its launcher logs
    with contextlib.suppress(OSError):
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(stdout.parent, run_dir), target_is_directory=True)


def last_log_line(run_dir: Path) -> dict[str, Any] | None:
    """The last record of the arm's log.jsonl (reads only the file's tail)."""
    path = run_dir / LOG
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            return json.loads(line)
    return None


# --- `ablate eval` jobs ---------------------------------------------------------------------------


def eval_in_flight(run_dir: Path) -> dict[str, Any] | None:
    """The arm's `ablate eval` record (eval_job.json) while its job is queued or running, else None."""
    record = read_json(run_dir / EVAL_JOB)
    if record is None or record.get("state") not in IN_FLIGHT:
        return None
    return None if job_alive(record) is False else record


def describe_eval_job(record: dict[str, Any]) -> str:
    owner = f"job {record['job_id']}" if record.get("job_id") else f"pid {record.get('submitter_pid')}"
    return f"step {record.get('step')}, {record.get('state')}, {owner}"


def eval_note(run_dir: Path) -> str:
    """One line on the arm's latest `ablate eval` job for `ablate status` ('' when there was none)."""
    record = read_json(run_dir / EVAL_JOB)
    if record is None:
        return ""
    state = record.get("state")
    if state in IN_FLIGHT and eval_in_flight(run_dir) is None:
        state = f"was {state}, its job is gone"
    error = f": {record['error']}" if state == "failed" and record.get("error") else ""
    return f"eval step {record.get('step')}: {state}{error}"


def mark_eval_queued(run_dir: Path, step: int, executor: str) -> None:
    """Before submission: eval_job.json names this process as the owner of the arm's evaluation at `step`."""
    atomic_write_json(
        run_dir / EVAL_JOB,
        {"state": "queued", "step": step, "executor": executor, "job_id": None, "host": socket.gethostname(),
         "submitter_pid": os.getpid(), "queued_at": now(), "updated_at": now()},
    )  # fmt: skip


def mark_eval_submitted(run_dir: Path, job_id: str, folder: Path, stdout: Path, stderr: Path) -> None:
    record = read_json(run_dir / EVAL_JOB, default={})
    record.update(job_id=job_id, folder=str(folder), stdout=str(stdout), stderr=str(stderr))
    record["submitted_at"] = now()
    if record.get("state") == "queued":  # the job may already have written `running`
        record.update(state="submitted", updated_at=now())
    atomic_write_json(run_dir / EVAL_JOB, record)


def mark_eval(run_dir: Path, state: str, **fields: Any) -> None:
    """Written by the eval job itself: running | done (with metrics) | failed (with error)."""
    record = read_json(run_dir / EVAL_JOB, default={})
    atomic_write_json(run_dir / EVAL_JOB, {**record, **fields, "state": state, "updated_at": now()})
