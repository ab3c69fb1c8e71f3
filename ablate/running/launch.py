"""Launching arms through submitit: the executor table, the `launcher` schema, building an executor.

Everything that differs between executor kinds lives in one row of `EXECUTORS`: how to build
the submitit executor, which `launcher` fields it uses, whether `ablate run` follows its jobs by
default, whether they outlive `ablate`, who enforces `array_parallelism`, how to tell whether
a recorded job still runs, and how to cancel it. No other module branches on an executor's name.

The jobs themselves and their submission are `ablate/running/jobs.py`.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import submitit
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt
from submitit.slurm.slurm import SlurmExecutor

from ablate.errors import UserError
from ablate.running import processes
from ablate.running.processes import pid_alive
from core.records import Job
from core.sweepdir import SweepDir

# sacct states of a job that still holds (or will again hold) its arm.
_SLURM_ALIVE = {
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
    "SUSPENDED", "RESIZING", "PREEMPTED", "STOPPED", "SIGNALING", "STAGE_OUT",
}  # fmt: skip


# --- is a recorded job still running? Cancelling it -------------------------------------------------


def _owner_alive(job: Job) -> tuple[bool | None, str]:
    """Jobs not yet submitted, and debug jobs, live as long as the `ablate` process that owns them."""
    if job.host != socket.gethostname():
        return None, ""
    return pid_alive(job.submitter_pid), ""


def _local_alive(job: Job) -> tuple[bool | None, str]:
    """A local job lives while what submitit started (its id) does, or anything of its process group that
    submitit runs (the controller, the trainer)."""
    if job.host != socket.gethostname():
        return None, ""
    pid = int(job.job_id)
    return pid_alive(pid, must_contain=b"submitit") or bool(processes.members(pid, b"submitit")), ""


def _cannot_cancel(job: Job, record: Callable[[], object], trainer: int | None) -> tuple[bool, str]:
    return (
        False,
        "not cancelled: its job runs inside the `ablate` process that submitted it: stop that one (Ctrl-C)",
    )


def _cancel_local(job: Job, record: Callable[[], object], trainer: int | None) -> tuple[bool, str]:
    """Stop the job's whole process group and see it gone (and `trainer`, its trainer's pid, with it)."""
    if job.host != socket.gethostname():
        return False, f"not cancelled: its job runs on {job.host}: cancel it there"
    group = int(job.job_id)
    if not processes.members(group) and pid_alive(group, must_contain=b"submitit"):
        return False, (
            f"not cancelled: its job (pid {group}) was started by an older ablate, in the process group of "
            f"the `ablate` that submitted it; stop it and its children by hand (pkill -INT -P {group})"
        )
    record()  # before the signal: a trainer stopping leaves a cancelled status alone
    left, last = processes.stop([group], [trainer] if trainer else [])
    if left:
        return False, (
            f"job {group} cancelled, but not confirmed: process(es) {', '.join(map(str, left))} still run after "
            f"{', '.join(s.name for s, _ in processes.STOP_STEPS)}; `ablate status` shows them until they end"
        )
    how = "" if last == "SIGINT" else f" ({last}: it outlived the signals before)"
    return True, f"job {group} cancelled: its processes are gone{how}"


def _stop_local(jobs: Sequence[Job]) -> None:
    """Stop the local jobs among `jobs` that still run: a group whose submitit processes have ended may
    have had its id reused by now, and is left alone."""
    here = [int(j.job_id) for j in jobs if j.job_id and j.host == socket.gethostname()]
    processes.stop([g for g in here if processes.members(g, b"submitit")])


def _cancel_slurm(job: Job, record: Callable[[], object], trainer: int | None) -> tuple[bool, str]:
    done = subprocess.run(["scancel", str(job.job_id)], capture_output=True, text=True)
    if done.returncode != 0:
        return False, f"not cancelled: scancel {job.job_id} failed: {done.stderr.strip()[:200]}"
    record()
    return (
        True,
        f"job {job.job_id} cancelled (scancel: SLURM stops its processes, SIGKILL after the cluster's KillWait)",
    )


def _slurm_alive(job: Job) -> tuple[bool | None, str]:
    info = submitit.SlurmJob(folder=job.folder or ".", job_id=str(job.job_id)).get_info(mode="force")
    state = info.get("State", "")
    state = state.split()[0] if state else "UNKNOWN"  # "CANCELLED by 123"
    return (None if state == "UNKNOWN" else state in _SLURM_ALIVE), f"slurm: {state}"


# --- building executors --------------------------------------------------------------------------------


def _build_debug(launcher: Launcher, folder: Path, job_name: str) -> submitit.Executor:
    return submitit.DebugExecutor(folder)


def _build_local(launcher: Launcher, folder: Path, job_name: str) -> submitit.Executor:
    executor = processes.LocalExecutor(folder, max_num_timeout=launcher.max_requeues)
    executor.update_parameters(**local_parameters(launcher))
    return executor


def _build_slurm(launcher: Launcher, folder: Path, job_name: str) -> submitit.Executor:
    executor = SlurmExecutor(folder, max_num_timeout=launcher.max_requeues)
    executor.update_parameters(**slurm_parameters(launcher, job_name))
    return executor


def _check_slurm(launcher: Launcher) -> None:
    if SlurmExecutor.affinity() <= 0:
        raise UserError(
            "executor slurm needs `srun` on PATH, and it is not (not on a SLURM login node?)",
            "to run on a SLURM login node, or launcher.executor: local (or --dry-run to see the sbatch file)",
            path="launcher.executor",
        )


@dataclass(frozen=True)
class ExecutorKind:
    """One executor kind: every way in which `ablate` treats it differently."""

    name: str
    doc: str
    executor_type: type[submitit.Executor]
    build: Callable[[Launcher, Path, str], submitit.Executor]
    fields: frozenset[str]
    """launcher fields it uses; the others must keep their defaults (a silently ignored setting is an error)"""
    job_state: Callable[[Job], tuple[bool | None, str]]
    """whether a job it runs, recorded in job.json, still runs (True, False, or None: cannot tell from here),
    and what its scheduler says of it ('' when nothing more)"""
    cancel: Callable[[Job, Callable[[], object], int | None], tuple[bool, str]]
    """cancel a job recorded in job.json: (job, record, its trainer's pid on this host or None) → (whether
    it is cancelled for sure, one line saying what happened); calls `record()` (which writes the arm
    cancelled) once the cancellation can no longer be refused, before the job's processes can record their end"""
    stop: Callable[[Sequence[Job]], None] = lambda jobs: None
    """on Ctrl-C, stop the jobs `ablate` submitted that do not outlive it (`outlives_cli` False)"""
    in_process: bool = False
    """jobs run inside `ablate` itself: it must wait for them (no --no-wait)"""
    waits: bool = True
    """`ablate run` / `ablate eval` follow the jobs until they end unless --no-wait"""
    outlives_cli: bool = False
    """submitted jobs keep running when `ablate` exits"""
    throttle_here: bool = False
    """`ablate` itself enforces array_parallelism (the executor would start every array element at once)"""
    check: Callable[[Launcher], None] = lambda launcher: None
    """raises a UserError when it cannot run on this machine"""
    where: str = "this machine"
    submission_file: tuple[str, Callable[[Launcher, Path, str, int], str]] | None = None
    """(what it is called, a renderer (launcher, root, job name, arms) → text) of the file a submission
    hands the scheduler, for `ablate run --dry-run`"""


