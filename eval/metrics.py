"""The metric table: every metric an arm computes and a sweep may rank by, with its facts, declared once.

| metric            | better | extractor          | computed as                                          |
|-------------------|--------|--------------------|------------------------------------------------------|
| val_loss          | lower  | —                  | flow-matching loss on the held-out set (the trainer) |
| fid               | lower  | inception          | Fréchet distance (clean-fid, mode "clean")           |
| fid_prx           | lower  | inception-prx      | Fréchet, PRX's own FID (wrapped uint8: see below)    |
| cmmd              | lower  | clip-vit-l14-336   | MMD, RBF σ=10, biased, ×1000                         |
| dino_mmd          | lower  | dinov2-vitl14-reg  | MMD, RBF σ=10, biased, ×1000                         |
| domain_fd         | lower  | domain-attr        | Fréchet on attribute-net features (demo domain)      |
| domain_mmd        | lower  | domain-attr        | MMD, RBF σ=10, biased, ×1000 (demo domain)           |
| prompt_adherence  | higher | domain-attr        | fraction of requested attributes found (no reference)|

`fid_prx` reproduces PRX's FID, torchmetrics' `FrechetInceptionDistance(normalize=True)` fed uint8
images: `(imgs * 255).byte()` wraps each value to (256 − x) mod 256, colour-inverting the images
before Inception. Its uint8 images are made as PRX's eval callback makes them: float images truncated
(`clamp(x·255, 0, 255).to(uint8)`, where the other metrics round), real images resized by torch
(antialiased bilinear on floats, as PRX's eval set) where the others' are PIL-resized. Its values are
comparable only with PRX's published numbers; `fid` is standard.

Torch-free at import: the sweep loader checks `rank_by` against this table (`ablate status` and `ablate
rank` never import torch), the trainer's config checks `eval.metrics` against it, and
`eval.evaluator` computes the generation metrics from it. A new metric is one row here (its compute
function imports what it needs when it runs) and, if it reads new features, one extractor in
`eval/extractors.py`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

SYNTHETIC_SHAPES = "synthetic-shapes"  # the demo domain the trainer renders (trainer/data/synthetic.py)
ALWAYS = "val_loss"  # computed by the trainer for every arm, at every eval step


@dataclass(frozen=True)
class MetricInput:
    """What a generation metric is computed from."""

    gen: Any  # (N, D) numpy features of the generated images
    ref: Any  # eval.reference_cache.ReferenceFeatures, or None for metrics that need no reference
    extractor: Any  # the eval.base.Extractor that made `gen`
    requested: Mapping[str, Any] | None  # attribute -> (N,) class asked for by each prompt, -1 = not asked
    device: Any  # torch device the MMD kernel runs on


def _frechet(inp: MetricInput) -> float:
    from eval.distances import frechet_distance

    return frechet_distance(inp.gen, inp.ref.stats)  # features, not stats: cheaper when N < D


def _mmd(inp: MetricInput) -> float:
    from eval.distances import mmd

    return mmd(inp.gen, inp.ref.feats, sigma=10.0, scale=1000.0, device=inp.device)


def _prompt_adherence(inp: MetricInput) -> float:
    from eval.domain import adherence

    if inp.requested is None:
        raise ValueError(
            "metric 'prompt_adherence' needs the requested attributes: pass requested={attr: array}"
        )
    return adherence(inp.extractor.predict_from_features(inp.gen), inp.requested)


# Eval noise: each metric again on B resamples of the prompts (counts (B, n): how often each prompt is
# drawn), the reference held fixed. Every arm draws the same resamples, so arms' replicates pair up.
def _frechet_resamples(inp: MetricInput, counts: Any) -> Any:
    from eval.distances import frechet_resamples

    return frechet_resamples(inp.gen, inp.ref.stats, counts)


def _mmd_resamples(inp: MetricInput, counts: Any) -> Any:
    from eval.distances import mmd_resamples

    return mmd_resamples(inp.gen, inp.ref.feats, counts, sigma=10.0, scale=1000.0, device=inp.device)


def _adherence_counts(inp: MetricInput) -> tuple[Any, Any]:
    """(hits, asked) per prompt: how many of the attributes it asks for the attribute net found."""
    import numpy as np

    predicted = inp.extractor.predict_from_features(inp.gen)
    wanted = {a: np.asarray(w) for a, w in inp.requested.items()}
    asked = sum((w >= 0).astype(float) for w in wanted.values())  # (n,)
    hits = sum(((predicted[a] == w) & (w >= 0)).astype(float) for a, w in wanted.items())  # (n,)
    return hits, asked


def _adherence_resamples(inp: MetricInput, counts: Any) -> Any:
    hits, asked = _adherence_counts(inp)
    return (counts @ hits) / (counts @ asked)


def _adherence_per_prompt(inp: MetricInput) -> Any:
    hits, asked = _adherence_counts(inp)
    return hits / asked.clip(min=1)


@dataclass(frozen=True)
class Metric:
    better: Literal["lower", "higher"]
    """which direction is an improvement (the ranking and every ↑/↓ read it)"""
    extractor: str | None
    """the feature extractor (eval/extractors.py, eval/domain.py) it reads the generated images with;
    None for a metric the trainer computes without generating (val_loss)"""
    compute: Callable[[MetricInput], float] | None
    resample: Callable[[MetricInput, Any], Any] | None = None
    """the metric on B resamples of the prompts, (MetricInput, counts (B, n)) → (B,): its eval noise"""
    per_prompt: Callable[[MetricInput], Any] | None = None
    """the prompts' own scores (n,), kept beside an eval record, for metrics that average over prompts"""
    needs_reference: bool = True
    """compared against real images (the reference set)"""
    domain: str | None = None
    """the one data domain it can score (its extractor is trained on it); None = any"""
    doc: str = ""

    @property
    def generated(self) -> bool:
        """Computed from generated images, so it is named in `eval.metrics` (val_loss always runs)."""
        return self.extractor is not None


