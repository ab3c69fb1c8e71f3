"""Sweep files: schema, loading, and expansion into run specs.

A sweep file (YAML)::

    name: prx-256                  # path-safe: letters, digits, '_', '.', '-'
    output_dir: runs/prx-256       # optional; default runs/<name>, relative to the current directory
    baseline:                      # a full trainer config (trainer.config.TrainConfig), without `seed`
      optimizer: {kind: adamw, lr: 1.0e-4}
      ...
    deltas:                        # name → overrides of the baseline
      lr-high:
        optimizer.lr: 3e-4         # dotted keys ...
      muon:
        optimizer: {kind: muon}    # ... or nested maps; a new `kind` replaces the whole component
      no-ema:
        ema: null                  # null turns a component off
    seeds: [0, 1]                  # each delta × each seed is an arm; so is the baseline × each seed
    launcher: {executor: local, time_limit_min: 30, array_parallelism: 2}
    rank_by:                       # a list of one-key maps: metric → lower | higher (is better);
      - val_loss: lower            # the first metric orders the ranking
      - fid: lower

`load_sweep` checks the file itself without importing the trainer (so `ablate status` and
`ablate rank` stay torch-free); `expand` merges and validates every arm against the trainer's
schema. Both raise `UserError` pointing at the file, line and key path.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

from ablate.errors import UserError
from ablate.running.launch import Launcher
from ablate.running.launch import problems as launch_problems
from ablate.sweep.diagnostics import to_user_error
from ablate.sweep.loader import KeyPath, format_path, line_of, load_yaml
from core.atomic import Unreadable
from core.records import Stage2
from core.rundir import STAGE2
from core.sweepdir import SweepDir
from eval.metrics import ALWAYS, METRICS, unknown

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAX_NAME = 100  # sweep and delta names become folder (and job) names
SEED_RANGE = (-(2**63), 2**64)  # what torch.manual_seed takes; it also keeps arm names short
BASELINE = "baseline"


def _path_safe(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise PydanticCustomError(
            "path_safe_name",
            "Input should be a path-safe name: letters, digits, '_', '.', '-', starting with a letter or digit",
        )
    if len(name) > MAX_NAME:
        raise PydanticCustomError(
            "name_too_long",
            "Input should be a name of at most {max} characters (it names a folder), not {n}",
            {"max": MAX_NAME, "n": len(name)},
        )
    return name


Name = Annotated[str, AfterValidator(_path_safe)]


class Seeds(BaseModel):
    """Different seeds for the baseline and the deltas (`seeds: {baseline: [0, 1, 2, 3], deltas: [0, 1]}`):
    a baseline run more often measures the seed noise every delta is compared with."""

    model_config = ConfigDict(extra="forbid")

    baseline: list[int] = Field(min_length=1)
    deltas: list[int] = Field(min_length=1)


class Sweep(BaseModel):
    """A parsed sweep file. Build it with `load_sweep`, which also checks what pydantic cannot."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    output_dir: str | None = None
    baseline: dict[str, Any]
    deltas: dict[Name, dict[str, Any]] = Field(default_factory=dict)
    seeds: Annotated[
        Annotated[list[int], Tag("list")] | Annotated[Seeds, Tag("apart")],
        Discriminator(lambda v: "apart" if isinstance(v, (dict, Seeds)) else "list"),
    ] = Field(default_factory=lambda: [0])
    """Every arm's seeds (a list), or the baseline's and the deltas' apart (Seeds)."""
    launcher: Launcher = Field(default_factory=Launcher)
    rank_by: list[str | dict[str, str]] = Field(default_factory=lambda: [ALWAYS], min_length=1)
    """The metrics to rank by, in order (the first orders the table): `- fid`, or `- fid: lower` to say the
    direction too, which must then agree with the metric table (eval/metrics.py)."""

    @field_validator("rank_by", mode="before")
    @classmethod
    def _list_form(cls, value: Any) -> Any:
        # A mapping would work in PyYAML but its order is not part of YAML: the list says which metric ranks.
        if isinstance(value, dict):
            raise PydanticCustomError(
                "rank_by_form", "Input should be a list of metrics, in ranking order (`- val_loss`)"
            )
        return value

    _file: Path = PrivateAttr()
    _lines: dict[KeyPath, int] = PrivateAttr(default_factory=dict)
    _root: Path = PrivateAttr()
    _stage2: Stage2 | None = PrivateAttr(default=None)

    @property
    def file(self) -> Path:
        return self._file

    @property
    def root(self) -> Path:
        """The sweep directory (absolute): output_dir, or runs/<name>, from the current directory."""
        return self._root

    @property
    def metrics(self) -> list[tuple[str, str]]:
        """[(metric, 'lower' | 'higher')] in ranking order, each direction the metric table's."""
        return [(name, METRICS[name].better) for name in map(_rank_name, self.rank_by)]

    def locate(self, path: KeyPath) -> tuple[str, int | None, str]:
        """(file, line, display path) of a key path in the sweep file."""
        return str(self._file), line_of(self._lines, path), format_path(path)

    def error(self, path: KeyPath, problem: str, expected: str | None) -> UserError:
        file, line, shown = self.locate(path)
        return UserError(problem, expected, file=file, line=line, path=shown)

    @property
    def stage2(self) -> Stage2 | None:
        """The confirmatory second stage `ablate run --resolve` planned in the sweep's folder, if any."""
        return self._stage2

    @stage2.setter
    def stage2(self, value: Stage2 | None) -> None:
        self._stage2 = value

    def first_seeds(self, delta: str) -> list[int]:
        """The seeds the sweep file gives `delta` (or the baseline)."""
        if isinstance(self.seeds, Seeds):
            return list(self.seeds.baseline if delta == BASELINE else self.seeds.deltas)
        return list(self.seeds)

    def seeds_of(self, delta: str) -> list[int]:
        """The seeds `delta` (or the baseline) runs at: the sweep file's, then a second stage's."""
        extra = (
            []
            if self._stage2 is None
            else (self._stage2.baseline if delta == BASELINE else self._stage2.deltas.get(delta, []))
        )
        return self.first_seeds(delta) + [s for s in extra if s not in self.first_seeds(delta)]

    def arms(self) -> list[tuple[str, int]]:
        """Every arm as (delta, seed), baseline first, without touching the trainer."""
        return [(delta, seed) for delta in (BASELINE, *self.deltas) for seed in self.seeds_of(delta)]

    def arm_names(self) -> list[str]:
        return [arm_name(delta, seed) for delta, seed in self.arms()]


