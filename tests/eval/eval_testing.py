"""Tiny random-init extractors of the real architecture classes, so every code path runs on CPU
in seconds and without downloaded weights. (A unique module name: test files import it.)"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

INCEPTION_FILE = "inception-2015-12-05.pt"


class _TinyInceptionLayers(nn.Module):
    """Maps (N, 3, 299, 299), already scaled to [-1, 1], to (N, 2048) like the real pool3 output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 7, stride=8)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(8 * 16, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.conv(x))).flatten(1)  # (N, 128)
        return torch.relu(self.fc(h))  # (N, 2048), non-negative like pool3 features


class _TinyInceptionBase(nn.Module):
    """The TorchScript interface `cleanfid.inception_torchscript.InceptionV3W` relies on:
    a `layers` submodule and `forward(x, return_features)`."""

    def __init__(self):
        super().__init__()
        self.layers = _TinyInceptionLayers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers((x - 128.0) / 128.0)


def write_tiny_inception(folder: Path, seed: int = 0) -> Path:
    """Saves a tiny TorchScript stand-in under the real file name, loadable by `InceptionV3W`."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / INCEPTION_FILE
    torch.jit.script(_TinyInceptionBase()).save(str(path))
    return path


def tiny_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=336, patch_size=28, projection_dim=16,
    )  # fmt: skip
    return CLIPVisionModelWithProjection(cfg).eval()


def tiny_dino():
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    cfg = Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
        image_size=518, patch_size=14, num_register_tokens=4,
    )  # fmt: skip
    return Dinov2WithRegistersModel(cfg).eval()


def save_in_hf_cache(model, cache_dir: Path, repo_id: str) -> None:
    """Lays `model` out in `cache_dir` exactly as `snapshot_download(repo_id, cache_dir=...)` would."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    model.save_pretrained(repo / "snapshots" / revision)


class TinyFeature(nn.Module):
    """A feature module with torchmetrics' `feature=` contract: uint8 (N, 3, H, W) → (N, 16)."""

    num_features = 16

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 5, stride=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv((x.float() - 128.0) / 128.0))  # (N, 16, h, w)
        return h.mean(dim=(2, 3)) + h.amax(dim=(2, 3))  # (N, 16)
