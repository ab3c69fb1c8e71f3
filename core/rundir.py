"""The run directory: one folder per arm, the only interface between the orchestrator and its jobs.

    <sweep root>/                      SweepDir
      .ablate-sweep                    marks the folder as made by ablate for this sweep (SweepDir.mark)
      .ablate.lock                     held by `ablate run` / `ablate eval` while they plan and submit
      .submitit/<job id>/              submitit's pickles and each job's stdout/stderr
      .replaced/<arm>-<hash>-<time>/   run folders moved aside by `--rerun` / `--force`
      .ablate-stage2                   the confirmatory second stage `ablate run --resolve` planned
      .eval-cache/                     reference features, the demo's attribute net (eval.cache_dir default)
      .code/<commit>[-<changes>]/      code snapshots the jobs import (ablate/running/snapshot.py)
      figures/, report.html            `ablate plot`, `ablate report`
      wandb/                           `ablate rank --wandb` (W&B's own folder)
      <delta>-s<seed>/                 RunDir, one per arm
        config.yaml       the resolved trainer config             `ablate run`, before submission
        spec.json         name, delta, seed, hash, overrides      `ablate run`, before submission
        job.json          executor, job id, host, log paths       `ablate run`
        code.json         the commit and code snapshot its job runs   `ablate run`
        code.diff         uncommitted changes at submission, if any   `ablate run`
        status.json       state, step, loss, error (STATES)       `ablate run`, then the trainer
        log.jsonl         one JSON line per log step (core.trainlog)   trainer
        checkpoints/step_00000100/   a complete checkpoint        trainer (contents: trainer/runtime/checkpoint.py)
        checkpoints/.set-aside/      checkpoints that failed verification (deleted once older than every one kept)
        checkpoints/.pruning-…       a checkpoint being deleted: out of sight first (deleted at the next start)
        eval/step_N.json  metrics at step N: THE source of per-step metrics   trainer, `ablate eval` jobs
        eval/step_N.png   the sample grid at step N               trainer, `ablate eval` jobs
        result.json       final step, throughput, timings, versions (no metrics)   trainer
        eval_job.json     the latest `ablate eval` job (state, step, metrics or error)   `ablate eval`, its job
        export/step_N/    a checkpoint as a diffusers folder (its name)   `ablate export`
        launcher          symlink to the job's submitit folder    `ablate run`
        .writer.lock      flock held by the one live trainer (or eval job) writing the folder
        .state.lock       flock held for a moment around each write of status.json or eval_job.json
        writer.json       who holds it: host, pid, started_at     that trainer

Ablate makes no symbolic link under the sweep root but each run folder's `launcher`, and writes through
none: a link planted where it writes is refused (`SweepDir.planted_links`, `RunDir.planted_links`).

What each record holds is a typed model of `core.records`; every record is written through
`core.atomic` (a reader never sees a torn file) and read back through its model, so a corrupt or
mistyped record raises `Unreadable` naming the file. This module is the only place that spells
these names; it imports neither torch nor the orchestrator.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from core import arrays, trainlog
from core.atomic import Unreadable, atomic_write, atomic_write_json, exclusive, read_json
from core.records import (
    Code,
    EvalJob,
    EvalRecord,
    Job,
    LogRow,
    R,
    Result,
    SetAside,
    Spec,
    Status,
    Writer,
    shape_problem,
)

CONFIG, SPEC, JOB = "config.yaml", "spec.json", "job.json"
STATUS, RESULT, LOG = "status.json", "result.json", "log.jsonl"
EVAL_JOB, EVAL, CHECKPOINTS, LAUNCHER = "eval_job.json", "eval", "checkpoints", "launcher"
CODE, CODE_DIFF, EXPORT = "code.json", "code.diff", "export"
WRITER_LOCK, WRITER, STATE_LOCK = ".writer.lock", "writer.json", ".state.lock"
LOCK, SUBMITIT, REPLACED, EVAL_CACHE = ".ablate.lock", ".submitit", ".replaced", ".eval-cache"
SWEEP_MARK = ".ablate-sweep"  # in the sweep root: {"sweep": name}; the folder is ablate's
CODE_FOLDER, FIGURES, REPORT, WANDB = ".code", "figures", "report.html", "wandb"  # in the sweep root
STAGE2 = ".ablate-stage2"  # in the sweep root: the confirmatory second stage `ablate run --resolve` planned
CHECKPOINT_PREFIX, SET_ASIDE, PRUNING = "step_", ".set-aside", ".pruning-"
# status.json fields about the folder's checkpoints: a fresh status (a re-queued arm) keeps them
CHECKPOINT_HISTORY = ("set_aside", "restarted_from_zero")

# The states written to status.json (and, for an `ablate eval` job, to eval_job.json), and who writes them:
QUEUED = (
    "queued"  # `ablate run`: the folder is ready, its job not yet submitted (the submitting process owns it)
)
SUBMITTED = "submitted"  # `ablate run` once the executor has the job; the trainer when it is requeued
RUNNING = "running"  # the trainer, at start and at every log step
DONE = "done"  # the trainer, after result.json
FAILED = "failed"  # the trainer (or the job around it) with the error
CANCELLED = (
    "cancelled"  # `ablate cancel`, once the scheduler has the cancellation; only `ablate run` moves on
)
STATES = (QUEUED, SUBMITTED, RUNNING, DONE, FAILED, CANCELLED)
IN_FLIGHT = (QUEUED, SUBMITTED, RUNNING)
TRAINER_OVERWRITES = (None, QUEUED, SUBMITTED, RUNNING, DONE, FAILED)  # the states a trainer may write over
# What the orchestrator may conclude from a folder besides a written state (never written):
MISSING = "missing"  # no spec.json: never prepared
STALE = "stale"  # written in flight, but the job or process that owned it is gone
UNREADABLE = "unreadable"  # a record is corrupt; the note names the file

# state now → states that may be written next. A trainer started by hand may begin from nothing or
# from `done` (it resumes at the end); `ablate run` re-queues anything that is not in flight.
TRANSITIONS: dict[str | None, frozenset[str]] = {
    None: frozenset({QUEUED, RUNNING, FAILED}),
    QUEUED: frozenset({QUEUED, SUBMITTED, RUNNING, FAILED, CANCELLED}),
    SUBMITTED: frozenset({QUEUED, SUBMITTED, RUNNING, FAILED, CANCELLED}),
    RUNNING: frozenset({QUEUED, SUBMITTED, RUNNING, DONE, FAILED, CANCELLED}),
    DONE: frozenset({QUEUED, RUNNING, FAILED}),
    FAILED: frozenset({QUEUED, RUNNING, FAILED}),
    CANCELLED: frozenset({QUEUED}),
}

_EVAL_RECORD = re.compile(r"^step_(\d+)\.json$")
_SET_ASIDE_ENTRY = re.compile(r"^step_(\d+)-")


def now() -> str:
    """A UTC timestamp, as every record writes it."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def check_transition(old: str | None, new: str, what: Path) -> None:
    if old not in TRANSITIONS:
        old = None  # an unknown state written by something else: any start is allowed
    if new not in TRANSITIONS[old]:
        raise ValueError(f"{what}: state {old!r} cannot become {new!r} (allowed: {sorted(TRANSITIONS[old])})")


