"""The one call the trainer makes: generated images in, {metric: value} out, for the metrics of the
metric table (`eval/metrics.py`) that are computed from generated images.

Typical use in the trainer (build once at setup, so a missing weight fails before training):

    ev = Evaluator(["fid", "cmmd", "dino_mmd"], Reference("unsplash-eval@v1", 10_000, load_real, cache_dir),
                   weights_dir=cfg.weights_dir, device="cuda")
    metrics = ev(images)                       # images: uint8 NHWC, float NCHW in [0, 1], or batches of either

With several processes: each computes `ev.features(its_shard)`, the features are gathered, and
one process calls `ev.compute(gathered)`: the result depends only on the gathered set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from eval.base import Extractor, prefetched
from eval.extractors import load_extractor
from eval.images import iter_batches, save_grid, take, to_uint8_nhwc
from eval.metrics import GENERATED, METRICS, Metric, MetricInput, unknown
from eval.reference_cache import CacheKey, ReferenceCache, ReferenceFeatures

__all__ = ["Evaluator", "Reference", "extractors_for", "save_grid", "score"]


def _metric(name: str) -> Metric:
    if (problem := unknown(name, GENERATED)) is not None:
        raise ValueError(f"{problem}; the generation metrics are {', '.join(GENERATED)}")
    return METRICS[name]


def extractors_for(metrics: Iterable[str]) -> list[str]:
    """The extractor names (hence weights) that `metrics` need, in first-use order."""
    return list(dict.fromkeys(_metric(m).extractor for m in metrics))


@dataclass(frozen=True)
class Reference:
    """The real eval set. `images()` is called only when some extractor's features are not cached."""

    dataset: str  # stable id of the eval set; part of the cache key
    num_samples: int  # how many real images; the first `num_samples` of `images()` are used
    images: Callable[[], object]  # -> uint8 NHWC / float NCHW array, or an iterable of such batches
    cache_dir: str | Path
    # the same images resized with torch as PRX's eval set is, for extractors with `resize = "torch"`
    # (fid_prx's); None: `images` serves every extractor
    torch_images: Callable[[], object] | None = None

    def images_for(self, resize: str) -> Callable[[], object]:
        return self.torch_images if resize == "torch" and self.torch_images is not None else self.images


