"""`domain-ae`: the demo's VAE, a small conv autoencoder trained once on the synthetic domain (the
tokenizer factor's demo kind; the pretrained autoencoders are in tokenizer.py). Deterministic, its
latents normalised per channel by the statistics of its training renders, and cached in the eval
cache beside the attribute net, keyed by the domain and its own config.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field

from core.weights import HFWeights
from eval.metrics import SYNTHETIC_SHAPES
from trainer.factors.tokenizer import TOKENIZERS, Latents, Tokenizer
from trainer.registry import Config


class DomainAEConfig(Config):
    needs_domain: ClassVar[str | None] = SYNTHETIC_SHAPES
    caches_latents: ClassVar[bool] = True
    kind: Literal["domain-ae"] = "domain-ae"
    latent_channels: int = Field(
        4, ge=1, description="channels of the latent grid (the denoiser's in_channels)"
    )
    factor: Literal[2, 4] = Field(2, description="image pixels per latent pixel")
    width: int = Field(32, ge=8, description="conv width of encoder and decoder")
    steps: int = Field(800, ge=1, description="training steps (Adam, batch 64) on first use; then cached")

    @property
    def channels(self) -> int:
        return self.latent_channels

    @property
    def downsample(self) -> int:
        return self.factor

    def weights(self) -> list[HFWeights]:
        return []


class ConvAutoencoder(torch.nn.Module):
    """[-1, 1] images (B, 3, H, W) ↔ latents (B, C, H/f, W/f): stride-2 convs down, transposed convs up."""

    def __init__(self, cfg: DomainAEConfig):
        super().__init__()
        w, act, halvings = cfg.width, torch.nn.SiLU, cfg.factor.bit_length() - 1
        down = [torch.nn.Conv2d(3, w, 3, padding=1), act()]
        up = [torch.nn.Conv2d(cfg.latent_channels, w, 3, padding=1), act()]
        for _ in range(halvings):
            down += [torch.nn.Conv2d(w, w, 4, stride=2, padding=1), act()]
            up += [torch.nn.ConvTranspose2d(w, w, 4, stride=2, padding=1), act()]
        self.encoder = torch.nn.Sequential(*down, torch.nn.Conv2d(w, cfg.latent_channels, 3, padding=1))
        self.decoder = torch.nn.Sequential(*up, torch.nn.Conv2d(w, 3, 3, padding=1))


class DomainAETokenizer(Tokenizer):
    """Deterministic: z = (encoder(x) − mean) / std per channel, the statistics of its training renders."""

    def __init__(self, ae: ConvAutoencoder, mean: torch.Tensor, std: torch.Tensor, cfg: DomainAEConfig):
        super().__init__()
        self.ae = ae.eval().requires_grad_(False)
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))
        self.channels, self.downsample = cfg.channels, cfg.downsample

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> Latents:
        return Latents((self.ae.encoder(images * 2 - 1) - self.mean) / self.std, None)  # (B, C, h, w)

    def signed(self, z: torch.Tensor) -> torch.Tensor:
        return self.ae.decoder(z * self.std + self.mean)  # (B, 3, H, W) in about [-1, 1]


def train_domain_ae(cfg: DomainAEConfig, data) -> dict:
    """Fit the autoencoder on renders the training and held-out sets never use (seeded, CPU)."""
    from trainer.data.synthetic import SyntheticShapes

    renders = SyntheticShapes(data, offset=2 * 10**9, length=4096)
    images = torch.stack([renders[i]["image"] for i in range(len(renders))]) * 2 - 1  # (N, 3, H, W)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ae = ConvAutoencoder(cfg)
        opt = torch.optim.Adam(ae.parameters(), lr=2e-3)
        gen = torch.Generator().manual_seed(0)
        for _ in range(cfg.steps):
            batch = images[torch.randint(len(images), (64,), generator=gen)]
            loss = torch.nn.functional.mse_loss(ae.decoder(ae.encoder(batch)), batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        z = ae.encoder(images[:1024])  # (n, C, h, w)
    return {"state": ae.state_dict(), "mean": z.mean((0, 2, 3)), "std": z.std((0, 2, 3)), "loss": loss.item()}


@TOKENIZERS.register(DomainAEConfig)
def build_domain_ae(
    cfg: DomainAEConfig, device: torch.device, weights_dir: str | None = None, *, data=None, cache_dir=None
) -> Tokenizer:
    from filelock import FileLock

    from core.atomic import atomic_path

    if data is None or cache_dir is None:
        raise ValueError("tokenizer 'domain-ae' is trained on the data domain: build it with build_tokenizer")
    key = {"ae": cfg.model_dump(mode="json"), "resolution": data.resolution, "domain_seed": data.domain_seed,
           "jitter": data.jitter, "version": 1}  # fmt: skip
    path = (
        Path(cache_dir)
        / f"domain-ae-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}.pt"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # every arm's first step at once: one of them trains it
        if not path.exists():
            with atomic_path(path) as tmp:
                torch.save({**train_domain_ae(cfg, data), "key": key}, tmp)
    saved = torch.load(path, weights_only=True)
    ae = ConvAutoencoder(cfg)
    ae.load_state_dict(saved["state"])
    return DomainAETokenizer(ae, saved["mean"], saved["std"], cfg).to(device)
