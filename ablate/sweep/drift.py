"""Config drift: which arms ran with another config than the one the sweep file resolves to now.

Drift is what `ablate run` decides with (`ablate.running.since`): an arm drifted when the hash of what it
trains differs from the one its run folder says it trained (its results are for the old config), or when
its newest scores were made with other evaluation settings (`ablate run` re-scores it). A change in how
it runs only is no drift, nor is writing a default out (`flow: {prediction: v}`): the resolved config is
compared, not the sweep file's text.

`ablate status` and `ablate rank` stay torch-free while the sweep file is as it was when the arms were
prepared: spec.json records the hash of what the sweep file set for the arm (`settings_hash`, execution
settings left out), and the same settings resolve to the same config. Only arms whose settings differ (or
whose spec.json is older) are resolved against the trainer's schema, as `ablate run` resolves them.

A corrupt record is not drift: `observe` reports it as unreadable.
"""

from __future__ import annotations

import copy
from typing import Any

from ablate.errors import UserError
from ablate.running.since import Change, Ran, ran_with, since
from ablate.sweep.expand import RunSpec, merge, settings_hash, show_value
from ablate.sweep.schema import BASELINE, Sweep, arm_name, delta_tree
from core.atomic import Unreadable
from core.records import Spec
from core.rundir import RunDir
from trainer.identity import EVALUATES, HASH_VERSION, TRAINS

SHOWN = 3  # changed settings named per arm
RESCORE = "evaluation settings changed since it was scored"  # how an arm `ablate run` re-scores is said


def settings(sweep: Sweep, delta: str, seed: int, merged: dict[str, dict] | None = None) -> dict[str, Any]:
    """What the sweep file sets for one arm, before the trainer's schema fills in defaults. `merged`: a
    delta's settings already merged (every seed of a delta has the same), filled as it goes."""
    merged = {} if merged is None else merged
    if delta not in merged:
        base = copy.deepcopy(sweep.baseline)
        merged[delta] = (
            base if delta == BASELINE else merge(base, delta_tree(sweep, delta, sweep.deltas[delta])[0])[0]
        )
    return {**merged[delta], "seed": seed}


def drift(sweep: Sweep) -> dict[str, str]:
    """{arm: one line} for every arm whose run folder trained (or was scored with) another config than the
    sweep file's now resolves to; execution settings are not drift."""
    unsettled: dict[str, Spec] = {}
    merged: dict[str, dict] = {}
    for delta, seed in sweep.arms():
        name = arm_name(delta, seed)
        run = RunDir(sweep.root / name)
        try:
            spec = run.read_spec()
            if spec is None or run.path.is_symlink() or not run.config.is_file():
                continue  # nothing ran there (or nothing to compare with)
            if not _same_settings(spec, settings(sweep, delta, seed, merged)):
                unsettled[name] = spec
        except (Unreadable, UserError, OSError):
            continue  # unreadable: `observe` says so; this is only about drift
    return _resolved(sweep, unsettled) if unsettled else {}


def _same_settings(spec: Spec, now: dict[str, Any]) -> bool:
    """Whether the sweep file sets what it set when the arm was prepared (by today's hashing): then the arm
    resolves to the config it ran with, and no schema is needed to tell."""
    return (
        spec.hash_version == HASH_VERSION
        and spec.roles is not None
        and spec.settings_hash is not None
        and spec.settings_hash == settings_hash(now, spec.roles)
    )


def _resolved(sweep: Sweep, arms: dict[str, Spec]) -> dict[str, str]:
    """Drift of `arms` (name → its spec.json) by their resolved identity, as `ablate run` finds it."""
    from ablate.sweep.expand import expand  # the trainer's schema: imports torch

    specs = {s.name: s for s in expand(sweep)}  # a sweep file that does not validate: one line, exit 2
    out: dict[str, str] = {}
    for name, recorded in arms.items():
        try:
            ran = ran_with(sweep.root / name, recorded)
        except (Unreadable, OSError):
            continue
        if (line := _line(ran, specs[name])) is not None:
            out[name] = line
    return out


def _line(ran: Ran, spec: RunSpec) -> str | None:
    """What changed in what an arm trains (first) or in how it was scored; None when neither did."""
    changed = since(ran, spec)
    if ran.hash is not None and ran.hash != spec.hash:
        shown = _shown([c for c in changed if c.role == TRAINS]) or f"hash {ran.hash} → {spec.hash}"
        return f"config changed since it ran: {shown}"
    if ran.scored is not None and ran.scored != spec.eval_hash:
        shown = (
            _shown([c for c in changed if c.role == EVALUATES]) or "its newest scores were made with others"
        )
        return f"{RESCORE}: {shown}; `ablate run` re-scores it"
    return None


def _shown(changed: list[Change]) -> str:
    """The first SHOWN changes, 'key: old → new' each, and how many more."""
    shown = "; ".join(f"{c.key}: {show_value(c.old)} → {show_value(c.new)}" for c in changed[:SHOWN])
    return shown + (f" (+{len(changed) - SHOWN} more)" if len(changed) > SHOWN else "")
