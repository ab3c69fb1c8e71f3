"""`ablate cache`: precompute the latent and caption-embedding caches a sweep's arms read.

An arm with `cache: {dir: D}` reads `D/<key>`, where `trainer.data.cache.cache_key` hashes only
what produces the cache (data, caption columns, tokenizer, text encoder): arms that differ in
anything else (optimizer, precision, routing, REPA, seed) share one. `plan` groups the arms by
that folder; `fill` runs `trainer.data.cache.precompute` for one group, in this process (it resumes
an interrupted cache; a complete one, marked by its manifest, is never recomputed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ablate.errors import UserError
from ablate.sweep.expand import expand
from ablate.sweep.schema import Sweep


@dataclass
class CacheGroup:
    """One cache folder and the arms that read it."""

    key: str
    path: Path
    state: str
    """complete | missing | incomplete (an interrupted precompute: filling it resumes)"""
    config: Any
    """the first arm's TrainConfig: what the cache is computed from"""
    arms: list[str] = field(default_factory=list)


def plan(sweep: Sweep) -> tuple[list[CacheGroup], list[str]]:
    """(the caches the arms need, in first-use order; the arms that use no cache). Reads only."""
    from trainer.data.cache import cache_key, cache_path

    groups: dict[Path, CacheGroup] = {}
    without: list[str] = []
    for spec in expand(sweep):
        cfg = spec.train
        if cfg.cache is None:
            without.append(spec.name)
            continue
        encoded = cfg.encoded()
        path = cache_path(encoded, cfg.cache.dir).resolve()
        if path not in groups:
            key = cache_key(encoded)
            groups[path] = CacheGroup(key, path, _state(path, key, sweep, spec.name), cfg)
        groups[path].arms.append(spec.name)
    return list(groups.values()), without


def _state(path: Path, key: str, sweep: Sweep, arm: str) -> str:
    """complete | missing | incomplete (the trainer's cache says which)."""
    from trainer.data.cache import cache_state

    try:
        return cache_state(path, key).split(" ")[0]
    except ValueError:
        raise UserError(
            f"cache {path} (for arm {arm}) holds another config's latents: its manifest is not for key {key}",
            "the folder moved aside or deleted, so that `ablate cache` computes it afresh",
            file=sweep.file,
        ) from None


def fill(group: CacheGroup, log: Callable[[str], None] = print) -> Path:
    """Compute `group`'s cache (resuming an interrupted one); a missing weight is a one-line UserError."""
    from core.weights import MissingWeightsError
    from trainer.data.cache import precompute

    cfg = group.config
    try:
        return precompute(cfg.encoded(), group.path.parent, weights_dir=cfg.weights_dir, log=log)
    except MissingWeightsError as e:
        raise UserError(f"cache {group.key} (arms {', '.join(group.arms)}): {e}") from None
