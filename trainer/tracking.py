"""Weights & Biases for one arm: one run per arm, resumed under the same id, and never a single point of failure.

- The run is named after the arm, grouped by sweep, tagged with the config sections its delta
  changes, and carries the resolved config plus the delta's overrides (`ablate` key). Training
  logs under job_type `train`; an `ablate eval` job under job_type `eval`, in a run of its own per
  re-scored step. Ids are deterministic (run folder, config hash, job), so a requeued or resumed
  arm continues its run.
- Mode `auto` (the default): `WANDB_MODE` when set, else online where credentials exist
  (`WANDB_API_KEY`, or a netrc entry for the W&B host), offline otherwise — compute nodes often
  have no internet; `ablate sync SWEEP` uploads offline runs later. Credentials are never
  written anywhere by ablate.
- A failure to start (time-out, no network, bad key) or to log is one warning on stderr; the run
  then trains on without W&B.
"""

from __future__ import annotations

import hashlib
import netrc
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from core.records import EvalRecord, LogRow, Spec
from core.rundir import RunDir
from trainer.recorder import Backend

MODES = ("auto", "online", "offline", "disabled")


def has_credentials() -> bool:
    """Whether this process could log in to W&B: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """`auto` → WANDB_MODE if set, else online with credentials, offline without."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    return "online" if has_credentials() else "offline"


def run_id(run_dir: Path, config_hash: str, job: str = "train") -> str:
    """The arm's W&B run id: the same for every restart of the same arm (and of the same `ablate eval` step)."""
    key = f"{Path(run_dir).resolve()}:{config_hash}" + ("" if job == "train" else f":{job}")
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def tags(overrides: dict[str, Any], delta: str | None) -> list[str]:
    """The config sections a delta changes (`optimizer`, `routing`, …); `baseline` for the baseline."""
    if not overrides:
        return ["baseline"] if delta in (None, "baseline") else []
    return sorted({str(key).split(".")[0] for key in overrides})


class Tracker(Backend):
    """The recorder's W&B backend: a started run, or nothing (`run` None); it never raises."""

    def __init__(self, run: Any = None, run_dir: Path | None = None):
        self.run, self.run_dir = run, run_dir

    def __bool__(self) -> bool:
        return self.run is not None

    def log(self, row: LogRow) -> None:
        logged = row.model_dump(exclude={"step", "time"})
        self._log({f"train/{k}": v for k, v in logged.items()}, row.step)

    def eval(self, record: EvalRecord, grid: Any, noise: Any = None) -> None:
        self._log({f"eval/{k}": v for k, v in record.metrics.items()}, record.step)
        path = RunDir(self.run_dir).eval_grid(record.step) if self.run_dir is not None else None
        if self.run is not None and path is not None and path.exists():
            import wandb

            self._log({"eval/samples": wandb.Image(str(path))}, record.step)

    def _log(self, data: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(data, step=step)
        except Exception as e:  # noqa: BLE001 - W&B must not stop training
            self._give_up("logging", e)

    def close(self) -> None:
        self.finish()

    def finish(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as e:  # noqa: BLE001
            self._give_up("finishing", e)
        self.run = None

    def _give_up(self, what: str, e: Exception) -> None:
        warn(f"W&B {what} failed ({type(e).__name__}: {_first_line(e)}); training goes on without W&B")
        self.run = None


def start(
    wandb_cfg: Any,
    run_dir: Path,
    spec: Spec,
    config: dict[str, Any],
    *,
    job: str = "train",
    step: int | None = None,
) -> Tracker:
    """Start (or resume) the arm's W&B run; a Tracker that does nothing when W&B is off or fails to start."""
    mode = resolve_mode(wandb_cfg.mode)
    if mode == "disabled":
        return Tracker()
    try:
        import wandb

        job_key = "train" if job == "train" else f"{job}-step{step}"
        ablate = spec.model_dump(include={"sweep", "delta", "seed", "hash", "overrides"})
        run = wandb.init(
            project=wandb_cfg.project,
            entity=wandb_cfg.entity,
            mode=mode,
            id=run_id(run_dir, spec.hash or "", job_key),
            resume="allow",
            name=spec.name or Path(run_dir).name,
            group=spec.sweep,
            job_type=job,
            tags=tags(spec.overrides, spec.delta),
            config={**config, "ablate": ablate},
            dir=str(run_dir),
            settings=_settings(wandb, wandb_cfg.init_timeout_s),
        )
    except Exception as e:  # noqa: BLE001 - W&B is never a single point of failure
        warn(f"W&B could not start ({type(e).__name__}: {_first_line(e)}); training goes on without W&B")
        return Tracker()
    return Tracker(run, Path(run_dir))


FLUSH_S = 2.0


def _settings(wandb: Any, init_timeout_s: float) -> Any:
    """A scheduler stopping a job (scancel, scontrol requeue, preemption) sends SIGTERM to every process
    of the job step, wandb's service included, which then stops at once: only what it has flushed to
    the run's file survives (the trainer's own checkpoint is saved at the next log point regardless).
    wandb flushes every 15 s by default; every FLUSH_S here, so little of an interrupted segment's
    history is lost, and the requeued job continues the same run."""
    options: dict[str, Any] = {"init_timeout": init_timeout_s}
    if (
        "x_transaction_log_flush_interval" in wandb.Settings.model_fields
    ):  # a private setting: only if it exists
        options["x_transaction_log_flush_interval"] = FLUSH_S
    return wandb.Settings(**options)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else "no message")[:200]
