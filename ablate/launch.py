"""Launching arms through submitit.

`build_executor` turns the sweep's `launcher` section into a submitit executor; `submit`
receives that executor and sends the arms out (one job array; for the local executor, which
would start every array element at once, at most `array_parallelism` at a time). Each job
runs `RunArm()(run_dir)`, which is checkpointable: a job that reaches its time limit or is
preempted is requeued with the same run directory, and the trainer resumes from its newest
checkpoint there. `ablate eval` sends `EvalArm(steps)` jobs the same way.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import submitit
from submitit.slurm.slurm import SlurmExecutor

from ablate.errors import UserError
from ablate.store import SUBMITIT, mark_eval, mark_eval_submitted, mark_submitted
from ablate.sweep import Launcher


class RunArm(submitit.helpers.Checkpointable):
    """The job: train and evaluate one arm in its run directory.

    Checkpointable's `checkpoint(run_dir)` resubmits this same call on timeout or
    preemption; the trainer finds its newest checkpoint in `run_dir` and resumes.
    """

    def __call__(self, run_dir: str) -> None:
        from trainer.job import run  # lazy: the orchestrator does not import torch

        run(run_dir)


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
        from trainer.job import evaluate  # lazy: the orchestrator does not import torch

        step, main = self.steps[run_dir], _main_process()
        if main:
            mark_eval(Path(run_dir), "running", step=step, error=None, metrics=None)
        try:
            metrics = evaluate(run_dir, step)
        except BaseException as e:
            if main:
                mark_eval(Path(run_dir), "failed", error=f"{type(e).__name__}: {e}")
            raise
        if main:
            mark_eval(Path(run_dir), "done", metrics=metrics)
        return metrics


def _main_process() -> bool:
    """Whether this is the job's first task (the one that writes the run directory's records)."""
    if "RANK" in os.environ:  # torchrun, or exported by the trainer
        return os.environ["RANK"] == "0"
    if os.environ.get("SUBMITIT_EXECUTOR") in ("local", "slurm"):
        return submitit.JobEnvironment().global_rank == 0
    return True


def job_folder(root: Path) -> Path:
    """submitit's folder: one sub-folder per job (`%j`) with its pickles and logs."""
    return root / SUBMITIT / "%j"


def check_available(launcher: Launcher) -> None:
    """Fail before anything is created when the chosen executor cannot run here."""
    if launcher.executor == "slurm" and SlurmExecutor.affinity() <= 0:
        raise UserError(
            "executor slurm needs `srun` on PATH, and it is not (not on a SLURM login node?)",
            "to run on a SLURM login node, or launcher.executor: local (or --dry-run to see the sbatch file)",
            path="launcher.executor",
        )


def build_executor(launcher: Launcher, root: Path, job_name: str) -> submitit.Executor:
    """The submitit executor for the sweep's `launcher` section; jobs keep their files under `root`."""
    folder = job_folder(root)
    if launcher.executor == "debug":
        return submitit.DebugExecutor(folder)
    if launcher.executor == "local":
        executor = submitit.LocalExecutor(folder)
        executor.update_parameters(**local_parameters(launcher))
        return executor
    if launcher.executor == "slurm":
        check_available(launcher)
        executor = SlurmExecutor(folder)
        executor.update_parameters(**slurm_parameters(launcher, job_name))
        return executor
    raise AssertionError(f"executor {launcher.executor!r} passed schema validation")  # Launcher's Literal


def local_parameters(launcher: Launcher) -> dict[str, Any]:
    # LocalExecutor's own default time limit is 2 minutes: always pass ours.
    params: dict[str, Any] = {
        "timeout_min": launcher.time_limit_min,
        "tasks_per_node": launcher.tasks_per_node,
        "gpus_per_node": launcher.gpus_per_node,
    }
    if launcher.setup:
        params["setup"] = list(launcher.setup)
    return params


