"""The extractor interface: uint8 NHWC images in, (N, D) float32 features out."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from eval.images import iter_batches


class Extractor(abc.ABC):
    """uint8 NHWC images → (N, D) float32 features."""

    name: str  # registry name
    version: str  # identifies weights + preprocessing; part of every reference-cache key
    device: torch.device

    @abc.abstractmethod
    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) → the float (N, 3, S, S) tensor the network receives, on `device`."""

    @abc.abstractmethod
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """The network's forward and the final normalisation: (N, 3, S, S) → (N, D)."""

    @torch.no_grad()
    def features_batch(self, images: np.ndarray) -> np.ndarray:
        return self.embed(self.preprocess(images)).float().cpu().numpy()

    def features(self, images, batch_size: int = 64) -> np.ndarray:
        """Features of an image array/tensor or of an iterable of batches, (N, D) float32."""
        return np.concatenate([self.features_batch(b) for b in iter_batches(images, batch_size)])


def map_images(fn: Callable[[np.ndarray], np.ndarray], images: Iterable[np.ndarray]) -> list[np.ndarray]:
    """Per-image CPU work on a few threads: PIL's resize releases the GIL."""
    images = list(images)
    workers = min(len(images), max(1, torch.get_num_threads()))
    if workers <= 1:
        return [fn(im) for im in images]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, images))
