"""What each record of a run folder holds: one typed model per file.

The trainer and the orchestrator write and read these records only through `core.rundir.RunDir`,
which validates them on the way in and out. A record is strict about the types of the fields it
declares (a string where a number belongs is not coerced) and ignores fields it does not know, so a
record written by an older or newer version of ablate still reads. A file whose content is not the
record's shape reads as `Unreadable`, naming the file and the field.

    spec.json           Spec        the arm's identity            `ablate run`
    status.json         Status      its state and progress        `ablate run`, the trainer, `ablate cancel`
    job.json            Job         the job that runs it          `ablate run`
    eval_job.json       EvalJob     the latest `ablate eval` job  `ablate eval`, its job
    writer.json         Writer      who holds the writer lock     the trainer (or an eval job)
    code.json           Code        the code its job runs         `ablate run`, `ablate eval`
    log.jsonl           LogRow      one line per log step         the trainer
    eval/step_N.json    EvalRecord  the metrics at step N         the trainer, `ablate eval` jobs
    result.json         Result      the finished arm              the trainer
    .ablate-sweep       SweepMark   the sweep that owns a folder  `ablate run` (the sweep root)
    .ablate-stage2      Stage2      a confirmatory second stage   `ablate run --resolve` (the sweep root)

`eval/step_N.json` is the only place a metric value lives: `result.json` holds no copy of it.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class Record(BaseModel):
    """A run-folder record: strict types, unknown fields ignored, immutable."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


R = TypeVar("R", bound=Record)


class Spec(Record):
    """The arm's identity, written before submission."""

    name: str | None = None
    delta: str | None = None
    seed: int | None = None
    hash: str | None = None
    """the hash of what the arm trains: its config's fields that train (`trainer.identity`)"""
    hash_version: int | None = None
    """how `hash` and `eval_hash` were computed; older versions are hashed again from config.yaml"""
    eval_hash: str | None = None
    """the hash of how its checkpoints are scored: its config's evaluation settings"""
    roles: dict[str, str] | None = None
    """where its config's execution (`runs`) and evaluation (`evaluates`) settings are: dotted path → role
    (the rest trains), so that torch-free commands tell a changed setting's role"""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """the delta's overrides as written in the sweep file ({} for the baseline)"""
    sweep: str | None = None
    settings_hash: str | None = None
    """the hash of what the sweep file set for the arm before defaults (drift, torch-free)"""


class Requeue(Record):
    step: int | None = None
    reason: str | None = None
    at: str | None = None


class SetAside(Record):
    """A checkpoint that failed verification, moved to checkpoints/.set-aside/ (`RunDir.set_aside`)."""

    checkpoint: str | None = None
    """its name: step_00000400"""
    step: int | None = None
    reason: str | None = None
    """why it failed verification: 'state.pt does not match its checksum'"""
    moved_to: str | None = None
    """where it went, relative to the run folder (pruned later: docs/run-directory.md)"""
    at: str | None = None


def _job_id(value: Any) -> Any:
    """Scheduler job ids are strings; an integer written by hand or an older tool is taken as one."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class Status(Record):
    """The arm's state (`core.rundir.STATES`) and progress. Each write keeps the fields it does not set."""

    state: str | None = None
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    """the last logged training loss (mean over processes)"""
    error: str | None = None
    """one line: why it failed"""
    pid: int | None = None
    host: str | None = None
    """the main trainer process and its host"""
    world_size: int | None = None
    job_id: str | None = None
    requeues: int = 0
    last_requeue: Requeue | None = None
    restarts: int | None = None
    set_aside: list[SetAside] = Field(default_factory=list)
    """checkpoints that failed verification and were set aside, in the order they were"""
    restarted_from_zero: bool = False
    """checkpoints existed but none verified: training started again from step 0"""
    cancelled_at: str | None = None
    updated_at: str | None = None

    job_id_as_text = field_validator("job_id", mode="before")(_job_id)


class Job(Record):
    """The job that runs the arm: who queued it, the scheduler's id, where its logs go."""

    executor: str | None = None
    job_id: str | None = None
    host: str | None = None
    """where `ablate` queued it (local jobs run there)"""
    submitter_pid: int | None = None
    """the `ablate` process that owns the arm until its job is submitted"""
    queued_at: str | None = None
    folder: str | None = None
    stdout: str | None = None
    stderr: str | None = None
    submitted_at: str | None = None

    job_id_as_text = field_validator("job_id", mode="before")(_job_id)


