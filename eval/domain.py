"""Metrics for the synthetic demo domain, which need no downloaded weights.

The demo domain (rendered by `trainer/`) draws one shape per small RGB image with discrete
attributes (shape, colour, size, position, background, ...). Here a small CNN, the attribute net,
is trained to classify every attribute from pixels; its penultimate layer (L2-normalised) is the
domain's feature space, and its heads check generated images against their prompts:

- `domain_fd`: Fréchet distance on attribute-net features (FID's formula, not FID: no Inception).
- `domain_mmd`: the CMMD estimator (RBF σ=10, biased, ×1000) on attribute-net features.
- `prompt_adherence`: the fraction of requested attributes that the attribute net finds.

The net trains deterministically (fixed seed, CPU) in well under a minute and is cached on disk
under a key describing the domain (`get_or_train_attribute_net`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock
from torch import nn

from core.atomic import atomic_path
from core.weights import TrainedWeights, require
from eval.base import Extractor
from eval.images import to_uint8_nhwc

ARCH_VERSION = "attrnet-v2"
WIDTH = 16  # the attribute net's base width (grid features have 4·WIDTH channels)
GRID_STRIDE, GRID_LAYERS = (
    4,
    8,
)  # `grid_features`: two stride-2 convs; body[:8] ends at the last conv's ReLU  # bump when the architecture or training recipe changes: retrains cached nets
FILE_PREFIX = "domain-attr-"
_LOGIT_SCALE = 10.0  # heads see the unit-norm embedding times this, so softmax can get sharp


@dataclass(frozen=True)
class DomainData:
    """Labelled renders of the demo domain, as the trainer's renderer produces them."""

    images: np.ndarray  # (N, H, W, 3) uint8
    labels: Mapping[str, np.ndarray]  # attribute -> (N,) int class index
    num_classes: Mapping[str, int]  # attribute -> number of classes


class _WhatAndWhere(nn.Module):
    """Global max-pool (translation invariant: shape, colour, size) next to a 4x4 average grid (position)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, C, h, w)
        what = F.adaptive_max_pool2d(h, 1).flatten(1)  # (N, C)
        where = F.adaptive_avg_pool2d(h, 4).flatten(1)  # (N, 16C)
        return torch.cat([what, where], dim=1)  # (N, 17C)


class AttributeNet(nn.Module):
    """Four 3x3 convs (two with stride 2), what-and-where pooling, a linear embedding, and one
    linear head per attribute on the L2-normalised embedding."""

    def __init__(self, num_classes: Mapping[str, int], width: int = 16, embed_dim: int = 128):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(),  # (N, w, H, W)
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),  # (N, 2w, H/2, W/2)
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.ReLU(),  # (N, 4w, H/4, W/4)
            _WhatAndWhere(),  # (N, 68w)
            nn.Linear(68 * w, embed_dim),  # (N, E)
        )  # fmt: skip
        self.heads = nn.ModuleDict({attr: nn.Linear(embed_dim, k) for attr, k in num_classes.items()})
        self.config = {"num_classes": dict(num_classes), "width": width, "embed_dim": embed_dim}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.body(x), dim=-1)  # (N, E), unit norm

    def grid_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last conv block's map, before pooling: (N, 3, H, W) → (N, 4·width, H/4, W/4) (GRID_STRIDE)."""
        return self.body[:GRID_LAYERS](x)

    def classify(self, emb: torch.Tensor) -> dict[str, torch.Tensor]:
        return {attr: head(emb * _LOGIT_SCALE) for attr, head in self.heads.items()}  # attr -> (N, k)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.classify(self.embed(x))


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def _check_labels(data: DomainData) -> None:
    n = len(data.images)
    if data.images.dtype != np.uint8 or data.images.ndim != 4 or data.images.shape[-1] != 3:
        raise ValueError(
            f"attribute-net images must be uint8 (N, H, W, 3), got {data.images.dtype} {data.images.shape}"
        )
    if set(data.labels) != set(data.num_classes):
        raise ValueError(
            f"labels have attributes {sorted(data.labels)}, num_classes has {sorted(data.num_classes)}"
        )
    for attr, y in data.labels.items():
        y = np.asarray(y)
        if y.shape != (n,) or y.min() < 0 or y.max() >= data.num_classes[attr]:
            raise ValueError(
                f"labels['{attr}'] must be {n} ints in [0, {data.num_classes[attr]}), got {y.shape}"
            )


