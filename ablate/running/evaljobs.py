"""`ablate eval` jobs as the run folder records them (eval_job.json): whether one is in flight, and one
line on the latest for `ablate status`."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from ablate.running.launch import job_alive
from core.atomic import Unreadable
from core.records import EvalJob
from core.rundir import FAILED, IN_FLIGHT, QUEUED, RunDir, now


def eval_in_flight(run_dir: Path) -> EvalJob | None:
    """The arm's `ablate eval` record (eval_job.json) while its job is queued or running, else None."""
    try:
        record = RunDir(run_dir).read_eval_job()
    except Unreadable:
        return None
    if record is None or record.state not in IN_FLIGHT:
        return None
    try:
        alive = job_alive(record)
    except (ValueError, TypeError, OSError):  # a job id no scheduler knows: taken as gone
        return None
    return None if alive is False else record


def describe_eval_job(record: EvalJob) -> str:
    owner = f"job {record.job_id}" if record.job_id else f"pid {record.submitter_pid}"
    return f"step {record.step}, {record.state}, {owner}"


def eval_note(run_dir: Path) -> str:
    """One line on the arm's latest `ablate eval` job for `ablate status` ('' when there was none)."""
    try:
        record = RunDir(run_dir).read_eval_job()
    except Unreadable as e:
        return str(e)
    if record is None:
        return ""
    state = record.state
    if state in IN_FLIGHT and eval_in_flight(run_dir) is None:
        state = f"was {state}, its job is gone"
    error = f": {record.error}" if state == FAILED and record.error else ""
    return f"eval step {record.step}: {state}{error}"


def mark_eval_queued(run_dir: Path, step: int, executor: str) -> None:
    """Before submission: eval_job.json names this process as the owner of the arm's evaluation at `step`."""
    RunDir(run_dir).new_eval_job(QUEUED, step=step, executor=executor, job_id=None, host=socket.gethostname(),
                                 submitter_pid=os.getpid(), queued_at=now())  # fmt: skip