class Evaluator:
    """Loads the extractors the metrics need (once), holds reference features, scores image sets."""

    def __init__(
        self,
        metrics: Sequence[str],
        reference: Reference | None = None,
        *,
        extractors: Mapping[str, Extractor] | None = None,
        weights_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ):
        self.metrics = {name: _metric(name) for name in metrics}
        if reference is None and any(m.needs_reference for m in self.metrics.values()):
            needing = [n for n, m in self.metrics.items() if m.needs_reference]
            raise ValueError(f"metrics {needing} compare against real images: pass reference=Reference(...)")
        given = dict(extractors or {})
        self.device = torch.device(device)
        self.extractors = {
            name: given[name] if name in given else load_extractor(name, weights_dir, self.device)
            for name in extractors_for(self.metrics)
        }
        self.reference = reference
        self.batch_size = batch_size
        self._ref: dict[str, ReferenceFeatures] = {}

    def features(self, images) -> dict[str, np.ndarray]:
        """One pass over `images` (array or batches); each batch goes through every extractor."""
        return _features_of(iter_batches(images, self.batch_size, quantise=None), self.extractors)

    def reference_features(self) -> dict[str, ReferenceFeatures]:
        """Reference features per extractor, from disk when cached, else from one pass over the real images."""
        needed = {m.extractor for m in self.metrics.values() if m.needs_reference}
        if needed <= set(self._ref):
            return self._ref
        ref = self.reference
        cache = ReferenceCache(ref.cache_dir)
        keys = {
            n: CacheKey(ref.dataset, n, self.extractors[n].version, ref.num_samples)
            for n in needed - set(self._ref)
        }
        missing = {n: k for n, k in keys.items() if not self._load(cache, n, k)}
        if missing:
            with cache.locked(missing.values()):
                missing = {n: k for n, k in missing.items() if not self._load(cache, n, k)}
                by_source: dict[Callable, list[str]] = {}  # one pass over each set of real images
                for n in missing:
                    by_source.setdefault(ref.images_for(self.extractors[n].resize), []).append(n)
                for source, names in by_source.items():
                    real = take(iter_batches(source(), self.batch_size, quantise=None), ref.num_samples)
                    feats = _features_of(real, {n: self.extractors[n] for n in names})
                    for n in names:
                        self._ref[n] = cache.save(missing[n], feats[n])
        return self._ref

    def _load(self, cache: ReferenceCache, name: str, key: CacheKey) -> bool:
        hit = cache.load(key)
        if hit is not None:
            self._ref[name] = hit
        return hit is not None

    def compute(
        self, gen_features: Mapping[str, np.ndarray], requested: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, float]:
        """{metric: value} from the generated images' features (as returned by `features`)."""
        return {
            name: float(m.compute(self._input(name, gen_features, requested)))
            for name, m in self.metrics.items()
        }

    def resampled(
        self,
        gen_features: Mapping[str, np.ndarray],
        requested: Mapping[str, np.ndarray] | None,
        resamples: int,
    ) -> dict[str, np.ndarray]:
        """{metric: (B,) its values on B resamples of the prompts, the reference fixed}: the eval noise.
        The resamples depend only on the number of prompts, so every arm's pair with every other's."""
        from eval.distances import resample_counts

        counts = resample_counts(len(next(iter(gen_features.values()))), resamples)
        return {name: np.asarray(m.resample(self._input(name, gen_features, requested), counts), np.float64)
                for name, m in self.metrics.items()}  # fmt: skip

    def per_prompt(
        self, gen_features: Mapping[str, np.ndarray], requested: Mapping[str, np.ndarray] | None
    ) -> dict[str, np.ndarray]:
        """{metric: (n,) each prompt's own score} for the metrics that average over prompts."""
        return {name: np.asarray(m.per_prompt(self._input(name, gen_features, requested)), np.float64)
                for name, m in self.metrics.items() if m.per_prompt is not None}  # fmt: skip

    def _input(
        self, name: str, gen_features: Mapping[str, np.ndarray], requested: Mapping[str, np.ndarray] | None
    ) -> MetricInput:
        metric = self.metrics[name]
        ref = self.reference_features() if metric.needs_reference else {}
        return MetricInput(gen=gen_features[metric.extractor], ref=ref.get(metric.extractor),
                           extractor=self.extractors[metric.extractor], requested=requested, device=self.device)  # fmt: skip

    def __call__(self, images, requested: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
        return self.compute(self.features(images), requested)


def _features_of(batches: Iterable, extractors: Mapping[str, Extractor]) -> dict[str, np.ndarray]:
    """Each batch (uint8 NHWC, or float NCHW that each extractor quantises its own way) through every
    extractor; the next batch is preprocessed while this one runs."""

    def preprocess(batch) -> dict[str, torch.Tensor]:
        quantised = {q: to_uint8_nhwc(batch, q) for q in {ext.quantise for ext in extractors.values()}}
        return {n: ext.preprocess(quantised[ext.quantise]) for n, ext in extractors.items()}

    parts: dict[str, list[np.ndarray]] = {n: [] for n in extractors}
    with torch.no_grad():
        for pixels in prefetched(batches, preprocess):
            for n, ext in extractors.items():
                parts[n].append(ext.embed(pixels[n]).float().cpu().numpy())
    if any(not p for p in parts.values()):
        raise ValueError("no images to extract features from")
    return {n: np.concatenate(p) for n, p in parts.items()}


def score(
    images,
    reference: Reference | None,
    metrics: Sequence[str],
    *,
    extractors: Mapping[str, Extractor] | None = None,
    requested: Mapping[str, np.ndarray] | None = None,
    weights_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> dict[str, float]:
    """One-shot form of `Evaluator(...)(images, requested)`."""
    ev = Evaluator(
        metrics,
        reference,
        extractors=extractors,
        weights_dir=weights_dir,
        device=device,
        batch_size=batch_size,
    )
    return ev(images, requested)
