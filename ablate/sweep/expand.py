"""Expanding a sweep into its arms: one run spec per delta × seed, each validated against the trainer's
schema, named, and identified by the hash of what it trains (`trainer.identity`: what each config field
is to that identity); the one deep merge of a delta into the baseline, and the leaf-by-leaf diff of two
configs.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ablate.errors import UserError
from ablate.sweep.diagnostics import to_user_error
from ablate.sweep.loader import KeyPath, format_path
from ablate.sweep.schema import BASELINE, Sweep, arm_name, delta_tree
from core.records import Spec
from trainer.identity import HASH_VERSION, NUMERICS, RUNS, Identity, digest, without


@dataclass(frozen=True)
class RunSpec:
    """One arm: what to train and its identity (name + hash of what the resolved config trains)."""

    name: str
    delta: str
    seed: int
    overrides: dict[str, Any]
    """The delta's overrides as written in the sweep file ({} for the baseline)."""
    config: dict[str, Any]
    """The resolved trainer config (TrainConfig(...).model_dump(mode='json')), seed included."""
    hash: str
    settings_hash: str | None = None
    """The hash of what the sweep file sets for the arm, before defaults, its execution settings left out
    (`ablate.sweep.drift`): lets `ablate status` and `ablate rank` tell, torch-free, that the sweep file
    sets what it set when the arm was prepared."""
    train: Any = field(default=None, compare=False, repr=False)
    """The validated trainer config (trainer.config.TrainConfig) `config` is the dump of; checks after
    expansion read it instead of validating the arm again."""
    locate: Callable[[KeyPath], tuple[str, int | None, str]] | None = field(
        default=None, compare=False, repr=False
    )
    """Where a config key path of this arm was set in the sweep file: (file, line, shown key path)."""

    def error(self, path: KeyPath, problem: str, expected: str | None) -> UserError:
        """A UserError about this arm's config key `path`, located where the sweep file set it."""
        file, line, shown = self.locate(path)
        return UserError(problem, expected, file=file, line=line, path=shown)

    @cached_property
    def identity(self) -> Identity:
        """What the config trains, runs and evaluates, and their hashes (`trainer.identity`)."""
        return config_identity(self.config)

    @property
    def eval_hash(self) -> str:
        return self.identity.eval_hash

    def record(self, sweep_name: str) -> Spec:
        """The arm's spec.json."""
        return Spec(name=self.name, delta=self.delta, seed=self.seed, hash=self.hash, hash_version=HASH_VERSION,
                    eval_hash=self.eval_hash, roles=self.identity.marks, overrides=self.overrides,
                    sweep=sweep_name, settings_hash=self.settings_hash)  # fmt: skip


def config_identity(config: dict[str, Any], numerics: int = NUMERICS) -> Identity:
    """A resolved config's identity under the trainer's schema (imports torch), trained by the trainer's
    `numerics` (today's by default)."""
    from trainer.config import identity

    return identity(config, numerics)


def config_hash(config: dict[str, Any]) -> str:
    """An arm's identity: first 12 hex digits of sha256 over the canonical JSON of what its resolved config
    trains (the fields marked `runs` or `evaluates` left out, and those at their neutral value)."""
    return config_identity(config).hash


def settings_hash(settings: dict[str, Any], marks: dict[str, str]) -> str:
    """The hash of what a sweep file sets for an arm, its execution settings (by `marks`) left out."""
    return digest(without(settings, marks, RUNS))


def read_config(config_file: Path) -> dict[str, Any]:
    """A run folder's config.yaml, read within the sweep file's bounds (a planted billion laughs stays
    small). Raises `Unreadable` for a corrupt one."""
    from ablate.sweep.loader import load_plain_yaml
    from core.atomic import Unreadable

    try:
        config = load_plain_yaml(config_file, "config file")
    except UserError as e:
        raise Unreadable(config_file, (f"line {e.line}: " if e.line else "") + e.problem) from None
    if not isinstance(config, dict):
        raise Unreadable(config_file, f"not the YAML of a config: a {type(config).__name__}")
    return config


def config_problem(config: dict[str, Any]) -> str | None:
    """Why the trainer would refuse a run folder's config (it validates its config.yaml at start-up), or
    None: one line, the first error's key path."""
    from trainer.config import TrainConfig  # lazy: imports torch

    try:
        TrainConfig.model_validate(copy.deepcopy(config))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"])) or "(top level)"
        more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
        return f"not a config the trainer reads: {where}: {first['msg']}{more}"
    return None


