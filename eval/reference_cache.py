"""On-disk cache of reference features: computed once per key, never per arm.

A key is (dataset id, extractor name, extractor version = weights + preprocessing, sample count).
Each entry is `<dataset>__<extractor>__n<count>__<hash>.npz` holding the (N, D) float32 features
and their float64 mean and covariance, plus a `.json` sidecar with the key in clear. Both files
are written atomically (temp file, then rename), the `.npz` last, so a present `.npz` is complete.
A file lock per key makes concurrent jobs (every arm's first eval step at once) compute it once.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from core.atomic import atomic_path
from eval.distances import GaussianStats


@dataclass(frozen=True)
class CacheKey:
    dataset: str  # id of the real eval set, e.g. "unsplash-eval@v1"; change it when the set changes
    extractor: str  # registry name
    version: str  # the extractor's `version`: weights + preprocessing
    num_samples: int

    def stem(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]
        return f"{_slug(self.dataset)}__{_slug(self.extractor)}__n{self.num_samples}__{digest}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "x"


@dataclass(frozen=True)
class ReferenceFeatures:
    feats: np.ndarray  # (N, D) float32
    stats: GaussianStats  # float64 mean and covariance of `feats`


class ReferenceCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: CacheKey) -> Path:
        return self.root / f"{key.stem()}.npz"

    def load(self, key: CacheKey) -> ReferenceFeatures | None:
        path = self.path(key)
        if not path.exists():
            return None
        with np.load(path) as z:
            return ReferenceFeatures(
                feats=z["feats"],
                stats=GaussianStats(mu=z["mu"], sigma=z["sigma"], n=int(z["feats"].shape[0])),
            )

    def save(self, key: CacheKey, feats: np.ndarray) -> ReferenceFeatures:
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        if feats.ndim != 2 or len(feats) != key.num_samples:
            raise ValueError(f"{key}: expected ({key.num_samples}, D) features, got {feats.shape}")
        stats = GaussianStats.from_features(feats)
        sidecar = {**asdict(key), "shape": list(feats.shape), "file": self.path(key).name}
        with atomic_path(self.path(key).with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(sidecar, indent=2, sort_keys=True))
        with atomic_path(self.path(key)) as tmp, open(tmp, "wb") as f:
            np.savez(f, feats=feats, mu=stats.mu, sigma=stats.sigma)
        return ReferenceFeatures(feats=feats, stats=stats)

    def get_or_compute(self, key: CacheKey, compute: Callable[[], np.ndarray]) -> ReferenceFeatures:
        """The cached features of `key`; `compute()` runs only when they are not on disk yet."""
        hit = self.load(key)
        if hit is not None:
            return hit
        with self.locked([key]):
            hit = self.load(key)  # another job may have written it while we waited for the lock
            return hit if hit is not None else self.save(key, compute())

    @contextmanager
    def locked(self, keys: Iterable[CacheKey]) -> Iterator[None]:
        """Holds the file locks of `keys` (taken in a fixed order, so two jobs cannot deadlock)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with ExitStack() as stack:
            for stem in sorted({k.stem() for k in keys}):
                stack.enter_context(FileLock(str(self.root / f"{stem}.lock")))
            yield