def arm_name(delta: str, seed: int) -> str:
    return f"{delta}-s{seed}"


def _rank_name(item: str | dict[str, str]) -> str:
    return item if isinstance(item, str) else next(iter(item))


def _rank_by_problems(sweep: Sweep) -> Iterator[UserError]:
    """Each `rank_by` item names one metric of the table, once, that some arm computes; a direction, when
    given, is the table's (a typo there would rank the sweep backwards after every arm had trained)."""
    computed = _computed_metrics(sweep)
    seen: set[str] = set()
    for i, item in enumerate(sweep.rank_by):
        if isinstance(item, dict) and len(item) != 1:
            yield sweep.error(("rank_by", i), f"{len(item)} metrics in one item", "one metric per item")
            continue
        name = _rank_name(item)
        path = ("rank_by", i) if isinstance(item, str) else ("rank_by", i, name)
        if (problem := unknown(name)) is not None:
            yield sweep.error(path, problem, f"a metric of the table (eval/metrics.py): {', '.join(METRICS)}")
            continue
        better, said = METRICS[name].better, None if isinstance(item, str) else item[name]
        if said not in (None, "lower", "higher"):
            yield sweep.error(path, f"got {said!r}", f"'lower' or 'higher' (or '- {name}' alone)")
        elif said is not None and said != better:
            yield sweep.error(path, f"{name} is {better}-is-better (the metric table), not {said}",
                              f"'- {name}' (the table gives its direction) or '- {name}: {better}'")  # fmt: skip
        elif name in seen:
            yield sweep.error(path, f"metric '{name}' listed twice", "each metric once")
        elif name not in computed:
            yield sweep.error(path, f"no arm computes {name} (it is in no arm's eval.metrics)",
                              f"{name} in baseline.eval.metrics, or one the arms compute: {', '.join(computed)}")  # fmt: skip
        seen.add(name)


