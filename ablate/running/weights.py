"""`ablate weights check|download`: every pretrained weight a sweep needs, present or missing.

Denoiser side: each arm's resolved config, walked by `core.weights.required` (text encoder,
tokenizer, REPA teacher, …). Eval side: the weights of every feature extractor its
`eval.metrics` need (`eval.evaluator.extractors_for`, `eval.extractors.weights_for`). One
entry per weight and folder, whichever arms and sides need it (the REPA DINOv2 teacher and
DINO-MMD's extractor are one repository): present only when every side's check passes.

The folder is `--dir D`, else the arm's `weights_dir`, else the default caches (the HF cache;
clean-fid's folder for the Inception file). Weights that are trained rather than downloaded
(the demo's attribute net, trained by the trainer on first use) are listed, never missing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ablate.shown import inert
from ablate.sweep.expand import expand
from ablate.sweep.schema import Sweep
from core.sweepdir import SweepDir

NETWORK_HINT = (
    "downloading needs network access (gated models such as FLUX also need `huggingface-cli login`)"
)


@dataclass(eq=False)
class Weight:
    """One pretrained weight in one folder, and who needs it."""

    label: str
    folder: str | None
    where: str
    """the folder as shown: the weights folder, or the default cache it falls back to"""
    downloadable: bool
    note: str = ""
    """for weights that are not downloaded: where they come from"""
    sources: list[Any] = field(default_factory=list)
    """`core.weights` descriptions, one per side that needs the weight (their checks may differ)"""
    used_by: list[str] = field(default_factory=list)
    arms: list[str] = field(default_factory=list)
    """deltas (with every seed) that need it"""
    arms_text: str = ""

    def missing(self) -> str | None:
        """None when present, else one line saying what is missing where."""
        if not self.downloadable:
            return None
        return next((p for s in self.sources if (p := s.missing(self.folder)) is not None), None)


def needed(sweep: Sweep, folder: str | Path | None = None) -> list[Weight]:
    """Every weight the sweep's arms need, de-duplicated, in first-use order (baseline first)."""
    from core.weights import required
    from eval.evaluator import extractors_for
    from eval.extractors import weights_for
    from eval.metrics import METRICS

    found: dict[tuple[Any, ...], Weight] = {}

    def add(key: tuple[Any, ...], new: Weight, source: Any, user: str, delta: str) -> None:
        w = found.setdefault(key, new)
        if source is not None and source not in w.sources:
            w.sources.append(source)
        if user not in w.used_by:
            w.used_by.append(user)
        if delta not in w.arms:
            w.arms.append(delta)

    def add_spec(spec: Any, where_dir: str | None, user: str, delta: str) -> None:
        new = Weight(str(spec), where_dir, spec.location(where_dir), True)
        add(spec.key(where_dir), new, spec, user, delta)

    specs = expand(sweep)
    for spec in specs:
        cfg = spec.train
        where_dir = str(folder) if folder is not None else cfg.weights_dir

        owners = {}  # the top-level component that asks for each denoiser-side weight
        for name in type(cfg).model_fields:
            if hasattr(type(value := getattr(cfg, name)), "model_fields"):
                owners.update({w: name for w in required(value) if w not in owners})
        for w in required(cfg):
            add_spec(w, where_dir, owners.get(w, "denoiser"), spec.delta)

        for name in extractors_for(cfg.eval.metrics):
            w = weights_for(name)
            user = "eval: " + ", ".join(m for m in cfg.eval.metrics if METRICS[m].extractor == name)
            if w.downloadable:
                add_spec(w, where_dir, user, spec.delta)
            else:  # trained, not downloaded: the trainer trains it into the eval cache on first use
                cache = cfg.eval.cache_dir or str(SweepDir(sweep.root).eval_cache)
                note = "trained by the trainer on first use (no download)"
                add(("trained", name, cache), Weight(f"{name} extractor", None, cache, False, note), None, user,
                    spec.delta)  # fmt: skip

    deltas = list(dict.fromkeys(s.delta for s in specs))
    for w in found.values():
        others = [d for d in deltas if d not in w.arms]
        if not others:
            w.arms_text = "all"
        elif len(others) < len(w.arms):
            w.arms_text = f"all but {', '.join(others)}"
        else:
            w.arms_text = ", ".join(w.arms)
    return list(found.values())


def states(needed: list[Weight]) -> dict[Weight, str | None]:
    """{weight: None when present (or not downloaded), else what is missing where}."""
    return {w: w.missing() for w in needed}


def fetch(w: Weight) -> str | None:
    """Download what `w` lacks; None on success, else one line saying what failed (never a traceback)."""
    try:
        for source in w.sources:
            if source.missing(w.folder) is not None:
                source.download(w.folder)
    except Exception as e:  # noqa: BLE001 - a network or hub failure: one line, then the next weight
        return f"could not fetch {w.label} into {w.where}: {_one_line(e)}"
    return None


def fetch_missing(needed: list[Weight], say: Callable[[str], None]) -> int:
    """Fetch every weight in `needed` that is not here, saying what happens to each; returns how many
    could not be fetched (each an `error:` line on stderr, in order with what `say` printed)."""
    failures = 0
    for w in needed:
        if not w.downloadable:
            say(f"{w.label}: {w.note}")
        elif w.missing() is None:
            say(f"{w.label}: present in {w.where}")
        else:
            say(f"{w.label}: fetching into {w.where} …")
            if (problem := fetch(w)) is not None:
                failures += 1
                sys.stdout.flush()
                print(f"error: {inert(problem)}", file=sys.stderr, flush=True)
    return failures


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else "(no message)"
    return f"{type(e).__name__}: {text[:300]}"