METRICS: dict[str, Metric] = {
    ALWAYS: Metric(
        "lower",
        None,
        None,
        needs_reference=False,
        doc="flow-matching loss on the held-out set at fixed t and noise; computed for every arm",
    ),
    "fid": Metric(
        "lower", "inception", _frechet, _frechet_resamples, doc="clean-fid FID (Inception 2048-d, mode clean)"
    ),
    "fid_prx": Metric(
        "lower",
        "inception-prx",
        _frechet,  # torchmetrics' formula (eigenvalues of Σ1Σ2) to round-off: a test checks
        _frechet_resamples,
        doc="PRX's FID on colour-inverted uint8 images (torchmetrics FID, normalize=True, fed uint8); "
        "comparable only with PRX's published numbers",
    ),
    "cmmd": Metric(
        "lower", "clip-vit-l14-336", _mmd, _mmd_resamples, doc="CMMD: CLIP ViT-L/14@336, RBF σ=10, ×1000"
    ),
    "dino_mmd": Metric(
        "lower",
        "dinov2-vitl14-reg",
        _mmd,
        _mmd_resamples,
        doc="DINO-MMD: DINOv2 ViT-L/14-reg CLS at 518 px, as CMMD",
    ),
    "domain_fd": Metric(
        "lower",
        "domain-attr",
        _frechet,
        _frechet_resamples,
        domain=SYNTHETIC_SHAPES,
        doc="Fréchet distance on demo-domain attribute-net features",
    ),
    "domain_mmd": Metric(
        "lower",
        "domain-attr",
        _mmd,
        _mmd_resamples,
        domain=SYNTHETIC_SHAPES,
        doc="MMD (CMMD estimator) on demo-domain attribute-net features",
    ),
    "prompt_adherence": Metric(
        "higher",
        "domain-attr",
        _prompt_adherence,
        _adherence_resamples,
        _adherence_per_prompt,
        needs_reference=False,
        domain=SYNTHETIC_SHAPES,
        doc="fraction of requested attributes found",
    ),
}

GENERATED = tuple(name for name, m in METRICS.items() if m.generated)
"""The metrics `eval.metrics` may name."""


def unknown(name: str, choices: tuple[str, ...] | list[str] = tuple(METRICS)) -> str | None:
    """Why `name` is not one of `choices` (with the closest one), or None when it is."""
    if name in choices:
        return None
    close = difflib.get_close_matches(name, choices, n=1)
    return f"unknown metric '{name}'" + (f" (did you mean '{close[0]}'?)" if close else "")