def slurm_parameters(launcher: Launcher, job_name: str) -> dict[str, Any]:
    """SlurmExecutor.update_parameters keywords (sbatch options) for the launcher section."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": launcher.time_limit_min,
        "nodes": launcher.nodes,
        "ntasks_per_node": launcher.tasks_per_node,
    }
    optional = {
        "gpus_per_node": launcher.gpus_per_node or None,
        "cpus_per_task": launcher.cpus_per_task,
        "mem": None if launcher.mem_gb is None else _mem(launcher.mem_gb),
        "partition": launcher.partition,
        "account": launcher.account,
        "qos": launcher.qos,
        "constraint": launcher.constraint,
        "array_parallelism": launcher.array_parallelism,
        "additional_parameters": dict(launcher.additional_parameters) or None,
        "setup": list(launcher.setup) or None,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def _mem(mem_gb: float) -> str:
    return f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"


class _PlanningSlurmExecutor(SlurmExecutor):
    """A SlurmExecutor that only renders its sbatch file, so --dry-run works off the cluster."""

    @classmethod
    def affinity(cls) -> int:
        return 1

    def _submit_command(self, command: str) -> submitit.Job[Any]:
        raise RuntimeError("planning executor: never submits")


def sbatch_text(launcher: Launcher, root: Path, job_name: str, n_arms: int) -> str:
    """The sbatch file submitit would submit for `n_arms` arms (an array when n_arms > 1).

    Rendered by submitit itself (`_make_submission_file_text`), the same way its array
    submission does, so these are the real parameters.
    """
    executor = _PlanningSlurmExecutor(job_folder(root))
    executor.update_parameters(**slurm_parameters(launcher, job_name))
    if n_arms > 1:
        executor.parameters["map_count"] = n_arms
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def resources(launcher: Launcher) -> str:
    """One line describing what each arm gets."""
    if launcher.executor == "debug":
        return "debug: in this process, one arm after another"
    where = f"{launcher.nodes} node(s)" if launcher.executor == "slurm" else "this machine"
    parts = [
        where,
        f"{launcher.tasks_per_node} task(s)/node",
        f"{launcher.gpus_per_node} GPU(s)/node",
        f"time limit {launcher.time_limit_min} min",
    ]
    if launcher.cpus_per_task:
        parts.append(f"{launcher.cpus_per_task} CPU(s)/task")
    if launcher.mem_gb:
        parts.append(f"{launcher.mem_gb:g} GB")
    if launcher.partition:
        parts.append(f"partition {launcher.partition}")
    parts.append(f"at most {launcher.array_parallelism or 'all'} at once")
    return f"{launcher.executor}: " + ", ".join(parts)


def submit(
    executor: submitit.Executor,
    run_dirs: Sequence[Path],
    *,
    parallelism: int | None = None,
    fn: Callable[[str], Any] | None = None,
    poll_s: float = 1.0,
) -> list[submitit.Job[Any]]:
    """Submit one job per run directory, recording each job in its run directory.

    One array (`executor.batch()`) for every executor, except that for the local executor,
    which starts each array element at once, at most `parallelism` run at a time: this call
    then blocks, polling every `poll_s` seconds, until the last arm has been started.
    `fn` is the job callable: `RunArm()` (default; recorded in job.json and status.json) or an
    `EvalArm` (recorded in eval_job.json).
    """
    fn = RunArm() if fn is None else fn
    record = mark_eval_submitted if isinstance(fn, EvalArm) else mark_submitted
    if not run_dirs:
        return []
    if (
        isinstance(executor, submitit.LocalExecutor)
        and parallelism is not None
        and parallelism < len(run_dirs)
    ):
        return _submit_in_waves(executor, run_dirs, parallelism, fn, record, poll_s)
    with executor.batch():
        jobs = [executor.submit(fn, str(run_dir)) for run_dir in run_dirs]
    for run_dir, job in zip(run_dirs, jobs, strict=True):
        _record(record, run_dir, job, executor)
    return jobs


def _submit_in_waves(
    executor: submitit.Executor,
    run_dirs: Sequence[Path],
    parallelism: int,
    fn: Callable[[str], Any],
    record: Callable[..., None],
    poll_s: float,
) -> list[submitit.Job[Any]]:
    pending = list(run_dirs)
    jobs: list[submitit.Job[Any]] = []
    running: list[submitit.Job[Any]] = []
    while pending:
        running = [job for job in running if not job.done()]
        while pending and len(running) < parallelism:
            run_dir = pending.pop(0)
            job = executor.submit(fn, str(run_dir))
            _record(record, run_dir, job, executor)
            jobs.append(job)
            running.append(job)
        if pending:
            time.sleep(poll_s)
    return jobs


def _record(
    record: Callable[..., None], run_dir: Path, job: submitit.Job[Any], executor: submitit.Executor
) -> None:
    record(run_dir, str(job.job_id), executor.folder, job.paths.stdout, job.paths.stderr)


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
