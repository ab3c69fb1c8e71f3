"""`ablate eval`: score checkpoints of arms that have ended again, without training.

Which arms and steps (`select`) is decided from the run directories alone, before anything is
submitted: an arm is evaluated when it has ended (done, failed or stale) and keeps a checkpoint
at the step asked for (default: its newest). Each evaluation is a job of the sweep's launcher
(`jobs.EvalArm`) that calls `trainer.job.rescore(run_dir, step)`, which writes
`eval/step_N.json` and the sample grid (result.json's copy of the metrics follows), so
`ablate rank --step N` ranks at it. The job's outcome goes to the arm's eval_job.json.

`ablate run` re-scores the same way the done arms whose evaluation settings changed (`queue`): their
config.yaml takes the sweep's evaluation settings first, so the job scores with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ablate.errors import UserError, os_fault
from ablate.running.evaljobs import describe_eval_job, eval_in_flight, mark_eval_queued
from ablate.running.since import Ran, ran_with, rescore_config, unusable
from ablate.running.store import Decision, observe
from ablate.sweep.expand import read_config
from ablate.sweep.schema import Sweep
from core.atomic import Unreadable
from core.records import EvalJob, Spec
from core.rundir import CANCELLED, DONE, FAILED, IN_FLIGHT, MISSING, STALE, RunDir

ENDED = (DONE, FAILED, CANCELLED, STALE)


@dataclass(frozen=True)
class Target:
    """One arm to evaluate, at one checkpoint step."""

    name: str
    run_dir: Path
    step: int
    state: str
    """the arm's state: done | failed | cancelled | stale"""


def check_kept(run: RunDir, step: int | None) -> list[int]:
    """The steps `run` keeps a checkpoint of; a UserError (at --step) when `step` is given and not one."""
    kept = run.checkpoint_steps()
    if step is not None and step not in kept:
        raise UserError(
            f"{run.path.name}: no checkpoint at step {step} ({run.checkpoint(step)} does not exist)",
            f"a kept step: {', '.join(map(str, kept))}" if kept else "an arm that kept a checkpoint",
            path="--step",
        )
    return kept


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
        run = RunDir(sweep.root / name)
        view = observe(run.path)
        reason = None
        if view.writer is not None:  # a live trainer or eval job, however started
            reason = f"in flight ({view.note})"
        elif view.state == MISSING:
            reason = "not run yet"
        elif view.state in IN_FLIGHT:
            reason = f"{view.state}: it evaluates its checkpoints itself as it trains"
        elif view.state not in ENDED:
            reason = f"{view.state}: {view.note}"
        elif (record := eval_in_flight(run.path)) is not None:
            reason = f"already being evaluated ({describe_eval_job(record)})"
        elif (problem := unusable("eval", run.path, _ran(run.path, view.spec), None, [])) is not None:
            reason = problem  # found here, not in the job
        if reason is not None:
            if explicit:
                raise UserError(
                    f"arm '{name}': {reason}", "an arm that has ended (`ablate status`)", path="--arm"
                )
            skipped.append((name, reason))
            continue
        kept = check_kept(run, step)
        if not kept:
            if explicit:
                raise UserError(
                    f"arm '{name}': {view.state}, no checkpoint", "an arm that kept one", path="--arm"
                )
            skipped.append((name, f"{view.state}, no checkpoint"))
            continue
        targets.append(Target(name, run.path, kept[-1] if step is None else step, view.state))
    if not targets:
        why = "; ".join(f"{name}: {reason}" for name, reason in skipped)
        raise UserError(f"no arm to evaluate ({why})", "arms that have ended and kept a checkpoint")
    return targets, skipped


def _ran(run_dir: Path, spec: Spec) -> Ran | None:
    try:
        return ran_with(run_dir, spec)
    except Unreadable:
        return None


def outcome(target: Target) -> EvalJob:
    """What the arm's eval job recorded (eval_job.json): state, and metrics or error."""
    try:
        return RunDir(target.run_dir).read_eval_job() or EvalJob()
    except Unreadable as e:
        return EvalJob(state=FAILED, error=str(e))


def queue(decisions: list[Decision], sweep_name: str, executor: str, code: Any = None) -> list[Target]:
    """Before submission, for each arm `ablate run` re-scores: its config.yaml takes the sweep's evaluation
    settings (what it trains is the same; how it ran stays as recorded), its spec.json the new eval hash,
    its eval_job.json names this process (and, with `code`, the snapshot its job runs). Until the job's
    scores carry the new eval hash, `ablate run` plans the re-score again."""
    targets: list[Target] = []
    for d in (d for d in decisions if d.action == "rescore"):
        run = RunDir(d.view.run_dir)
        try:
            config = rescore_config(read_config(run.config), d.spec)
            run.write_config(yaml.safe_dump(config, sort_keys=False))
            run.write_spec(d.spec.record(sweep_name))
            mark_eval_queued(run.path, d.step, executor)
            if code is not None:
                run.write_code(code.record, code.diff)
        except OSError as e:
            raise os_fault(e, "cannot queue the re-scoring; nothing submitted", run.path) from None
        targets.append(Target(d.spec.name, run.path, d.step, d.view.state))
    return targets
