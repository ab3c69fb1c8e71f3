"""The extractor interface: uint8 NHWC images in, (N, D) float32 features out."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar, TypeVar

import numpy as np
import torch

from eval.images import iter_batches

T = TypeVar("T")
U = TypeVar("U")


class Extractor(abc.ABC):
    """uint8 NHWC images → (N, D) float32 features."""

    name: str  # registry name
    version: str  # identifies weights + preprocessing; part of every reference-cache key
    device: torch.device
    # How float images in [0, 1] become its uint8 (eval/images.py): round (as a PNG is written) or floor
    # (PRX's `.to(torch.uint8)`); and how the trainer resizes the real images for it: pil (bicubic, as
    # the training images) or torch (PRX's eval set: torchvision's antialiased bilinear, on floats)
    quantise: ClassVar[str] = "round"
    resize: ClassVar[str] = "pil"

    @abc.abstractmethod
    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) → the float (N, 3, S, S) tensor the network receives, on `device`."""

    @abc.abstractmethod
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """The network's forward and the final normalisation: (N, 3, S, S) → (N, D)."""

    def features(self, images, batch_size: int = 64) -> np.ndarray:
        """Features of an image array/tensor or of an iterable of batches, (N, D) float32."""
        with torch.no_grad():
            pixels = prefetched(iter_batches(images, batch_size, self.quantise), self.preprocess)
            return np.concatenate([self.embed(p).float().cpu().numpy() for p in pixels])


_DONE = object()


def prefetched(items: Iterable[T], fn: Callable[[T], U]) -> Iterator[U]:
    """`fn(item)` for each item, computed one item ahead on a worker thread, so reading and resizing
    the next batch (CPU, PIL releases the GIL) overlaps the current batch's forward pass."""
    it = iter(items)

    def step():
        item = next(it, _DONE)
        return _DONE if item is _DONE else fn(item)

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(step)
        while (out := pending.result()) is not _DONE:
            pending = pool.submit(step)
            yield out