_LOCAL_FIELDS = frozenset(
    {
        "gpus_per_node",
        "tasks_per_node",
        "time_limit_min",
        "signal_delay_s",
        "max_requeues",
        "array_parallelism",
        "setup",
    }
)
EXECUTORS: dict[str, ExecutorKind] = {
    "debug": ExecutorKind(
        "debug", "in this process, one arm after another (breakpoints work)", submitit.DebugExecutor,
        _build_debug, frozenset(), _owner_alive, _cannot_cancel, in_process=True,
    ),
    "local": ExecutorKind(
        "local", "subprocesses on this machine", submitit.LocalExecutor, _build_local, _LOCAL_FIELDS,
        _local_alive, _cancel_local, stop=_stop_local, throttle_here=True,
    ),
    "slurm": ExecutorKind(
        "slurm", "one sbatch job array", SlurmExecutor, _build_slurm,
        _LOCAL_FIELDS | {"nodes", "cpus_per_task", "mem_gb", "partition", "account", "qos", "constraint",
                         "additional_parameters"},
        _slurm_alive, _cancel_slurm, waits=False, outlives_cli=True, check=_check_slurm, where="{nodes} node(s)",
        submission_file=("sbatch file", lambda *args: sbatch_text(*args)),
    ),
}  # fmt: skip


