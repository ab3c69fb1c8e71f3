"""Config drift: which arms ran with a config the sweep file no longer asks for.

`ablate run` compares each arm's identity (`expand`, which needs the trainer's schema and so torch) with
its run folder's. `ablate status` and `ablate rank` stay torch-free, so they compare what the sweep file
says now with what the arm ran with, reading each setting's role from the arm's spec.json (`roles`, which
`ablate run` recorded; `log` alone for older ones):

- every setting the sweep file gives the arm (the baseline merged with its delta) against the arm's
  recorded config.yaml, leaf by leaf: a differing value is named with its old and new value; a changed
  execution setting (`runs`) is no drift, a changed evaluation setting is said as such (`ablate run`
  re-scores the arm);
- the hash of those settings (execution settings left out) against the one `ablate run` recorded in
  spec.json (`settings_hash`): a difference no leaf shows (a setting removed, so a default applies now)
  is said as such.

A corrupt record is not drift: `observe` reports it as unreadable.
"""

from __future__ import annotations

import copy
from typing import Any

from ablate.errors import UserError
from ablate.sweep.expand import LEGACY_MARKS, changes, merge, settings_hash, show_value
from ablate.sweep.loader import load_plain_yaml
from ablate.sweep.schema import BASELINE, Sweep, arm_name, delta_tree
from core.atomic import Unreadable
from core.rundir import RunDir
from trainer.identity import EVALUATES, RUNS, TRAINS, role_of, without

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
    """{arm: one line} for every arm whose run folder ran (or was scored) with other settings than the
    sweep file's now; execution settings are not drift."""
    out: dict[str, str] = {}
    merged: dict[str, dict] = {}
    for delta, seed in sweep.arms():
        name = arm_name(delta, seed)
        run = RunDir(sweep.root / name)
        try:
            spec = run.read_spec()
            if spec is None or run.path.is_symlink():
                continue
            now = settings(sweep, delta, seed, merged)
            marks = spec.roles if spec.roles is not None else LEGACY_MARKS
            recorded = spec.settings_hash
            if recorded is not None and recorded == settings_hash(now, marks):
                continue  # the fast path: the same settings as when it was prepared
            if not run.config.is_file():
                continue
            config = load_plain_yaml(run.config, "config file")
        except (Unreadable, UserError, OSError):
            continue  # unreadable: `observe` says so; this is only about drift
        if not isinstance(config, dict):
            continue
        if (line := _line(_differs(now, config, marks), marks)) is not None:
            out[name] = line
        elif recorded is not None:
            out[name] = (
                "the sweep file's settings for it changed since it ran (a setting removed?); "
                "`ablate run --dry-run` says whether its config did"
            )
    return out


def _line(changed: list[tuple[str, Any, Any]], marks: dict[str, str]) -> str | None:
    """What an arm's changed settings say: changes in what it trains first; None when only how it runs did."""
    if not changed:
        return None
    trains = [c for c in changed if role_of(c[0], marks) == TRAINS]
    scored = [c for c in changed if role_of(c[0], marks) == EVALUATES]
    shown = "; ".join(
        f"{k}: {show_value(old)} → {show_value(new)}" for k, old, new in [*trains, *scored][:SHOWN]
    )
    more = f" (+{len(changed) - SHOWN} more)" if len(changed) > SHOWN else ""
    if trains:
        return f"config changed since it ran: {shown}{more}"
    return f"{RESCORE}: {shown}{more}; `ablate run` re-scores it"


def _differs(now: dict[str, Any], ran: dict[str, Any], marks: dict[str, str]) -> list[tuple[str, Any, Any]]:
    """(dotted key, value it ran with, value the sweep file sets now) for each setting that differs, but for
    execution settings: expand's diff of the recorded config, cut down to the keys the sweep file sets."""
    identity = without(now, marks, RUNS)
    return [c for c in changes(_cut(ran, identity), identity) if role_of(c[0], marks) != RUNS]


def _cut(ran: Any, now: Any) -> Any:
    """`ran` with only the keys `now` has (recursively); what the file leaves unset is not compared."""
    if isinstance(now, dict) and not now and ran is None:
        return now  # `{}` and null both leave an optional component at its default
    if not (isinstance(now, dict) and isinstance(ran, dict)):
        return ran
    return {k: _cut(ran[k], now[k]) for k in now if k in ran}