def _computed_metrics(sweep: Sweep) -> list[str]:
    """The metrics some arm computes: val_loss, and every eval.metrics the baseline or a delta sets
    (read from the file as written; the trainer's schema checks those lists when the arms expand)."""
    lists = [
        (sweep.baseline.get("eval") or {}).get("metrics")
        if isinstance(sweep.baseline.get("eval"), dict)
        else None
    ]
    for overrides in sweep.deltas.values():
        for key, value in overrides.items():
            if key == "eval.metrics":
                lists.append(value)
            elif key == "eval" and isinstance(value, dict):
                lists.append(value.get("metrics"))
    names = [ALWAYS] + [m for found in lists if isinstance(found, list) for m in found if isinstance(m, str)]
    return list(dict.fromkeys(names))


def load_sweep(file: str | Path) -> Sweep:
    """Read and check a sweep file (everything that does not need the trainer's schema)."""
    file = Path(file)
    data, lines = load_yaml(file)
    if not isinstance(data, dict):
        raise UserError(
            f"the file holds a {type(data).__name__}",
            "a mapping with name, baseline and deltas",
            file=file,
            line=1,
        )

    def locate(path: KeyPath) -> tuple[str, int | None, str]:
        return str(file), line_of(lines, path), format_path(path)

    try:
        sweep = Sweep.model_validate(data)
    except ValidationError as e:
        raise to_user_error(e, data, Sweep, locate) from None
    sweep._file = file
    sweep._lines = lines
    sweep._root = (Path(sweep.output_dir) if sweep.output_dir else Path("runs") / sweep.name).resolve()
    if (problem := _not_a_folder(sweep._root)) is not None:
        raise sweep.error(
            ("output_dir",) if sweep.output_dir else ("name",),
            problem,
            "a folder, or a path that does not exist yet",
        )
    try:
        sweep._stage2 = SweepDir(sweep._root).read_stage2()
    except Unreadable as e:
        raise UserError(str(e), f"the {STAGE2} `ablate run --resolve` wrote, or the file removed") from None
    problems = list(_problems(sweep))
    if problems:  # report the one that comes first in the file
        raise min(problems, key=lambda e: e.line if e.line is not None else 1 << 30)
    return sweep


def _not_a_folder(root: Path) -> str | None:
    """Why the sweep's output folder cannot be one (it, or a folder above it, is a file), or None."""
    for path in (root, *root.parents):
        try:
            if path.is_dir():
                return None
            if not path.exists():
                continue
        except OSError as e:  # a folder above it cannot be searched
            return f"the output folder {root} cannot be reached: {path}: {e.strerror or type(e).__name__}"
        if path == root:
            return f"the output folder {root} is a file, not a folder"
        return f"the output folder {root} cannot be made: {path} is a file, not a folder"
    return None


