"""`ablate eval`: score checkpoints of arms that have ended again, without training.

Which arms and steps (`select`) is decided from the run directories alone, before anything is
submitted: an arm is evaluated when it has ended (done, failed or stale) and keeps a checkpoint
at the step asked for (default: its newest). Each evaluation is a job of the sweep's launcher
(`launch.EvalArm`) that calls `trainer.job.evaluate(run_dir, step)`, which writes
`eval/step_N.json` and the sample grid and updates result.json's metrics at that step, so
`ablate rank --step N` ranks at it. The job's outcome goes to the arm's eval_job.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablate.errors import UserError
from ablate.store import EVAL_JOB, IN_FLIGHT, describe_eval_job, eval_in_flight, observe
from ablate.sweep import Sweep
from trainer.io import read_json

CHECKPOINTS, CHECKPOINT_PREFIX = "checkpoints", "step_"  # trainer/checkpoint.py's layout: step_00000100/
ENDED = ("done", "failed", "stale")


@dataclass(frozen=True)
class Target:
    """One arm to evaluate, at one checkpoint step."""

    name: str
    run_dir: Path
    step: int
    state: str
    """the arm's state: done | failed | stale"""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"{CHECKPOINT_PREFIX}{step:08d}"


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the arm's complete checkpoints, oldest first (a folder named step_N is complete)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    names = (p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))
    return sorted(int(n[len(CHECKPOINT_PREFIX) :]) for n in names if n[len(CHECKPOINT_PREFIX) :].isdigit())


def select(sweep: Sweep, arms: list[str], step: int | None) -> tuple[list[Target], list[tuple[str, str]]]:
    """The arms to evaluate, and the arms left out with the reason. Reads only.

    With `arms` (names given on the command line) every one of them must be evaluable; without,
    every arm that has ended is taken and the others are left out. Either way, each arm taken
    must keep a checkpoint at `step`: a UserError naming the kept steps otherwise.
    """
    explicit = bool(arms)
    targets: list[Target] = []
    skipped: list[tuple[str, str]] = []
    for name in dict.fromkeys(arms) if explicit else sweep.arm_names():
        run_dir = sweep.root / name
        view = observe(run_dir)
        reason = None
        if view.state == "missing":
            reason = "not run yet"
        elif view.state in IN_FLIGHT:
            reason = f"{view.state}: it evaluates its checkpoints itself as it trains"
        elif (record := eval_in_flight(run_dir)) is not None:
            reason = f"already being evaluated ({describe_eval_job(record)})"
        if reason is not None:
            if explicit:
                raise UserError(
                    f"arm '{name}': {reason}", "an arm that has ended (`ablate status`)", path="--arm"
                )
            skipped.append((name, reason))
            continue
        kept = checkpoint_steps(run_dir)
        if step is not None and step not in kept:
            raise UserError(
                f"{name}: no checkpoint at step {step} ({checkpoint_dir(run_dir, step)} does not exist)",
                f"a kept step: {', '.join(map(str, kept))}" if kept else "an arm that kept a checkpoint",
                path="--step",
            )
        if not kept:
            if explicit:
                raise UserError(
                    f"arm '{name}': {view.state}, no checkpoint", "an arm that kept one", path="--arm"
                )
            skipped.append((name, f"{view.state}, no checkpoint"))
            continue
        targets.append(Target(name, run_dir, kept[-1] if step is None else step, view.state))
    if not targets:
        why = "; ".join(f"{name}: {reason}" for name, reason in skipped)
        raise UserError(f"no arm to evaluate ({why})", "arms that have ended and kept a checkpoint")
    return targets, skipped


def outcome(target: Target) -> dict[str, Any]:
    """What the arm's eval job recorded (eval_job.json): state, and metrics or error."""
    return read_json(target.run_dir / EVAL_JOB, default={}) or {}
