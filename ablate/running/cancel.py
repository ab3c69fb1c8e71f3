"""`ablate cancel`: stop an arm's jobs, and say whether they stopped.

Each job goes through its executor (`launch.cancel`): a local job's whole process group is stopped and seen
gone, a SLURM job is handed to scancel. An arm still queued for a slot by an `ablate run` that feeds the
executor its waves has no job yet: it is marked cancelled, and that `ablate run` never submits it
(`jobs.submit` submits only run folders still queued, under the sweep lock `ablate cancel` holds too).
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable
from pathlib import Path

from ablate.running import launch
from ablate.running.evaljobs import eval_in_flight
from ablate.running.launch import job_alive
from ablate.running.store import observe
from core.lock import describe_writer
from core.records import Job, Status
from core.rundir import CANCELLED, IN_FLIGHT, QUEUED, RunDir, now


def cancel(run_dir: Path) -> tuple[bool, str]:
    """Cancel an arm's jobs in flight (training, and an `ablate eval` job); the arm is then `cancelled`
    until `ablate run` resubmits it. Returns (whether all went, for sure; what happened). Called under
    the sweep lock."""
    run, view = RunDir(run_dir), observe(run_dir)
    done: list[str] = []
    if view.writer is not None and not _job_alive(view.job) and eval_in_flight(run_dir) is None:
        pid, host = view.writer.pid, view.writer.host
        return False, (
            f"not cancelled: {describe_writer(view.writer)} writes it, not a job ablate submitted; "
            f"stop that process (kill {pid} on {host})"
        )
    if view.state in IN_FLIGHT:
        status = view.status or Status()
        trainer = status.pid if status.host == socket.gethostname() else None
        record = functools.partial(run.set_status, CANCELLED, cancelled_at=now())
        ok, what = _cancel_job(view.job or Job(), record, trainer)
        done.append(what)
        if not ok:
            return False, "; ".join(done)
    if (job := eval_in_flight(run_dir)) is not None:
        ok, what = _cancel_job(job, functools.partial(run.set_eval_job, CANCELLED), None)
        done.append(f"its `ablate eval` {what}")
        if not ok:
            return False, "; ".join(done)
    return True, "; ".join(done) or f"nothing in flight ({view.state})"


def _cancel_job(job: Job, record: Callable[..., bool], trainer: int | None) -> tuple[bool, str]:
    """Cancel one job (`record(only_from=...)` writes it cancelled); a job not yet submitted is only marked,
    while it is still queued (`jobs.submit` submits only run folders still queued, under the same lock)."""
    if not job.job_id and job.submitter_pid is not None:
        if record(only_from=(QUEUED,)):
            return True, "cancelled before its job was submitted"
        return False, "not cancelled: no longer queued, and no job recorded for it"
    return launch.cancel(job, lambda: record(only_from=IN_FLIGHT), trainer)


def _job_alive(job: Job | None) -> bool:
    try:
        return job is not None and job_alive(job) is True
    except (ValueError, TypeError, OSError):
        return False