def expand(sweep: Sweep) -> list[RunSpec]:
    """Every arm of the sweep, baseline arms first, each validated against the trainer's schema.

    Pure: reads nothing but the sweep and the trainer's schema, writes nothing. Raises
    UserError (located in the sweep file) for the first invalid arm.
    """
    arm = _Arms(sweep)
    specs = [arm(BASELINE, seed, {}, _baseline_locator(sweep)) for seed in sweep.seeds_of(BASELINE)]
    baseline = {k: v for k, v in specs[0].config.items() if k != "seed"}
    for delta, overrides in sweep.deltas.items():
        tree, sources = delta_tree(sweep, delta, overrides)
        for seed in sweep.seeds_of(delta):
            merged, replaced = merge(arm.base(seed), tree)
            owned = dict(sources)
            for path in replaced:  # a kind change makes the whole component the delta's
                owned[path] = sources.get((*path, "kind"), sources.get(path, ("deltas", delta)))
            spec = arm(delta, seed, merged, _delta_locator(sweep, delta, owned), overrides)
            if {k: v for k, v in spec.config.items() if k != "seed"} == baseline:
                raise sweep.error(
                    ("deltas", delta),
                    "this delta changes nothing: its merged config equals the baseline's",
                    "at least one value that differs from the baseline",
                )
            specs.append(spec)
    return specs


class _Arms:
    """Validates one arm's settings against the trainer's schema and the launcher's processes."""

    def __init__(self, sweep: Sweep):
        from trainer.config import TrainConfig, describe_registries  # lazy: imports torch

        self.sweep, self.schema, self.registries = sweep, TrainConfig, describe_registries()

    def base(self, seed: int) -> dict[str, Any]:
        return {**copy.deepcopy(self.sweep.baseline), "seed": seed}

    def __call__(
        self, delta: str, seed: int, settings: dict[str, Any], locate, overrides: dict | None = None
    ) -> RunSpec:
        settings = settings or self.base(seed)
        try:
            train = self.schema.model_validate(copy.deepcopy(settings))
        except ValidationError as e:
            raise to_user_error(e, settings, self.schema, locate, self.registries) from None
        launcher = self.sweep.launcher
        per_node, world = launcher.tasks_per_node, launcher.nodes * launcher.tasks_per_node
        for path, problem, expected in train.world_problems(world, per_node):
            file, line, shown = locate(path)
            raise UserError(f"{problem} (launcher: {launcher.nodes} node(s) × {per_node} task(s))",
                            expected, file=file, line=line, path=shown)  # fmt: skip
        config = train.model_dump(mode="json")
        ident = config_identity(config)
        return RunSpec(arm_name(delta, seed), delta, seed, copy.deepcopy(overrides or {}), config, ident.hash,
                       settings_hash(settings, ident.marks), train, locate)  # fmt: skip


def _baseline_locator(sweep: Sweep):
    def locate(path: KeyPath) -> tuple[str, int | None, str]:
        if path[:1] == ("seed",):
            return sweep.locate(("seeds",))
        return sweep.locate((BASELINE, *path))

    return locate


def _delta_locator(sweep: Sweep, delta: str, owned: dict[KeyPath, KeyPath]):
    """Errors in a delta's arm point at the delta's key that set the path (the baseline alone is valid)."""

    def locate(path: KeyPath) -> tuple[str, int | None, str]:
        file_path: KeyPath = ("deltas", delta)
        for end in range(len(path), 0, -1):
            if path[:end] in owned:
                file_path = owned[path[:end]]
                break
        file, line, _ = sweep.locate(file_path)
        return file, line, format_path(("deltas", delta, *path))

    return locate


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> tuple[dict[str, Any], list[KeyPath]]:
    """`base` with the override tree applied; also the paths whose component was replaced.

    Maps merge key by key, except when an override map sets a `kind` different from the
    base's: then it replaces the base map entirely, so no field of the old kind leaks into
    the new one. Anything else (scalars, lists, null) replaces the base value. Neither input is
    changed or shared with the result.
    """
    replaced: list[KeyPath] = []

    def go(b: dict[str, Any], o: dict[str, Any], prefix: KeyPath) -> dict[str, Any]:
        out = dict(b)
        for key, value in o.items():
            old = out.get(key)
            if (
                isinstance(value, dict)
                and isinstance(old, dict)
                and value.get("kind", old.get("kind")) == old.get("kind")
            ):
                out[key] = go(old, value, (*prefix, key))
            else:
                if isinstance(value, dict) and isinstance(old, dict):
                    replaced.append((*prefix, key))
                out[key] = copy.deepcopy(value)
        return out

    return go(copy.deepcopy(base), overrides, ()), replaced


_ABSENT = object()


def changes(base: Any, arm: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, old, new) for every leaf where `arm` differs from `base`; absent → `_ABSENT`.

    Where a component's `kind` changed, the fields only one kind has are left out: the kind
    line says it, and listing every default of the new kind would bury the change.
    """
    if isinstance(base, dict) and isinstance(arm, dict):
        kind_changed = "kind" in base and "kind" in arm and base["kind"] != arm["kind"]
        for key in [*base, *(k for k in arm if k not in base)]:
            if kind_changed and (key not in base or key not in arm):
                continue
            yield from changes(
                base.get(key, _ABSENT), arm.get(key, _ABSENT), f"{prefix}.{key}" if prefix else key
            )
    elif base != arm:
        yield prefix, base, arm


def show_value(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    return json.dumps(value, separators=(", ", ": "))