def train_attribute_net(
    images: np.ndarray,
    labels: Mapping[str, np.ndarray],
    num_classes: Mapping[str, int],
    seed: int = 0,
    epochs: int = 15,
    batch_size: int = 32,
    lr: float = 3e-3,
    width: int = WIDTH,
) -> AttributeNet:
    """Trains the attribute net on labelled renders (uint8 NHWC or float NCHW in [0, 1]): sum of
    per-attribute cross-entropies, AdamW, one-cycle schedule. Runs on one CPU thread, so the weights
    depend only on the data, the seed and the torch build, not on the machine's core count (and a
    busy machine does not stall it): about 0.5 s per epoch per 1000 32x32 images."""
    images = to_uint8_nhwc(images)
    data = DomainData(images, labels, num_classes)
    _check_labels(data)
    x_all = to_input(images)  # (N, 3, H, W)
    y_all = {attr: torch.as_tensor(np.asarray(y), dtype=torch.long) for attr, y in labels.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # leaves the caller's global RNG untouched
            torch.manual_seed(seed)
            net = AttributeNet(num_classes, width=width)
            _fit(net, x_all, y_all, torch.Generator().manual_seed(seed), epochs, batch_size, lr)
    finally:
        torch.set_num_threads(threads)
    net.eval()
    net.config["image_size"] = list(images.shape[1:3])
    return net


def _fit(
    net: AttributeNet, x_all, y_all, gen: torch.Generator, epochs: int, batch_size: int, lr: float
) -> None:
    steps_per_epoch = -(-len(x_all) // batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_all), generator=gen)
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            logits = net(x_all[idx])
            loss = sum(F.cross_entropy(logits[attr], y_all[attr][idx]) for attr in logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


# ------------------------------------------------------------------------------------ save / load / cache


def key_hash(key: Mapping, seed: int) -> str:
    """Short stable hash of the domain description, the seed and the architecture version."""
    blob = json.dumps({"key": key, "seed": seed, "arch": ARCH_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def save_attribute_net(net: AttributeNet, path: str | Path, key: Mapping | None = None) -> Path:
    """Writes the weights (a few hundred KB) and a JSON sidecar describing them, both atomically."""
    path = Path(path)
    meta = {"arch": ARCH_VERSION, "config": net.config, "key": key}
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    with atomic_path(path) as tmp:
        torch.save({"meta": meta, "state_dict": net.state_dict()}, tmp)
    return path


def load_attribute_net(path: str | Path) -> AttributeNet:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    cfg = blob["meta"]["config"]
    if blob["meta"]["arch"] != ARCH_VERSION:
        raise ValueError(
            f"{path} holds a {blob['meta']['arch']} attribute net; this code reads {ARCH_VERSION}: retrain it"
        )
    net = AttributeNet(cfg["num_classes"], width=cfg["width"], embed_dim=cfg["embed_dim"])
    net.load_state_dict(blob["state_dict"])
    net.config["image_size"] = cfg["image_size"]
    return net.eval()


def get_or_train_attribute_net(
    cache_dir: str | Path, key: Mapping, make_data: Callable[[], DomainData], seed: int = 0, epochs: int = 15
) -> AttributeNet:
    """The attribute net for the domain described by `key` (any JSON-able description of the
    renderer and its training set): loaded from `cache_dir/domain-attr-<hash>.pt` when present,
    else trained on `make_data()` and saved there. A file lock makes concurrent callers train once."""
    path = Path(cache_dir) / f"{FILE_PREFIX}{key_hash({'domain': key, 'epochs': epochs}, seed)}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            data = make_data()
            net = train_attribute_net(data.images, data.labels, data.num_classes, seed=seed, epochs=epochs)
            save_attribute_net(net, path, key={"domain": key, "seed": seed, "epochs": epochs})
    return load_attribute_net(path)


# ------------------------------------------------------------------------------------- extractor, metric

DOMAIN_WEIGHTS = TrainedWeights(
    f"{FILE_PREFIX}*.pt", "trains the attribute net on the demo domain, under a minute on CPU"
)


def _state_digest(net: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


class DomainAttrExtractor(Extractor):
    """Attribute-net features (unit-norm penultimate layer) and attribute predictions."""

    name = "domain-attr"

    def __init__(self, net: AttributeNet, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.version = f"{ARCH_VERSION}-{_state_digest(net)}"  # features change whenever the weights do

    @classmethod
    def load(cls, weights_dir: str | Path | None, device: str | torch.device = "cpu") -> DomainAttrExtractor:
        require(DOMAIN_WEIGHTS, weights_dir, needed_by=f"extractor '{cls.name}'")
        files = sorted(Path(weights_dir).glob(DOMAIN_WEIGHTS.pattern))
        if len(files) > 1:
            raise ValueError(
                f"{len(files)} attribute nets in {weights_dir} ({', '.join(f.name for f in files)}); "
                "pass the one for this domain explicitly: DomainAttrExtractor(get_or_train_attribute_net(...))"
            )
        return cls(load_attribute_net(files[0]), device)

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        trained = tuple(self.net.config.get("image_size", images.shape[1:3]))
        if tuple(images.shape[1:3]) != trained:
            raise ValueError(
                f"the attribute net was trained on {trained} images, got {tuple(images.shape[1:3])}"
            )
        return to_input(images).to(self.device)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.embed(pixels)  # (N, E)

    @torch.no_grad()
    def predict_from_features(self, feats: np.ndarray) -> dict[str, np.ndarray]:
        logits = self.net.classify(torch.as_tensor(feats, dtype=torch.float32, device=self.device))
        return {attr: lg.argmax(-1).cpu().numpy() for attr, lg in logits.items()}  # attr -> (N,)

    def predict(self, images, batch_size: int = 256) -> dict[str, np.ndarray]:
        return self.predict_from_features(self.features(images, batch_size))

    def prompt_adherence(self, images, requested: Mapping[str, np.ndarray]) -> float:
        return adherence(self.predict(images), requested)


def adherence(predicted: Mapping[str, np.ndarray], requested: Mapping[str, np.ndarray]) -> float:
    """Fraction of requested (image, attribute) pairs whose predicted class is the requested one.
    `requested[attr][i] == -1` means the prompt of image i did not ask for `attr`."""
    unknown = set(requested) - set(predicted)
    if unknown:
        raise ValueError(
            f"requested attributes {sorted(unknown)} have no classifier head; heads: {sorted(predicted)}"
        )
    hits = total = 0
    for attr, want in requested.items():
        want = np.asarray(want)
        got = predicted[attr]
        if want.shape != got.shape:
            raise ValueError(
                f"requested['{attr}'] has shape {want.shape}, expected {got.shape} (one per image)"
            )
        asked = want >= 0
        hits += int((got[asked] == want[asked]).sum())
        total += int(asked.sum())
    if total == 0:
        raise ValueError("prompt adherence needs at least one requested attribute (all are -1)")
    return hits / total
