"""A tiny stand-in for the trainer's demo-domain renderer: one shape per 32x32 RGB image with
discrete attributes. Only the interface matters to `eval/` (uint8 arrays + int labels)."""

from __future__ import annotations

import numpy as np

NUM_CLASSES = {"shape": 3, "colour": 4, "size": 2, "position": 9, "background": 2}
_COLOURS = np.array([(220, 40, 40), (40, 190, 60), (50, 90, 230), (230, 200, 40)], np.float32)
_BACKGROUNDS = np.array([(25, 25, 30), (225, 225, 215)], np.float32)
_RADII = (5.0, 9.0)
_CENTRES = (8.0, 16.0, 24.0)


def render(labels: dict[str, np.ndarray], seed: int, size: int = 32) -> np.ndarray:
    """uint8 (N, size, size, 3) renders of the given attribute classes, with jitter and pixel noise."""
    rng = np.random.default_rng(seed)
    n = len(labels["shape"])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # (S, S)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        r = _RADII[labels["size"][i]]
        cy = _CENTRES[labels["position"][i] // 3] + rng.uniform(-1, 1)
        cx = _CENTRES[labels["position"][i] % 3] + rng.uniform(-1, 1)
        dy, dx = yy - cy, xx - cx
        kind = labels["shape"][i]
        if kind == 0:  # disc
            mask = dy**2 + dx**2 <= r**2
        elif kind == 1:  # square
            mask = (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
        else:  # upward triangle
            mask = (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
        img = np.broadcast_to(_BACKGROUNDS[labels["background"][i]], (size, size, 3)).copy()
        img[mask] = _COLOURS[labels["colour"][i]] + rng.uniform(-15, 15, 3)
        img += rng.normal(0, 6, img.shape)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def sample_labels(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {attr: rng.integers(0, k, n) for attr, k in NUM_CLASSES.items()}


def dataset(n: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    labels = sample_labels(n, seed)
    return render(labels, seed + 1), labels