class EvalJob(Job):
    """The latest `ablate eval` job of the arm: its state, the step it scores, and how it ended."""

    state: str | None = None
    step: int | None = None
    error: str | None = None
    metrics: dict[str, float | None] | None = None
    updated_at: str | None = None


class Writer(Record):
    """Who holds the folder's writer lock (`core.rundir.WriterLock`)."""

    host: str | None = None
    pid: int | None = None
    started_at: str | None = None


class Code(Record):
    """The code the arm's job runs (`ablate.running.snapshot`)."""

    commit: str | None = None
    dirty: bool = False
    untracked: list[str] = Field(default_factory=list)
    """untracked source files copied into the snapshot"""
    left_out: list[str] = Field(default_factory=list)
    """untracked files in the packages not copied: not source (`snapshot.SOURCE_SUFFIXES`)"""
    snapshot: str | None = None
    """the snapshot folder jobs import from"""
    source: str | None = None
    """the checkout it was taken from"""
    installed: str | None = None
    """the installed version, when ablate runs from a wheel rather than a checkout"""


class LogRow(Record):
    """One line of log.jsonl: the state of training at a log step."""

    step: int
    loss: float
    lr: float | None = None
    grad_norm: float | None = None
    batches_per_s: float | None = None
    samples_per_s: float | None = None
    data_s: float | None = None
    compute_s: float | None = None
    eta_s: float | None = None
    time: str | None = None


class EvalRecord(Record):
    """eval/step_N.json: the metrics at one step, the one channel every reader of metrics uses."""

    step: int
    metrics: dict[str, float | None]
    val_samples: int | None = None
    """held-out rows behind val_loss"""
    generated_samples: int | None = None
    """images generated for the generation metrics"""
    resampled: list[str] = Field(default_factory=list)
    """the metrics eval/step_N.resamples.npy holds, one row each, in order (none: no eval noise kept)"""
    eval_hash: str | None = None
    """the hash of the evaluation settings these metrics were computed with (Spec.eval_hash's kind)"""
    hash_version: int | None = None


class Throughput(Record):
    """Steady-state speed of the arm (the first steps' warm-up left out)."""

    batches_per_s: float | None = Field(None, ge=0)
    samples_per_s: float | None = Field(None, ge=0)
    step_s: float | None = None
    data_s: float | None = None
    compute_s: float | None = None
    steps_measured: int | None = None
    world_size: int | None = None
    step_s_median: float | None = Field(None, ge=0)
    """the median over log windows of the seconds per step: the speed a shared or throttled node moves least"""
    windows: list[float] = Field(default_factory=list)
    """seconds per step of each log window after warm-up, in order (at most 256, evenly thinned)"""
    drift: float | None = None
    """the last third of the windows' median step time over the first third's: 1 on a steady node"""


class Result(Record):
    """result.json: the arm finished training. Its metrics are in eval/."""

    name: str | None = None
    step: int | None = None
    """the last step trained"""
    throughput: Throughput = Field(default_factory=Throughput)
    timings: dict[str, float] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    finished_at: str | None = None


class SweepMark(Record):
    """The sweep root's marker: the folder is ablate's, for this sweep."""

    sweep: str | None = None
    marked_at: str | None = None


class Stage2(Record):
    """`ablate run --resolve`: the changes the first seeds left open, tested again on new seeds only.

    The sizes come from the first stage; the verdicts of these cells come from the second stage's
    seeds alone (the first stage's estimates never enter them), with the same moderated interval and
    false-discovery control over this family, so choosing what to re-test cannot bias them."""

    first_seeds: list[int]
    """the seeds the verdicts so far came from"""
    baseline: list[int]
    """the baseline's new seeds (every planned delta pairs with some of them)"""
    deltas: dict[str, list[int]]
    """each re-tested delta's new seeds"""
    cells: dict[str, list[str]]
    """delta → the metrics whose verdict the second stage gives"""
    step: int | None = None
    """the step both stages are ranked at"""
    gpu_hours: float | None = None
    """what the plan was expected to cost"""
    planned_at: str | None = None


def shape_problem(error: ValidationError) -> str:
    """The first field that does not fit, as a reader would say it: "field 'step' is a string"."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    if first["type"] == "missing":
        return f"field '{field}' is missing"
    return f"field '{field}' is {json_type(first.get('input'))}"


def json_type(value: Any) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")