def _problems(sweep: Sweep) -> Iterator[UserError]:
    """Cross-field checks on the sweep file, each problem as a located UserError."""
    for path, problem, expected in launch_problems(sweep.launcher):
        yield sweep.error(path, problem, expected)

    yield from _rank_by_problems(sweep)

    lists = sweep.seeds.model_dump() if isinstance(sweep.seeds, Seeds) else {None: sweep.seeds}
    for which, seeds in lists.items():
        at = ("seeds",) if which is None else ("seeds", which)
        if not seeds:
            yield sweep.error(at, "no seeds", "at least one seed")
        for i, seed in enumerate(seeds):
            if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
                shown = (
                    str(seed) if len(str(seed)) <= 24 else f"{str(seed)[:20]}... ({len(str(seed))} digits)"
                )
                yield sweep.error((*at, i), f"seed {shown} is out of range", "a 64-bit integer")
            elif seed in seeds[:i]:
                yield sweep.error((*at, i), f"duplicate seed {seed} (duplicate arm names)", "each seed once")
    if isinstance(sweep.seeds, Seeds):
        for i, seed in enumerate(sweep.seeds.deltas):
            if seed not in sweep.seeds.baseline:
                yield sweep.error(("seeds", "deltas", i), f"seed {seed} has no baseline arm to pair with",
                                  f"a seed of seeds.baseline ({', '.join(map(str, sweep.seeds.baseline))})")  # fmt: skip
    folded: dict[str, str] = {}
    for delta in sweep.deltas:
        if delta == BASELINE:
            yield sweep.error(
                ("deltas", delta),
                "'baseline' is the baseline arm's name (duplicate arm names)",
                "another delta name",
            )
        if delta.lower() in folded:
            yield sweep.error(
                ("deltas", delta),
                f"delta '{delta}' and '{folded[delta.lower()]}' differ only in case (duplicate run directories "
                "on case-insensitive file systems)",
                "names that differ by more than case",
            )
        folded[delta.lower()] = delta
    if "seed" in sweep.baseline:
        yield sweep.error(
            ("baseline", "seed"), "the seed is set per arm from `seeds`", "it removed (use seeds: [...])"
        )
    for delta, overrides in sweep.deltas.items():
        try:
            delta_tree(sweep, delta, overrides)
        except UserError as e:
            yield e


def delta_tree(
    sweep: Sweep, delta: str, overrides: dict[str, Any]
) -> tuple[dict[str, Any], dict[KeyPath, KeyPath]]:
    """A delta's overrides as one nested tree (dotted keys expanded, nested maps merged).

    Returns (tree, sources): sources maps each config path the delta sets to the key path in
    the file that set it. A path set twice (`optimizer.lr` and `optimizer: {lr: ...}`) is an error.
    """
    tree: dict[str, Any] = {}
    sources: dict[KeyPath, KeyPath] = {}
    leaves: set[KeyPath] = set()

    def put(config_path: KeyPath, file_path: KeyPath, value: Any) -> None:
        if config_path[0] == "seed":
            raise sweep.error(file_path, "a delta cannot set the seed", "seeds: [...] at the top level")
        if config_path[:2] == ("log", "wandb"):
            raise sweep.error(
                file_path,
                "W&B settings are the sweep's, not a delta's (every arm logs to one project)",
                "them under baseline.log.wandb",
            )
        node = tree
        for end in range(1, len(config_path)):
            if config_path[:end] in leaves:
                raise _twice(sweep, sources, config_path[:end], file_path)
            node = node.setdefault(config_path[end - 1], {})
        key = config_path[-1]
        is_map = isinstance(value, dict) and bool(value)
        if config_path in leaves or (key in node and not is_map):
            raise _twice(sweep, sources, config_path, file_path)
        sources.setdefault(config_path, file_path)
        if is_map:
            node.setdefault(key, {})
            for sub_key, sub in value.items():
                put(
                    (*config_path, *_split(sweep, sub_key, (*file_path, sub_key))), (*file_path, sub_key), sub
                )
        else:
            node[key] = copy.deepcopy(value)
            leaves.add(config_path)

    for key, value in overrides.items():
        put(_split(sweep, key, ("deltas", delta, key)), ("deltas", delta, key), value)
    return tree, sources


def _twice(
    sweep: Sweep, sources: dict[KeyPath, KeyPath], config_path: KeyPath, file_path: KeyPath
) -> UserError:
    earlier = [line_of(sweep._lines, f) for c, f in sources.items() if c[: len(config_path)] == config_path]
    first = min((line for line in earlier if line), default=None)
    return sweep.error(
        file_path,
        f"'{'.'.join(map(str, config_path))}' is set twice in this delta"
        + (f" (also at line {first})" if first else ""),
        "each setting once per delta",
    )


def _split(sweep: Sweep, key: Any, file_path: KeyPath) -> tuple[str, ...]:
    """A (dotted) key of a delta as its config path."""
    if not isinstance(key, str):
        raise sweep.error(file_path, f"key {key!r} is not a string", "string keys like optimizer.lr")
    parts = tuple(key.split("."))
    if not all(parts):
        raise sweep.error(file_path, f"key '{key}' has an empty part", "dotted keys like optimizer.lr")
    return parts
