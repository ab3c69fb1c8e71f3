"""What changed since an arm ran, by role (`trainer.identity`): what `ablate run` decides with.

An arm's run folder says what it trained (spec.json's hash, or its config.yaml hashed again when the
spec.json is older than HASH_VERSION), how it ran (config.yaml) and how its newest scores were made
(the eval hash its last eval/step_N.json carries, else spec.json's). Against the sweep's arm now:

- a change in what it trains: the config changed (`--rerun NAME` or `--force` to train again);
- in how it runs only: recorded, never rerun (a resubmission uses the new settings);
- in how it is scored: its newest kept checkpoint is re-scored with the new settings, no training.

A job that would use the arm's folder as it is (`unusable`) is refused before submission when the folder
holds a planted link or a config.yaml the trainer's schema refuses, rather than failing inside the job.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablate.sweep.expand import RunSpec, config_identity, config_problem, read_config, show_value
from ablate.sweep.expand import changes as leaf_changes
from core.atomic import Unreadable
from core.records import Spec
from core.rundir import CODE, CODE_DIFF, CONFIG, EVAL_JOB, JOB, SPEC, STATUS, PlantedLink, RunDir
from trainer.identity import EVALUATES, HASH_VERSION, NUMERICS, ROLES, RUNS, Identity, role_of


@dataclass(frozen=True)
class Change:
    """One setting that differs from what the arm ran with, and its role."""

    role: str
    key: str
    old: Any
    new: Any

    def line(self, action: str, step: int | None = None) -> str:
        """'runs: train.num_workers 0 → 8 (recorded, not rerun)': the change and what `action` does with it."""
        launches = action in ("submit", "resubmit", "rerun")
        if self.role == RUNS:
            what = "the resubmission uses it" if launches else "recorded, not rerun"
        elif self.role == EVALUATES:
            what = (
                f"re-scored at step {step}"
                if action == "rescore"
                else "used from here on"
                if launches
                else ""
            )
        else:
            what = "trained again" if action == "rerun" else "config changed" if action == "blocked" else ""
        shown = f"{self.role}: {self.key} {show_value(self.old)} → {show_value(self.new)}"
        return f"{shown} ({what})" if what else shown


@dataclass(frozen=True)
class Ran:
    """What an arm's run folder says it trained, ran and was scored with."""

    hash: str | None
    """the hash of what it trained, in today's HASH_VERSION"""
    scored: str | None
    """the eval hash of its newest scores"""
    config: dict[str, Any] | None
    """its config.yaml (None: there is none)"""
    identity: Identity | None


def ran_with(run_dir: Path, spec: Spec) -> Ran:
    """What the arm in `run_dir` (whose spec.json is `spec`) ran with. Raises `Unreadable` for a corrupt
    config.yaml."""
    run = RunDir(run_dir)
    config = read_config(run.config) if run.config.is_file() else None
    current = spec.hash_version == HASH_VERSION
    # trained before HASH_VERSION 4: by the trainer's first numerics (see trainer.identity.NUMERICS)
    ident = (
        None if config is None else config_identity(config, NUMERICS if (spec.hash_version or 0) >= 4 else 1)
    )
    if current or ident is None:
        trained, evaluated = spec.hash, spec.eval_hash if current else None
    else:  # an older spec.json: its config.yaml hashed the way today's are
        trained, evaluated = ident.hash, ident.eval_hash
    return Ran(trained, _scored(run) or evaluated, config, ident)


# What is written before the job of each action (`store.prepare`, `rescore.queue`, `ablate eval`), replacing
# a link planted there: config.yaml and spec.json too for a resubmission with a changed setting (or none).
REWRITTEN = {
    "submit": (CONFIG, SPEC, JOB, STATUS, CODE, CODE_DIFF),
    "resubmit": (JOB, STATUS, CODE, CODE_DIFF),
    "rescore": (CONFIG, SPEC, EVAL_JOB, CODE, CODE_DIFF),
    "eval": (EVAL_JOB, CODE, CODE_DIFF),
}


def unusable(
    action: str, run_dir: Path, ran: Ran | None, spec: RunSpec | None, changes: list[Change]
) -> str | None:
    """What keeps the job `action` submits (`ablate run`'s, or "eval") from using the arm's folder as it is,
    or None; found before it is submitted, not by the job. A link planted in the folder that stays there
    (the trainer refuses them), or the config.yaml the job reads as recorded (a resubmission with nothing
    changed, a re-score's how-it-ran part, an `ablate eval`) when the trainer's schema refuses it."""
    run = RunDir(run_dir)
    if action not in REWRITTEN or not run.path.is_dir():
        return None  # nothing submitted, or into a folder `prepare` makes
    anew = action == "resubmit" and (changes or ran is None or ran.config is None)  # as `store.prepare` does
    rewritten = REWRITTEN[action] + ((CONFIG, SPEC) if anew else ())
    try:
        run.refuse_planted_links(but=rewritten)
    except PlantedLink as e:
        return str(e)
    if action == "submit" or anew:
        return None  # its config.yaml is the sweep's, written anew
    if ran is None or ran.config is None:
        return f"{run.config}: {'not a file' if run.config.exists() else 'missing'}, and its job reads it"
    problem = config_problem(rescore_config(ran.config, spec) if action == "rescore" else ran.config)
    return None if problem is None else f"{run.config}: {problem}"


def _scored(run: RunDir) -> str | None:
    """The eval hash the arm's newest eval record carries (None: none does, or it is older)."""
    with contextlib.suppress(Unreadable, OSError):
        records = run.eval_records()
        if records:
            newest = records[max(records)]
            return newest.eval_hash if newest.hash_version == HASH_VERSION else None
    return None


def since(ran: Ran, spec: RunSpec) -> list[Change]:
    """Each setting of the arm that differs from what it ran with, what it trains first."""
    if ran.identity is None:
        return []
    now = spec.identity
    return [
        Change(role, key, old, new)
        for role in ROLES
        for key, old, new in leaf_changes(ran.identity.parts[role], now.parts[role])
    ]


def rescore_config(ran: dict[str, Any], spec: RunSpec) -> dict[str, Any]:
    """The config an arm is re-scored with: the sweep's now (what it trains is the same, written out whole,
    and how it is scored is new) but for how it ran, which stays as recorded (by the roles it has now)."""
    marks = spec.identity.marks
    out = copy.deepcopy(spec.config)
    for path in sorted(marks, key=lambda p: p.count(".")):  # an inner mark after the one it overrides
        parent = path.rpartition(".")[0]
        if marks[path] == RUNS:
            _copy(ran, out, path.split("."))
        elif parent and role_of(parent, marks) == RUNS:
            _copy(spec.config, out, path.split("."))  # a field inside a `runs` section that is not
    return out


def _copy(source: dict[str, Any], target: dict[str, Any], keys: list[str]) -> None:
    """target[keys] = source[keys], or removed when `source` has none there."""
    for key in keys[:-1]:
        source = source.get(key) if isinstance(source, dict) else None
        if not isinstance(target.get(key), dict):
            target[key] = {}
        target = target[key]
    if isinstance(source, dict) and keys[-1] in source:
        target[keys[-1]] = copy.deepcopy(source[keys[-1]])
    else:
        target.pop(keys[-1], None)
