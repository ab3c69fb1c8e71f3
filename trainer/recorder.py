"""The recorder: everything the trainer tells the world goes through one object and its backends.

    recorder.status(FAILED, step, error=…)  status.json
    recorder.log(row)                       log.jsonl and status.json; a console line; W&B train/*
    recorder.eval(record, grid)             eval/step_N.json and its grid; a console line; W&B eval/*
    recorder.requeue(step, reason)          status.json: in flight again, one more requeue; a console line
    recorder.result(result)                 result.json

The run folder, the console and W&B are backends (lingua's MetricLogger and torchtitan's metrics
processor are the models); only the main process records, the others hold a recorder without
backends. W&B is never a reason to stop: it fails as a warning (tracking.py).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Literal

import numpy as np
from pydantic import Field

from core.atomic import Unreadable
from core.records import EvalRecord, LogRow, Requeue, Result, Spec, Status
from core.rundir import RUNNING, SUBMITTED, TRAINER_OVERWRITES, RunDir, now
from trainer.registry import Config
from trainer.runtime.clock import Cadence

GRID_TILE = 96  # px: small samples are enlarged (nearest) in the saved grid so a person can see them


class WandbConfig(Config):
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto",
        description="W&B mode; auto = WANDB_MODE if set, else online with credentials, offline without "
        "(`ablate sync SWEEP` uploads offline runs)",
    )
    project: str = Field("ablate", description="W&B project (the same for every arm of a sweep)")
    entity: str | None = Field(None, description="W&B entity (team or user)")
    init_timeout_s: float = Field(60.0, gt=0, description="give up starting W&B after this; training goes on")


class LogConfig(Config):
    every: int = Field(10, ge=1, description="log a line every N steps")
    wandb: WandbConfig = WandbConfig()


class Backend:
    """Where records go; each hook defaults to nothing. `noise` (trainer.evaluation.EvalNoise): the eval
    step's resamples and the per-prompt values behind them, when it kept them."""

    def log(self, row: LogRow) -> None: ...

    def eval(self, record: EvalRecord, grid: np.ndarray, noise=None) -> None: ...

    def note(self, line: str) -> None: ...

    def close(self) -> None: ...


class RunFolder(Backend):
    """log.jsonl, eval/step_N.json and its sample grid (eval/step_N.png)."""

    def __init__(self, run: RunDir):
        self.run = run

    def log(self, row: LogRow) -> None:
        self.run.append_log(row)

    def eval(self, record: EvalRecord, grid: np.ndarray, noise=None) -> None:
        if len(grid):  # people look at samples before any number; the record, written last, says it is whole
            from eval.images import save_grid

            nrow = int(np.ceil(np.sqrt(len(grid))))
            save_grid(grid, self.run.eval_grid(record.step), nrow=nrow, min_tile=GRID_TILE)
        if noise is not None and noise.resamples:
            self.run.write_eval_items(record.step, noise.per_item)
            self.run.write_resamples(record.step, noise.resamples)
        self.run.write_eval(record)


class Console(Backend):
    """One line per log step and per evaluation in the job's stdout."""

    def __init__(self, name: str, total_steps: int):
        self.name, self.total_steps = name, total_steps

    def log(self, row: LogRow) -> None:
        eta = time.strftime("%H:%M:%S", time.gmtime(row.eta_s))
        data = 100 * row.data_s / (row.data_s + row.compute_s)
        self.note(
            f"step {row.step}/{self.total_steps} loss {row.loss:.4f} lr {row.lr:.2e} "
            f"| {row.batches_per_s:.2f} batch/s {row.samples_per_s:.1f} samples/s (data {data:.0f}%) | ETA {eta}"
        )

    def eval(self, record: EvalRecord, grid: np.ndarray, noise=None) -> None:
        shown = ", ".join(f"{k} {v:.5g}" for k, v in record.metrics.items() if v is not None)
        self.note(f"eval step {record.step}: {shown}")

    def note(self, line: str) -> None:
        print(f"[{self.name}] {line}", flush=True)


class Recorder:
    def __init__(self, run: RunDir, spec: Spec, log: LogConfig, total_steps: int, main: bool, world: int):
        self.run, self.spec, self.main, self.world = run, spec, main, world
        self.log_cfg, self.total_steps = log, total_steps
        self.should_log = Cadence(log.every, total_steps)
        self.backends: list[Backend] = [RunFolder(run), Console(self.name, total_steps)] if main else []
        self.wandb = Backend()  # the arm's W&B run once started (start_wandb)

    @property
    def name(self) -> str:
        return self.spec.name or self.run.name

    def start_wandb(self, config: dict, job: str, step: int) -> None:
        """The arm's W&B run joins the backends (job `train`, or `eval` for re-scoring `step`)."""
        if self.main:
            from trainer import tracking

            spec = self.spec.model_copy(update={"name": self.name})
            self.wandb = tracking.start(self.log_cfg.wandb, self.run.path, spec, config, job=job, step=step)

    def finish(self) -> None:
        """Flush and close the W&B run (a stopping job does so before the scheduler's SIGKILL)."""
        self.wandb.close()
        self.wandb = Backend()

    def status(self, state: str, step: int, error: str | None = None, **fields) -> None:
        """The arm's state and progress; a cancelled arm stays cancelled while its job dies."""
        if self.main:
            self.run.set_status(state, only_from=TRAINER_OVERWRITES, step=step, total_steps=self.total_steps,
                                error=error, pid=os.getpid(), host=socket.gethostname(), world_size=self.world,
                                **fields)  # fmt: skip

    def log(self, row: LogRow) -> None:
        for backend in (*self.backends, self.wandb):
            backend.log(row)
        self.status(RUNNING, row.step, loss=row.loss)

    def eval(self, record: EvalRecord, grid: np.ndarray, noise=None) -> None:
        for backend in (*self.backends, self.wandb):  # the run folder first: W&B shows the grid it saved
            backend.eval(record, grid, noise)

    def note(self, line: str) -> None:
        for backend in self.backends:
            backend.note(line)

    def requeue(self, step: int, reason: str) -> None:
        """Saved because the job is stopping: in flight again (`submitted`), one more requeue on record."""
        if not self.main:
            return
        try:
            requeues = (self.run.read_status() or Status()).requeues + 1
        except Unreadable:
            requeues = 1
        self.status(
            SUBMITTED, step, requeues=requeues, last_requeue=Requeue(step=step, reason=reason, at=now())
        )
        self.note(f"{reason}: saved step {step}, requeue {requeues}")

    def result(self, result: Result) -> None:
        if self.main:
            self.run.write_result(result)
