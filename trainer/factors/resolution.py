"""Resolution-aware conditioning (Photoroom/PRX `prx/algorithm/resolution_aware.py`,
`configs/yamls/*/resolution_aware.yaml`): the denoiser is told the height H and width W of its input
(the latent's, or the image's in pixel space: PRX reads them off the denoiser's input, (B, C, H, W)).

Each of H and W is embedded sinusoidally, 128-d ([cos, sin], frequencies max_period^(−i/64), no time
scaling), then:

- `token` (PRX's configs): two MLPs (Linear(128→C)–SiLU–Linear(C→C)), one for H, one for W, make two
  tokens that are put before the projected text tokens, unmasked: every block's joint attention sees them.
- `vec`: one MLP (Linear(256→C)–SiLU–Linear(C→C)) of [emb(H), emb(W)], added to the timestep vector, so
  every block's modulation and the final layer's are resolution-aware. It is diffusers'
  `PRXResolutionEmbedder` (`PRXTransformer2DModel(resolution_embeds=True)`), the same module names.

The embedder's weights are the factor's: they are saved in `factors.safetensors` beside the diffusers
folder, which loads in `PRXTransformer2DModel` unchanged. It acts in training and in sampling alike.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from trainer.model import Factor, FactorContext, TokenState
from trainer.registry import Config, Registry

RESOLUTION = Registry("resolution_aware")
SINUSOID_DIM = 128  # per axis, as PRX's ResolutionEmbedder


class _ResolutionConfig(Config):
    max_period: int = Field(10000, ge=2, description="period of the slowest sinusoid (PRX: 10000)")


class TokenResolutionConfig(_ResolutionConfig):
    kind: Literal["token"] = "token"


class VecResolutionConfig(_ResolutionConfig):
    kind: Literal["vec"] = "vec"


def sinusoid(x: torch.Tensor, max_period: int) -> torch.Tensor:
    """(B,) → (B, 128): [cos, sin] of x·max_period^(−i/64), i < 64 (PRX's `timestep_embedding`, time_factor 1)."""
    from diffusers.models.embeddings import get_timestep_embedding

    return get_timestep_embedding(x, SINUSOID_DIM, flip_sin_to_cos=True, downscale_freq_shift=0.0,
                                  scale=1.0, max_period=max_period)  # fmt: skip


class ResolutionFactor(Factor):
    def __init__(self, patch_size: int):
        super().__init__()
        self.patch_size = patch_size

    def size(self, state: TokenState) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) heights and (B,) widths of the denoiser's input, fp32."""
        b, dev = state.img.shape[0], state.img.device
        h, w = (side * self.patch_size for side in state.grid)
        return (torch.full((b,), h, dtype=torch.float32, device=dev),
                torch.full((b,), w, dtype=torch.float32, device=dev))  # fmt: skip


class TokenResolution(ResolutionFactor):
    """Two tokens (B, 2, C) before the text tokens."""

    def __init__(self, cfg: TokenResolutionConfig, hidden: int, patch_size: int):
        from diffusers.models.transformers.transformer_prx import MLPEmbedder

        super().__init__(patch_size)
        self.max_period = cfg.max_period
        self.h_embedder = MLPEmbedder(in_dim=SINUSOID_DIM, hidden_dim=hidden)
        self.w_embedder = MLPEmbedder(in_dim=SINUSOID_DIM, hidden_dim=hidden)

    def begin(self, state: TokenState) -> None:
        h, w = (sinusoid(x, self.max_period).to(state.txt.dtype) for x in self.size(state))  # (B, 128) each
        tokens = torch.stack([self.h_embedder(h), self.w_embedder(w)], dim=1).to(state.txt.dtype)  # (B, 2, C)
        state.txt = torch.cat([tokens, state.txt], dim=1)  # (B, 2 + Lt, C)
        if state.mask is not None:
            keep = torch.ones(tokens.shape[:2], dtype=state.mask.dtype, device=state.mask.device)
            state.mask = torch.cat([keep, state.mask], dim=1)  # (B, 2 + Lt)


class VecResolution(ResolutionFactor):
    """One vector (B, C) added to the timestep vector."""

    def __init__(self, cfg: VecResolutionConfig, hidden: int, patch_size: int):
        from diffusers.models.transformers.transformer_prx import PRXResolutionEmbedder

        super().__init__(patch_size)
        self.embedder = PRXResolutionEmbedder(hidden, max_period=cfg.max_period)

    def begin(self, state: TokenState) -> None:
        state.vec = state.vec + self.embedder(*self.size(state), dtype=state.vec.dtype)  # (B, C)


@RESOLUTION.register(TokenResolutionConfig)
def build_token(cfg: TokenResolutionConfig, ctx: FactorContext) -> TokenResolution:
    return TokenResolution(cfg, ctx.hidden_size, ctx.patch_size)


@RESOLUTION.register(VecResolutionConfig)
def build_vec(cfg: VecResolutionConfig, ctx: FactorContext) -> VecResolution:
    return VecResolution(cfg, ctx.hidden_size, ctx.patch_size)
