"""The jobs an executor runs, and handing them over: one job per run directory.

Each job runs `RunArm()(run_dir)`, which is checkpointable: a job that reaches its time limit or is
preempted is requeued with the same run directory, and the trainer resumes from its newest
checkpoint there. `ablate eval` sends `EvalArm(steps)` jobs the same way. `submit` receives an
executor and sends the arms out (one job array; for the local executor, which would start every
array element at once, at most `array_parallelism` at a time); `wait` follows them to the end.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import Any

import submitit

from ablate.running.launch import EXECUTORS, kind_of
from core.atomic import Unreadable
from core.records import Job
from core.rundir import DONE, FAILED, QUEUED, RUNNING, RunDir
from core.sweepdir import SweepDir


class RunArm(submitit.helpers.Checkpointable):
    """The job: train and evaluate one arm in its run directory.

    Checkpointable's `checkpoint(run_dir)` resubmits this same call on timeout or
    preemption; the trainer finds its newest checkpoint in `run_dir` and resumes.
    """

    def __call__(self, run_dir: str) -> None:
        from trainer.runtime.preempt import Preemption

        stops = Preemption()  # before the heavy imports: a stop signal from now on waits for a checkpoint
        _drop_pattern_folder(run_dir)
        from trainer.job import run  # lazy: the orchestrator does not import torch

        run(run_dir, preemption=stops)


class EvalArm(submitit.helpers.Checkpointable):
    """The job of `ablate eval`: score one checkpoint of an arm again, without training.

    `steps` maps each run directory (as submitted) to the checkpoint step to evaluate. The
    outcome goes to the run directory's eval_job.json (running, then done with the metrics or
    failed with the error); status.json is the training's and is left alone. On timeout or
    preemption the job is requeued and evaluates again from the start.
    """

    def __init__(self, steps: dict[str, int]) -> None:
        self.steps = dict(steps)

    def __call__(self, run_dir: str) -> dict[str, float]:
        from trainer.job import rescore  # lazy: the orchestrator does not import torch

        _drop_pattern_folder(run_dir)
        run, step, main = RunDir(run_dir), self.steps[run_dir], _main_process()
        if main:
            run.set_eval_job(RUNNING, step=step, error=None, metrics=None)
        try:
            metrics = rescore(run_dir, step)
        except BaseException as e:
            if main:
                run.set_eval_job(FAILED, error=f"{type(e).__name__}: {e}")
            raise
        if main:
            run.set_eval_job(DONE, metrics=metrics)
        return metrics


def _drop_pattern_folder(run_dir: str) -> None:
    """submitit's local controller creates the folder it is given, the pattern `.submitit/%j` itself,
    before it starts its job (whose files go to `.submitit/<job id>/`): the job removes that empty,
    literal `%j` folder, so none is left once the jobs have started."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "local":
        with contextlib.suppress(OSError):  # not empty, gone already (another job), or never made
            SweepDir(Path(run_dir).parent).job_folder.rmdir()


def _main_process() -> bool:
    """Whether this is the job's first task (the one that writes the run directory's records)."""
    if "RANK" in os.environ:  # torchrun, or exported by the trainer
        return os.environ["RANK"] == "0"
    kind = EXECUTORS.get(os.environ.get("SUBMITIT_EXECUTOR", ""))
    if kind is not None and not kind.in_process:
        return submitit.JobEnvironment().global_rank == 0
    return True


def submit(
    executor: submitit.Executor,
    run_dirs: Sequence[Path],
    *,
    parallelism: int | None = None,
    fn: Callable[[str], Any] | None = None,
    poll_s: float = 1.0,
    hold: Callable[[], ContextManager[object]] = contextlib.nullcontext,
) -> list[submitit.Job[Any]]:
    """Submit one job per run directory, recording each job in its run directory.

    One array (`executor.batch()`) for every executor, except where the executor kind leaves the
    throttle to us (local: it would start each array element at once): at most `parallelism` run
    at a time, and this call blocks, polling every `poll_s` seconds, until the last arm started.
    Each submission happens under `hold()` (the sweep lock, which `ablate cancel` takes too), and only
    for run folders still queued: an arm cancelled while it waited for a slot is never submitted.
    `fn` is the job callable: `RunArm()` (default; recorded in job.json and status.json) or an
    `EvalArm` (recorded in eval_job.json).
    """
    fn = RunArm() if fn is None else fn
    if not run_dirs:
        return []
    if kind_of(executor).throttle_here and parallelism is not None and parallelism < len(run_dirs):
        return _submit_in_waves(executor, run_dirs, parallelism, fn, poll_s, hold)
    with hold():
        return _submit_now(executor, [d for d in run_dirs if _queued(fn, d)], fn)


