"""Image tokenizers: images in [0, 1] ↔ the space the denoiser works in.

`pixel` is the identity up to the [-1, 1] range (the synthetic domain and pixel-space
runs); latent autoencoders register here too. `channels` tells the denoiser its
in_channels, so a model config never has to repeat it.
"""
from __future__ import annotations

from typing import Literal

import torch

from .registry import Config, Registry

TOKENIZERS = Registry("tokenizer")


class PixelConfig(Config):
    kind: Literal["pixel"] = "pixel"

    @property
    def channels(self) -> int:
        """Channels of the token grid; every tokenizer config says it without loading weights."""
        return 3

    @property
    def downsample(self) -> int:
        return 1


class PixelTokenizer(torch.nn.Module):
    channels = 3
    downsample = 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images * 2 - 1  # (B, 3, H, W) in [-1, 1]

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return ((x + 1) / 2).clamp(0, 1)  # (B, 3, H, W) in [0, 1]


@TOKENIZERS.register(PixelConfig)
def build_pixel(cfg: PixelConfig, device: torch.device, weights_dir: str | None = None) -> PixelTokenizer:
    return PixelTokenizer()