class RunDir:
    """One arm's folder: its paths, and every write and read of its records."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    # -- paths -------------------------------------------------------------------------------------
    config = property(lambda self: self.path / CONFIG)
    spec = property(lambda self: self.path / SPEC)
    job = property(lambda self: self.path / JOB)
    status = property(lambda self: self.path / STATUS)
    result = property(lambda self: self.path / RESULT)
    log = property(lambda self: self.path / LOG)
    eval_job = property(lambda self: self.path / EVAL_JOB)
    eval_dir = property(lambda self: self.path / EVAL)
    checkpoints = property(lambda self: self.path / CHECKPOINTS)
    launcher = property(lambda self: self.path / LAUNCHER)

    @property
    def default_eval_cache(self) -> Path:
        """Where reference features and the demo's attribute net go unless eval.cache_dir says otherwise."""
        return self.path.parent / EVAL_CACHE

    def eval_record(self, step: int) -> Path:
        return self.eval_dir / f"step_{step}.json"

    def eval_grid(self, step: int) -> Path:
        return self.eval_dir / f"step_{step}.png"

    def eval_resamples(self, step: int) -> Path:
        """Each metric on the eval's resamples of the prompts, (metrics, B) float32: its eval noise."""
        return self.eval_dir / f"step_{step}.resamples.npy"

    def eval_items(self, step: int) -> Path:
        """What the resamples came from: per-prompt features (float16) and scores."""
        return self.eval_dir / f"step_{step}.items.npz"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{step:08d}"

    def export(self, step: int) -> Path:
        """Where `ablate export` writes checkpoint `step` as a diffusers folder by default."""
        return self.path / EXPORT / f"{CHECKPOINT_PREFIX}{step:08d}"

    def checkpoint_tmp(self, step: int) -> Path:
        """Where checkpoint `step` is written before it is renamed into place."""
        return self.checkpoints / f".{CHECKPOINT_PREFIX}{step:08d}.tmp"

    def partial_checkpoints(self) -> list[Path]:
        """Folders a killed writer left behind: a save's temporary folder and a deletion's (`pruning`);
        never complete, safe to delete."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(
            [*self.checkpoints.glob(f".{CHECKPOINT_PREFIX}*.tmp"), *self.checkpoints.glob(f"{PRUNING}*")]
        )

    def pruning(self, folder: Path) -> Path:
        """Where a checkpoint (or a set-aside one) is renamed before it is deleted: a kill during the
        deletion leaves a folder no reader takes for a checkpoint."""
        return self.checkpoints / f"{PRUNING}{folder.name}"

    def set_aside(self, checkpoint: Path, reason: str) -> Path:
        """Move a checkpoint that failed verification (`reason`) to checkpoints/.set-aside/ for a post-mortem,
        and add it to status.json's `set_aside`."""
        at = dt.datetime.now(dt.timezone.utc)
        target = self.checkpoints / SET_ASIDE / f"{checkpoint.name}-{at:%Y%m%dT%H%M%S.%f}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(checkpoint, target)
        name = checkpoint.name  # a complete checkpoint's: step_N
        entry = SetAside(checkpoint=name, step=int(name.removeprefix(CHECKPOINT_PREFIX)), reason=reason,
                         moved_to=target.relative_to(self.path).as_posix(), at=now())  # fmt: skip
        self.update_status(set_aside=[*(self.read_status() or Status()).set_aside, entry])
        return target

    def set_aside_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, folder) of each checkpoint in checkpoints/.set-aside/, by step."""
        folder = self.checkpoints / SET_ASIDE
        if not folder.is_dir():
            return []
        found = ((_SET_ASIDE_ENTRY.match(p.name), p) for p in folder.iterdir() if p.is_dir())
        return sorted((int(m.group(1)), p) for m, p in found if m)

    def planted_links(self, but: Iterable[str] = ()) -> list[str]:
        """Entries of the folder (and of eval/, checkpoints/) that are symbolic links, `launcher` aside:
        ablate makes no others, and writes nothing through one. `but`: entries left out (records about to
        be written anew, which replaces a link)."""
        found = []
        for folder in (self.path, self.eval_dir, self.checkpoints):
            if folder.is_dir() and not folder.is_symlink():
                found += [p for p in folder.iterdir() if p.is_symlink() and p != self.launcher]
        return sorted(name for p in found if (name := p.relative_to(self.path).as_posix()) not in but)

    def refuse_planted_links(self, but: Iterable[str] = ()) -> None:
        if links := self.planted_links(but):
            raise PlantedLink(
                f"{self.path}: {', '.join(links)} {'is a symbolic link' if len(links) == 1 else 'are symbolic links'}; "
                f"ablate writes nothing through a link in a run folder (remove {'it' if len(links) == 1 else 'them'})"
            )

    # -- reading -----------------------------------------------------------------------------------
    def read_spec(self) -> Spec | None:
        return read_record(self.spec, Spec)

    def read_status(self) -> Status | None:
        return read_record(self.status, Status)

    def read_job(self) -> Job | None:
        return read_record(self.job, Job)

    def read_result(self) -> Result | None:
        return read_record(self.result, Result)

    def read_eval_job(self) -> EvalJob | None:
        return read_record(self.eval_job, EvalJob)

    def read_code(self) -> Code | None:
        return read_record(self.path / CODE, Code)

    def read_writer(self) -> Writer | None:
        return read_record(self.path / WRITER, Writer)

    def eval_records(self) -> dict[int, EvalRecord]:
        """{step: eval/step_N.json} in step order: the one source of per-step metrics. Raises `Unreadable`
        naming the first record that is not an eval record."""
        found: dict[int, EvalRecord] = {}
        if self.eval_dir.is_dir():
            for path in self.eval_dir.iterdir():
                if (match := _EVAL_RECORD.match(path.name)) and (record := read_record(path, EvalRecord)):
                    found[int(match.group(1))] = record
        return dict(sorted(found.items()))

    def metrics_by_step(self) -> dict[int, dict[str, float | None]]:
        """{step: {metric: value}} from eval/, steps in order."""
        return {step: record.metrics for step, record in self.eval_records().items()}

    def checkpoint_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first (a folder named step_N is complete)."""
        if not self.checkpoints.is_dir():
            return []
        steps = (
            p.name[len(CHECKPOINT_PREFIX) :]
            for p in self.checkpoints.iterdir()
            if p.name.startswith(CHECKPOINT_PREFIX) and p.is_dir()
        )
        return sorted(int(s) for s in steps if s.isdigit())

    def log_rows(self) -> list[LogRow]:
        """Every complete row of log.jsonl (`core.trainlog`)."""
        return trainlog.rows(self.log)

    def last_log_row(self) -> LogRow | None:
        return trainlog.last_row(self.log)

    # -- writing: before submission (`ablate run`) ----------------------------------------------------
    def write_config(self, text: str) -> None:
        atomic_write(self.config, text)

    def write_spec(self, spec: Spec) -> None:
        atomic_write_json(self.spec, spec.to_json())

    def write_code(self, record: Code, diff: str) -> None:
        """The code the arm's job runs (ablate.running.snapshot): code.json, and code.diff when the tree was dirty."""
        atomic_write_json(self.path / CODE, record.to_json())
        if diff:
            atomic_write(self.path / CODE_DIFF, diff)
        else:
            (self.path / CODE_DIFF).unlink(missing_ok=True)

    def write_job(self, job: Job) -> None:
        atomic_write_json(self.job, job.to_json())

    def update_job(self, **fields: Any) -> None:
        self.write_job(updated(self.read_job() or Job(), fields))

    def mark_submitted(self, job_id: str, folder: Path, stdout: Path, stderr: Path) -> None:
        """Record the arm's job in job.json; the state becomes `submitted` unless the job already started;
        `launcher` links to the job's log folder, so the run folder leads to its logs."""
        self.update_job(
            job_id=job_id, folder=str(folder), stdout=str(stdout), stderr=str(stderr), submitted_at=now()
        )
        self.set_status(SUBMITTED, only_from=(QUEUED,), job_id=job_id)
        with contextlib.suppress(OSError):
            self.launcher.unlink(missing_ok=True)
            self.launcher.symlink_to(os.path.relpath(stdout.parent, self.path), target_is_directory=True)

    def mark_eval_submitted(self, job_id: str, folder: Path, stdout: Path, stderr: Path) -> None:
        """The same for an `ablate eval` job, in eval_job.json."""
        self.update_eval_job(job_id=job_id, folder=str(folder), stdout=str(stdout), stderr=str(stderr),
                             submitted_at=now())  # fmt: skip
        self.set_eval_job(SUBMITTED, only_from=(QUEUED,))

    # -- writing: the state ----------------------------------------------------------------------------
    def set_status(
        self, state: str, *, only_from: tuple[str, ...] | None = None, fresh: bool = False, **fields: Any
    ) -> bool:
        """Write `state` with `fields` (Status fields) over the previous status (fields not given are
        kept; with `fresh`, dropped: a re-queued arm starts a clean record).

        With `only_from`, nothing is written unless the current state is one of those (e.g. `ablate
        run` marks an arm submitted only while it is still queued: its job may already be running).
        Returns whether it wrote. A transition TRANSITIONS does not allow is a programming error. Under
        the folder's state lock: a cancelled arm stays cancelled while its trainer writes its last steps.
        """
        with exclusive(self.path / STATE_LOCK):
            old = self.read_status() or Status()
            if only_from is not None and old.state not in only_from:
                return False
            check_transition(old.state, state, self.status)
            base = Status(**{k: getattr(old, k) for k in CHECKPOINT_HISTORY}) if fresh else old
            new = updated(base, {**fields, "state": state, "updated_at": now()})
            atomic_write_json(self.status, new.to_json())
            return True

    def update_status(self, **fields: Any) -> None:
        """Add fields to status.json, its state unchanged (a set-aside checkpoint, a restart from zero)."""
        with exclusive(self.path / STATE_LOCK):
            atomic_write_json(self.status, updated(self.read_status() or Status(), fields).to_json())

    def set_eval_job(self, state: str, *, only_from: tuple[str, ...] | None = None, **fields: Any) -> bool:
        """The `ablate eval` record: the same states and rule as `set_status`, in eval_job.json."""
        with exclusive(self.path / STATE_LOCK):
            old = self.read_eval_job() or EvalJob()
            if only_from is not None and old.state not in only_from:
                return False
            check_transition(old.state, state, self.eval_job)
            new = updated(old, {**fields, "state": state, "updated_at": now()})
            atomic_write_json(self.eval_job, new.to_json())
            return True

    def update_eval_job(self, **fields: Any) -> None:
        """Add fields (the job's id and logs) to eval_job.json, its state unchanged (under the lock: the job
        just submitted may be writing its state)."""
        with exclusive(self.path / STATE_LOCK):
            atomic_write_json(self.eval_job, updated(self.read_eval_job() or EvalJob(), fields).to_json())

    def new_eval_job(self, state: str, **fields: Any) -> None:
        """Start a fresh eval_job.json (a new `ablate eval` submission replaces the last one's record)."""
        atomic_write_json(
            self.eval_job, updated(EvalJob(), {**fields, "state": state, "updated_at": now()}).to_json()
        )

    # -- writing: the trainer -----------------------------------------------------------------------
    def append_log(self, row: LogRow) -> None:
        trainlog.append(self.log, row)

    def truncate_log(self, step: int) -> int:
        """Keep only the log rows up to `step` (a resumed run redoes the steps after its checkpoint; one
        restarted before its first checkpoint, `step` 0, starts an empty log), reading only the tail;
        a torn last line (a kill mid-write) is dropped too. Returns how many such lines were dropped."""
        return trainlog.truncate(self.log, step)

    def write_eval(self, record: EvalRecord) -> None:
        atomic_write_json(self.eval_record(record.step), record.to_json())

    def write_resamples(self, step: int, resamples: dict[str, Any]) -> list[str]:
        """Write {metric: (B,)} as one (metrics, B) array; returns the metrics in its row order (the eval
        record names them: `EvalRecord.resampled`)."""
        return arrays.write_rows(self.eval_resamples(step), resamples)

    def write_eval_items(self, step: int, items: dict[str, Any]) -> None:
        arrays.write_npz(self.eval_items(step), items)

    def read_resamples(self, record: EvalRecord) -> dict[str, Any] | None:
        """{metric: (B,) float64} of an eval step, None when it kept none. Raises `Unreadable` naming a
        damaged file."""
        if not record.resampled:
            return None
        return arrays.read_rows(self.eval_resamples(record.step), record.resampled)

    def write_result(self, result: Result) -> None:
        atomic_write_json(self.result, result.to_json())


def read_record(path: Path, model: type[R]) -> R | None:
    """The record at `path` as its model, None when the file does not exist. Raises `Unreadable` naming
    the file when it is not JSON, not an object, or a field does not have its type."""
    data = read_json(path)
    if data is None:
        return None
    if not isinstance(data, dict):
        raise Unreadable(path, f"a JSON {type(data).__name__}, not an object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise Unreadable(path, shape_problem(e)) from None


def updated(record: R, fields: dict[str, Any]) -> R:
    """`record` with `fields` replaced, validated again (a field the record does not have is a bug)."""
    unknown = set(fields) - set(type(record).model_fields)
    if unknown:
        raise TypeError(f"{type(record).__name__} has no field {', '.join(sorted(unknown))}")
    return type(record).model_validate({**record.model_dump(), **fields})


class PlantedLink(RuntimeError):
    """A record or folder where ablate writes is a symbolic link (RunDir.planted_links, SweepDir.planted_links)."""
