"""The synthetic shapes domain of the tests and the demo: one shape per small image, every attribute
known, two captions per image (long: every attribute; short: the shape), rendered on the fly.

Its attribute net (eval/domain.py) scores the demo's metrics; the `domain` REPA teacher and the
`domain-ae` tokenizer are trained on it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import Dataset

from eval.metrics import SYNTHETIC_SHAPES
from trainer.data.datasets import DATA
from trainer.registry import Config

ATTRIBUTES: dict[str, list[str]] = {
    "shape": ["circle", "square", "triangle", "diamond"],
    "colour": ["red", "green", "blue", "yellow", "purple", "orange"],
    "size": ["small", "medium", "large"],
    "position": ["top left", "top right", "bottom left", "bottom right", "centre"],
    "background": ["black", "white", "grey", "beige"],
}
_RGB = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.15, 0.7, 0.2),
    "blue": (0.15, 0.3, 0.9),
    "yellow": (0.95, 0.85, 0.1),
    "purple": (0.55, 0.2, 0.75),
    "orange": (0.98, 0.55, 0.1),
    "black": (0.0, 0.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "grey": (0.5, 0.5, 0.5),
    "beige": (0.9, 0.85, 0.7),
}
_RADIUS = {"small": 0.12, "medium": 0.19, "large": 0.27}
_CENTRE = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "centre": (0.5, 0.5),
}


def sample_attributes(seed: int, index: int) -> dict[str, int]:
    """The attributes of image `index` of the domain drawn with `seed` (pure function)."""
    rng = np.random.default_rng([seed, index])
    return {name: int(rng.integers(len(values))) for name, values in ATTRIBUTES.items()}


def render(attrs: dict[str, int], resolution: int, jitter: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Draw one shape, anti-aliased by 4x supersampling. Returns (H, W, 3) float32 in [0, 1]."""
    a = {k: ATTRIBUTES[k][v] for k, v in attrs.items()}
    ss = 4
    n = resolution * ss
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) / n + 0.5 / n  # (n, n) pixel centres in [0, 1)
    cx, cy = _CENTRE[a["position"]]
    cx, cy, r = cx + jitter[0], cy + jitter[1], _RADIUS[a["size"]]
    dx, dy = x - cx, y - cy
    if a["shape"] == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif a["shape"] == "square":
        inside = np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    elif a["shape"] == "diamond":
        inside = np.abs(dx) + np.abs(dy) <= 1.2 * r
    elif a["shape"] == "triangle":  # apex up, base at cy + r
        inside = (dy <= r) & (dy >= -r) & (np.abs(dx) <= 0.6 * (dy + r))
    else:
        raise ValueError(f"unknown shape {a['shape']!r}")
    cover = inside.reshape(resolution, ss, resolution, ss).mean(axis=(1, 3))[..., None]  # (H, W, 1)
    fg, bg = np.array(_RGB[a["colour"]], np.float32), np.array(_RGB[a["background"]], np.float32)
    return (cover * fg + (1 - cover) * bg).astype(np.float32)


def long_caption(attrs: dict[str, int]) -> str:
    """Every attribute, tersely: at most 54 bytes, so a 56-token byte-level encoder sees all of it."""
    a = {k: ATTRIBUTES[k][v] for k, v in attrs.items()}
    return f"{a['size']} {a['colour']} {a['shape']}, {a['position']}, {a['background']} background"


def short_caption(attrs: dict[str, int]) -> str:
    return f"a {ATTRIBUTES['shape'][attrs['shape']]}"


CAPTIONS = {"long": long_caption, "short": short_caption}


class SyntheticConfig(Config):
    domain: ClassVar[str | None] = SYNTHETIC_SHAPES
    kind: Literal["synthetic"] = "synthetic"
    resolution: int = Field(32, ge=8, description="image side in pixels")
    caption: Literal["long", "short"] = Field("long", description="caption column used for training")
    domain_seed: int = Field(0, description="seed of the domain itself; keep it equal across arms")
    num_train: int = Field(50_000, ge=1, description="training images (rendered on the fly)")
    num_val: int = Field(256, ge=1, description="held-out images, disjoint from training")
    jitter: float = Field(0.04, ge=0, le=0.1, description="random shift of the shape centre, in image units")

    def file_problem(self, val_caption: str | None) -> None:
        """Rendered on the fly: no files to check."""
        return None


class SyntheticShapes(Dataset):
    """Images `offset .. offset + length` of the synthetic domain."""

    def __init__(self, cfg: SyntheticConfig, offset: int, length: int, caption: str | None = None):
        self.cfg, self.offset, self.length = cfg, offset, length
        self.caption_fn = CAPTIONS[caption or cfg.caption]

    def __len__(self) -> int:
        return self.length

    def prompts(self, indices: list[int]) -> list[dict]:
        """The caption and attributes of items `indices`, without rendering them."""
        out = []
        for i in indices:
            attrs = sample_attributes(self.cfg.domain_seed, self.offset + i)
            out.append({"caption": self.caption_fn(attrs), "attrs": np.array([attrs[k] for k in ATTRIBUTES])})
        return out

    def __getitem__(self, i: int) -> dict:
        index = self.offset + i
        attrs = sample_attributes(self.cfg.domain_seed, index)
        rng = np.random.default_rng([self.cfg.domain_seed, index, 1])
        jitter = tuple(rng.uniform(-self.cfg.jitter, self.cfg.jitter, size=2))
        img = render(attrs, self.cfg.resolution, jitter)  # (H, W, 3)
        return {
            "image": torch.from_numpy(img).permute(2, 0, 1).contiguous(),  # (3, H, W)
            "caption": self.caption_fn(attrs),
            "attrs": torch.tensor([attrs[k] for k in ATTRIBUTES], dtype=torch.long),
        }


ATTR_NET_TRAIN_IMAGES = 6000  # renders the domain's attribute net trains on


def attribute_net(cfg: SyntheticConfig, cache_dir: str | Path):
    """The synthetic domain's attribute net (eval.domain): trained once per domain on renders that
    training and held-out data never use, cached in `cache_dir`. The demo metrics score with it; the
    `domain` REPA teacher aligns with its features."""
    from eval.domain import DomainData, get_or_train_attribute_net

    def make_data() -> DomainData:
        ds = SyntheticShapes(cfg, offset=10**9, length=ATTR_NET_TRAIN_IMAGES)
        items = [ds[i] for i in range(len(ds))]
        images = np.stack(
            [(it["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for it in items]
        )
        attrs = np.stack([it["attrs"].numpy() for it in items])
        return DomainData(
            images,
            {a: attrs[:, i] for i, a in enumerate(ATTRIBUTES)},
            {a: len(v) for a, v in ATTRIBUTES.items()},
        )

    key = {"domain": SYNTHETIC_SHAPES, "resolution": cfg.resolution, "domain_seed": cfg.domain_seed,
           "jitter": cfg.jitter, "images": ATTR_NET_TRAIN_IMAGES, "attributes": ATTRIBUTES}  # fmt: skip
    return get_or_train_attribute_net(cache_dir, key, make_data)


@DATA.register(SyntheticConfig)
def build_synthetic(cfg: SyntheticConfig, val_caption: str | None = None) -> tuple[Dataset, Dataset]:
    train = SyntheticShapes(cfg, 0, cfg.num_train)
    val = SyntheticShapes(cfg, cfg.num_train, cfg.num_val, caption=val_caption)
    return train, val