class Launcher(BaseModel):
    """Where and with what resources the arms run. Every arm gets the same resources."""

    model_config = ConfigDict(extra="forbid")

    executor: Literal[tuple(EXECUTORS)] = "local"  # type: ignore[valid-type]
    """debug: in this process, one arm after another (breakpoints work); local: subprocesses
    on this machine; slurm: one sbatch job array."""
    nodes: PositiveInt = 1
    gpus_per_node: int = Field(0, ge=0)
    tasks_per_node: PositiveInt = 1
    cpus_per_task: PositiveInt | None = None
    mem_gb: PositiveFloat | None = None
    time_limit_min: PositiveInt = 60
    """Per job; a job that reaches it is requeued and resumes from its newest checkpoint."""
    signal_delay_s: PositiveInt = 90
    """The stop signal comes this long before the time limit: time to reach a log point and save."""
    max_requeues: int = Field(3, ge=0)
    """Time-limit requeues before an arm ends as failed (submitit's max_num_timeout); preemptions always requeue."""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    array_parallelism: PositiveInt | None = None
    """At most this many arms run at once (default: all)."""
    additional_parameters: dict[str, str | int | float | bool] = Field(default_factory=dict)
    """Extra `#SBATCH --key=value` lines, for options that have no field here."""
    setup: list[str] = Field(default_factory=list)
    """Shell lines run before the job starts (module load, source venv ...)."""

    @property
    def kind(self) -> ExecutorKind:
        return EXECUTORS[self.executor]


# sbatch options that typed launcher fields produce; additional_parameters may not repeat them.
_SBATCH_FROM_FIELDS = {
    "job_name": "name",
    "time": "time_limit_min",
    "nodes": "nodes",
    "ntasks_per_node": "tasks_per_node",
    "gpus_per_node": "gpus_per_node",
    "cpus_per_task": "cpus_per_task",
    "mem": "mem_gb",
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "constraint": "constraint",
    "array": "array_parallelism",
}
_SBATCH_OWN = ("signal", "output", "error", "open_mode")  # submitit sets these for requeue and logs


def problems(launcher: Launcher) -> Iterator[tuple[tuple[str, ...], str, str]]:
    """Cross-field checks of a launcher section: (key path, what is wrong, what would be right)."""
    kind = launcher.kind
    for name, field in Launcher.model_fields.items():
        if name == "executor" or name in kind.fields:
            continue
        if getattr(launcher, name) != field.get_default(call_default_factory=True):
            users = " or ".join(k for k, e in EXECUTORS.items() if name in e.fields)
            yield (
                ("launcher", name),
                f"the {kind.name} executor does not use this setting",
                f"it removed, or executor: {users}",
            )
    for key in launcher.additional_parameters:
        normalised = key.replace("-", "_")
        if normalised in _SBATCH_FROM_FIELDS or normalised in _SBATCH_OWN:
            own = _SBATCH_FROM_FIELDS.get(normalised)
            yield (
                ("launcher", "additional_parameters", key),
                f"'{key}' is set by ablate itself",
                f"launcher.{own} instead" if own and own != "name" else "it removed",
            )


