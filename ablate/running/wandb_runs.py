"""The orchestrator's side of W&B: upload a sweep's offline runs (`ablate sync`), log its impact
table (`ablate rank --wandb`). The trainer's side (one run per arm) is `trainer/tracking.py`.

Compute nodes often have no internet: arms then log offline into `<run dir>/wandb/offline-run-*`,
and `ablate sync SWEEP` uploads them from a machine that has it, with the real `wandb sync`.
A run folder that wandb has synced carries its `.synced` marker and is not uploaded twice.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablate.errors import UserError
from ablate.sweep.schema import Sweep
from core.rundir import WANDB


@dataclass(frozen=True)
class OfflineRun:
    arm: str
    folder: Path

    @property
    def synced(self) -> bool:
        return any(self.folder.glob("run-*.wandb.synced"))


def offline_runs(sweep: Sweep) -> list[OfflineRun]:
    """Every offline W&B run the sweep's arms wrote (training and `ablate eval` jobs), arm by arm. `wandb
    sync` marks each run it uploads in its folder: one reached through a symbolic link is refused."""
    found = []
    for arm in sweep.arm_names():
        runs = sorted((sweep.root / arm / WANDB).glob("offline-run-*"))
        for path in (sweep.root / arm, sweep.root / arm / WANDB, *runs):
            if path.is_symlink():
                raise UserError(
                    f"{path} is a symbolic link; `wandb sync` would write through it, nothing uploaded",
                    "it removed (ablate makes no links there)",
                )
        found += [OfflineRun(arm, folder) for folder in runs]
    return found


def sync(runs: list[OfflineRun], timeout_s: float) -> str | None:
    """Upload `runs` with `wandb sync`; None when every one is synced after, else one line saying why not."""
    if not runs:
        return None
    command = [sys.executable, "-m", "wandb", "sync", *(str(r.folder) for r in runs)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired:
        output = f"wandb sync did not finish within {timeout_s:g} s (is W&B reachable from this machine?)"
    missing = [r for r in runs if not r.synced]
    if not missing:
        return None
    lines = [line.removeprefix("wandb: ").strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()] or lines[-1:]
    return f"{len(missing)} of {len(runs)} run(s) not synced: " + (errors[0][:300] if errors else "no output")


def log_table(sweep: Sweep, table: Any, step: int | None) -> str:
    """Log the impact table (every column of `--format json`: changes, intervals, noise, q) as a W&B Table in
    the sweep's group (job_type `rank`), the interval and rule that made it in the run's config; returns
    where it went.

    Raises RuntimeError with one line when W&B does not take it.
    """
    import wandb

    from ablate.sweep.expand import expand
    from trainer import tracking
    from trainer.recorder import WandbConfig

    w = WandbConfig.model_validate(expand(sweep)[0].config["log"]["wandb"])
    mode = tracking.resolve_mode(w.mode)
    if mode == "disabled":
        raise RuntimeError("W&B is disabled (log.wandb.mode or WANDB_MODE); nothing logged")
    key = f"rank:{'last' if step is None else step}"
    try:
        run = wandb.init(
            project=w.project, entity=w.entity, mode=mode, id=tracking.run_id(sweep.root, sweep.name, key),
            resume="allow", name=f"{sweep.name} impact", group=sweep.name, job_type="rank",
            config={"sweep": sweep.name, "step": step, "rank_by": dict(sweep.metrics), "verdicts": table.attrs},
            dir=str(sweep.root),
            settings=wandb.Settings(init_timeout=w.init_timeout_s),
        )  # fmt: skip
        run.log({"impact": wandb.Table(dataframe=table.frame())})
        run.finish()
    except Exception as e:  # noqa: BLE001 - one line, the table is already printed
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise RuntimeError(f"W&B did not take the impact table: {type(e).__name__}: {first[:200]}") from None
    return f"W&B project {w.project}, group {sweep.name} ({mode})"