def _submit_now(
    executor: submitit.Executor, run_dirs: Sequence[Path], fn: Callable[[str], Any]
) -> list[submitit.Job[Any]]:
    if not run_dirs:
        return []
    with executor.batch():
        jobs = [executor.submit(fn, str(run_dir)) for run_dir in run_dirs]
    for run_dir, job in zip(run_dirs, jobs, strict=True):
        _record(fn, run_dir, job, executor)
    return jobs


def _submit_in_waves(
    executor: submitit.Executor,
    run_dirs: Sequence[Path],
    parallelism: int,
    fn: Callable[[str], Any],
    poll_s: float,
    hold: Callable[[], ContextManager[object]],
) -> list[submitit.Job[Any]]:
    pending = list(run_dirs)
    jobs: list[submitit.Job[Any]] = []
    running: list[submitit.Job[Any]] = []
    while pending:
        running = [job for job in running if not job.done()]
        if len(running) < parallelism:
            with hold():
                pending = [d for d in pending if _queued(fn, d)]
                while pending and len(running) < parallelism:
                    (job,) = _submit_now(executor, [pending.pop(0)], fn)
                    jobs.append(job)
                    running.append(job)
        if pending:
            time.sleep(poll_s)
    return jobs


def _queued(fn: Callable[[str], Any], run_dir: Path) -> bool:
    """Whether the run folder still waits for its job (not cancelled meanwhile, nor unreadable)."""
    run = RunDir(run_dir)
    try:
        record = run.read_eval_job() if isinstance(fn, EvalArm) else run.read_status()
    except Unreadable:
        return False
    return record is not None and record.state == QUEUED


def recorded(batches: Sequence[tuple[Sequence[Path], Callable[[str], Any] | None]]) -> list[Job]:
    """The jobs this process has submitted for `batches` ((run folders, job callable) pairs), as recorded."""
    found = []
    for run_dirs, fn in batches:
        for run_dir in run_dirs:
            run = RunDir(run_dir)
            with contextlib.suppress(Unreadable, OSError):
                job = run.read_eval_job() if isinstance(fn, EvalArm) else run.read_job()
                if job is not None and job.job_id and job.submitter_pid == os.getpid():
                    found.append(job)
    return found


def _record(
    fn: Callable[[str], Any], run_dir: Path, job: submitit.Job[Any], executor: submitit.Executor
) -> None:
    """The job's id and logs go to eval_job.json (an `ablate eval` job) or job.json (training), and the
    state becomes `submitted` unless the job already started."""
    run = RunDir(run_dir)
    mark = run.mark_eval_submitted if isinstance(fn, EvalArm) else run.mark_submitted
    mark(str(job.job_id), Path(executor.folder), Path(job.paths.stdout), Path(job.paths.stderr))


def wait(jobs: Sequence[submitit.Job[Any]], *, poll_s: float = 1.0) -> None:
    """Block until every job has ended. Debug jobs run here, one after another.

    A job's failure is not raised: the trainer records it in the arm's status.json, and the
    caller reports arm states from the run directories.
    """
    for job in jobs:
        if isinstance(job, submitit.DebugJob):
            try:
                job.result()  # runs it; never call done() on a failed DebugJob: that would run it again
            except Exception:  # noqa: BLE001 - the trainer records the failure; run the other arms
                pass
    others = [job for job in jobs if not isinstance(job, submitit.DebugJob)]
    while not all(job.done() for job in others):
        time.sleep(poll_s)