def check_available(launcher: Launcher) -> None:
    """Fail before anything is created when the chosen executor cannot run here."""
    launcher.kind.check(launcher)


def build_executor(
    launcher: Launcher, root: Path, job_name: str, setup: Sequence[str] = ()
) -> submitit.Executor:
    """The submitit executor for the sweep's `launcher` section; jobs keep their files under `root`.

    `setup`: shell lines run before each job, ahead of the launcher's own (the code snapshot's).
    """
    check_available(launcher)
    if setup and not launcher.kind.in_process:
        launcher = launcher.model_copy(update={"setup": [*setup, *launcher.setup]})
    return launcher.kind.build(launcher, SweepDir(root).job_folder, job_name)


def kind_of(executor: submitit.Executor) -> ExecutorKind:
    return next(k for k in EXECUTORS.values() if isinstance(executor, k.executor_type))


def job_state(job: Job) -> tuple[bool | None, str]:
    """Whether the job recorded in job.json (or eval_job.json) still runs (True, False, or None: cannot
    tell), and what its scheduler says of it."""
    kind = EXECUTORS.get(job.executor or "")
    if kind is None or not job.job_id:
        return _owner_alive(job)  # queued for a slot: owned by the `ablate` process that will submit it
    return kind.job_state(job)


def job_alive(job: Job) -> bool | None:
    return job_state(job)[0]


def cancel(job: Job, record: Callable[[], object], trainer: int | None = None) -> tuple[bool, str]:
    """Cancel the job recorded in job.json (or eval_job.json) through its executor, calling `record()` once
    it is sure to go (ExecutorKind.cancel); returns whether it is cancelled for sure, and what happened."""
    kind = EXECUTORS.get(job.executor or "")
    if kind is None or not job.job_id:
        return (
            False,
            "not cancelled: no job submitted yet (the `ablate` process that queued it still owns it)",
        )
    return kind.cancel(job, record, trainer)


def stop(jobs: Sequence[Job]) -> None:
    """On Ctrl-C: stop the jobs this `ablate` submitted, where they do not outlive it (local ones)."""
    for name, kind in EXECUTORS.items():
        kind.stop([job for job in jobs if job.executor == name])


def resolve_wait(launcher: Launcher, wait: bool | None) -> bool:
    """--wait/--no-wait: the executor's default; an in-process executor always waits."""
    kind = launcher.kind
    wait = kind.waits if wait is None else wait
    if kind.in_process and not wait:
        raise UserError(
            f"--no-wait with the {kind.name} executor, which runs the jobs inside this process",
            "--wait, or launcher.executor: local",
            path="--no-wait",
        )
    return wait


def local_parameters(launcher: Launcher) -> dict[str, Any]:
    # LocalExecutor's own default time limit is 2 minutes: always pass ours.
    params: dict[str, Any] = {
        "timeout_min": launcher.time_limit_min,
        "tasks_per_node": launcher.tasks_per_node,
        "gpus_per_node": launcher.gpus_per_node,
    }
    if launcher.signal_delay_s != Launcher.model_fields["signal_delay_s"].default:
        params["signal_delay_s"] = launcher.signal_delay_s
    if launcher.setup:
        params["setup"] = list(launcher.setup)
    return params


def slurm_parameters(launcher: Launcher, job_name: str) -> dict[str, Any]:
    """SlurmExecutor.update_parameters keywords (sbatch options) for the launcher section."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": launcher.time_limit_min,
        "signal_delay_s": launcher.signal_delay_s,
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
    executor = _PlanningSlurmExecutor(SweepDir(root).job_folder)
    executor.update_parameters(**slurm_parameters(launcher, job_name))
    if n_arms > 1:
        executor.parameters["map_count"] = n_arms
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def resources(launcher: Launcher) -> str:
    """One line describing what each arm gets."""
    kind = launcher.kind
    if kind.in_process:
        return f"{kind.name}: {kind.doc}"
    parts = [
        kind.where.format(nodes=launcher.nodes),
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
    return f"{kind.name}: " + ", ".join(parts)
