"""Image tokenizers: images in [0, 1] ↔ the space the denoiser works in.

`pixel` is the identity up to the [-1, 1] range (the synthetic domain and pixel-space runs).
The latent tokenizers wrap frozen diffusers autoencoders and normalise their latents for the
denoiser; `decode` inverts that normalisation exactly before decoding:

- `flux-vae`, `repa-e-vae` (`AutoencoderKL`): z = scaling · (latent − shift), both read from the
  VAE's config (Flux: 0.3611, 0.1159).
- `flux2-ae` (`AutoencoderKLFlux2`), `latent_norm: batchnorm`: latents are 2×2-patchified
  (B, 4C, h/2, w/2), normalised by the VAE's latent BatchNorm running statistics,
  (x − mean) / sqrt(var + eps), as diffusers' Flux2 pipeline does, then unpatchified so the
  denoiser sees (B, 32, h, w). A checkpoint without those statistics is an error, never a silent
  default scale. `latent_norm: prx-plain` is what PRX ran (configs/yamls/vae/flux2.yaml): the same
  weights loaded as a plain `AutoencoderKL`, which drops the BatchNorm statistics and falls back
  to the class default z = 0.18215 · latent (no shift): latents not normalised per channel.
- `dc-ae` (`AutoencoderDC`): z = scaling · latent, a deterministic encoder.

Each config states `channels` (the denoiser's in_channels) and `downsample` without loading
weights; the builder checks them against the loaded model. Gaussian autoencoders expose their
posterior as `Latents(mean, std)` in normalised units, so z = mean + std · ε is the same draw
whether it happens here or from a latent cache (see trainer/data/cache.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from pydantic import Field

from core.weights import HFWeights, load_pretrained
from trainer.identity import TRAINS, mark
from trainer.registry import Config, Registry

# `needs_domain`: the data domain a tokenizer is trained on (None: any images); such a tokenizer is
# built with the data config and a folder to keep itself in (`build_tokenizer`).
TOKENIZERS = Registry("tokenizer", facts=("needs_domain",))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Latents(NamedTuple):
    """A batch's latent posterior in the denoiser's (normalised) units."""

    mean: torch.Tensor  # (B, C, h, w)
    std: torch.Tensor | None  # (B, C, h, w); None for a deterministic tokenizer or posterior: mean

    def sample(self, eps: torch.Tensor) -> torch.Tensor:
        """z = mean + std · ε (ε ~ N(0, I), shape of `mean`); the mean itself when deterministic."""
        return self.mean if self.std is None else self.mean + self.std * eps

    def draw(self, eps: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`sample` with ε from `eps()`, called only when there is a spread to sample from."""
        return self.mean if self.std is None else self.sample(eps())


class Tokenizer(torch.nn.Module):
    channels: int
    downsample: int

    def moments(self, images: torch.Tensor) -> Latents:
        raise NotImplementedError

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] → latents (B, C, H/d, W/d), normalised for the denoiser."""
        lat = self.moments(images)
        if lat.std is None:
            return lat.mean
        return lat.sample(torch.randn(lat.mean.shape, generator=generator, device=lat.mean.device))

    def signed(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) → images (B, 3, H, W) in about [-1, 1], unclamped and differentiable (the
        perceptual losses decode the predicted x0 through it; the weights stay frozen)."""
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) → images (B, 3, H, W) in [0, 1]."""
        return ((self.signed(z).float() + 1) / 2).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# pixel
# ---------------------------------------------------------------------------------------------
class PixelConfig(Config):
    needs_domain: ClassVar[str | None] = None
    caches_latents: ClassVar[bool] = False
    """x = 2·image − 1 costs nothing to compute, and a 1024 px cache would hold 12 MB per image: a cache
    stores the caption embeddings only"""
    kind: Literal["pixel"] = "pixel"

    @property
    def channels(self) -> int:
        """Channels of the token grid; every tokenizer config says it without loading weights."""
        return 3

    @property
    def downsample(self) -> int:
        return 1

    def weights(self) -> list[HFWeights]:
        return []


class PixelTokenizer(Tokenizer):
    channels = 3
    downsample = 1

    def moments(self, images: torch.Tensor) -> Latents:
        return Latents(images * 2 - 1, None)  # (B, 3, H, W) in [-1, 1]

    def signed(self, x: torch.Tensor) -> torch.Tensor:
        return x  # (B, 3, H, W) in [-1, 1]


@TOKENIZERS.register(PixelConfig)
def build_pixel(cfg: PixelConfig, device: torch.device, weights_dir: str | None = None) -> PixelTokenizer:
    return PixelTokenizer()


# ---------------------------------------------------------------------------------------------
# Latent normalisations: forward (raw latent → denoiser units), inverse, and how a std scales.
# ---------------------------------------------------------------------------------------------
class ScaleShift(torch.nn.Module):
    """z = scale · (x − shift): diffusers' `scaling_factor` / `shift_factor`."""

    def __init__(self, scale: float, shift: float):
        super().__init__()
        self.scale, self.shift = float(scale), float(shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (x - self.shift)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scale + self.shift

    def scale_std(self, std: torch.Tensor) -> torch.Tensor:
        return self.scale * std


def patchify(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, 4C, h/2, w/2), channel order (c, dy, dx) as diffusers' Flux2 pipeline."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """(B, 4C, h/2, w/2) → (B, C, h, w), the exact inverse of `patchify`."""
    b, c4, h, w = x.shape
    return x.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, 2 * h, 2 * w)


class LatentBatchNorm(torch.nn.Module):
    """Flux2: (patchify(x) − running_mean) / sqrt(running_var + eps), per patchified channel."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.detach().float().clone().view(1, -1, 1, 1))  # (1, 4C, 1, 1)
        self.register_buffer("std", std.detach().float().clone().view(1, -1, 1, 1))  # (1, 4C, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify((patchify(x) - self.mean) / self.std)  # (B, C, h, w)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return unpatchify(patchify(z) * self.std + self.mean)

    def scale_std(self, std: torch.Tensor) -> torch.Tensor:
        return unpatchify(patchify(std) / self.std)


# ---------------------------------------------------------------------------------------------
# Autoencoders
# ---------------------------------------------------------------------------------------------
class AutoencoderTokenizer(Tokenizer):
    """A frozen diffusers autoencoder plus its latent normalisation; autocast is off inside."""

    def __init__(
        self,
        vae: torch.nn.Module,
        norm: torch.nn.Module,
        channels: int,
        downsample: int,
        dtype: torch.dtype,
        sample: bool,
    ):
        super().__init__()
        self.vae, self.norm = vae.eval().requires_grad_(False), norm
        self.channels, self.downsample, self.dtype, self.sample = channels, downsample, dtype, sample

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        dist = self.vae.encode(x).latent_dist
        return dist.mean, (dist.std if self.sample else None)

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> Latents:
        x = (images * 2 - 1).to(self.dtype)  # (B, 3, H, W) in [-1, 1]
        with torch.autocast(images.device.type, enabled=False):
            mean, std = self.posterior(x)  # (B, C, h, w) raw latent units
        return Latents(self.norm(mean.float()), None if std is None else self.norm.scale_std(std.float()))

    def signed(self, z: torch.Tensor) -> torch.Tensor:
        x = self.norm.inverse(z.float()).to(self.dtype)  # (B, C, h, w) raw latent units
        with torch.autocast(z.device.type, enabled=False):
            return self.vae.decode(x).sample  # (B, 3, H, W) in about [-1, 1]


class DeterministicAutoencoderTokenizer(AutoencoderTokenizer):
    """DC-AE: the encoder returns the latent itself, there is no posterior to sample."""

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.vae.encode(x).latent, None


class AutoencoderConfig(Config):
    """Shared by the autoencoder tokenizers; each subclass names its model and its latent grid."""

    needs_domain: ClassVar[str | None] = None
    caches_latents: ClassVar[bool] = True  # the encoder is the cost a cache saves
    MODEL: ClassVar[HFWeights]
    CHANNELS: ClassVar[int]
    DOWNSAMPLE: ClassVar[int]
    dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="weights and compute dtype of the frozen autoencoder"
    )

    @property
    def channels(self) -> int:
        return self.CHANNELS

    @property
    def downsample(self) -> int:
        return self.DOWNSAMPLE

    def weights(self) -> list[HFWeights]:
        return [self.MODEL]


class GaussianAutoencoderConfig(AutoencoderConfig):
    posterior: Literal["sample", "mean"] = Field(
        "sample", description="latent fed to the denoiser: a posterior sample (PRX) or its mean"
    )


class FluxVAEConfig(GaussianAutoencoderConfig):
    kind: Literal["flux-vae"] = "flux-vae"
    MODEL: ClassVar = HFWeights("black-forest-labs/FLUX.1-dev", "vae")
    CHANNELS: ClassVar = 16
    DOWNSAMPLE: ClassVar = 8


class RepaEVAEConfig(GaussianAutoencoderConfig):
    kind: Literal["repa-e-vae"] = "repa-e-vae"
    MODEL: ClassVar = HFWeights("REPA-E/e2e-flux-vae")
    CHANNELS: ClassVar = 16
    DOWNSAMPLE: ClassVar = 8


class Flux2AEConfig(GaussianAutoencoderConfig):
    kind: Literal["flux2-ae"] = "flux2-ae"
    MODEL: ClassVar = HFWeights("black-forest-labs/FLUX.2-dev", "vae")
    CHANNELS: ClassVar = 32  # both normalisations hand the denoiser the unpatchified (B, 32, h, w) grid
    DOWNSAMPLE: ClassVar = 8
    latent_norm: Literal["batchnorm", "prx-plain"] = Field(
        "batchnorm",
        description="batchnorm: the AE's latent BatchNorm running statistics over 2x2 patches (BFL, "
        "diffusers); prx-plain: PRX's loading as a plain AutoencoderKL, latent · 0.18215 (the class "
        "default; the statistics are dropped)",
        json_schema_extra=mark(TRAINS, neutral="batchnorm"),  # added after hashes existed: batchnorm before
    )


class DCAEConfig(AutoencoderConfig):
    kind: Literal["dc-ae"] = "dc-ae"
    MODEL: ClassVar = HFWeights("mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers")
    CHANNELS: ClassVar = 32
    DOWNSAMPLE: ClassVar = 32


def load_autoencoder(cls: Any, cfg: AutoencoderConfig, weights_dir: str | None, downsample_of) -> Any:
    """Loads `cfg.MODEL` in float32 (normalisation constants are read at full precision), refuses a
    checkpoint that leaves parameters randomly initialised, and checks the latent grid `cfg` states."""
    spec = cfg.MODEL
    vae, info = load_pretrained(cls, spec, weights_dir, torch_dtype=torch.float32, output_loading_info=True)
    if info["missing_keys"]:
        raise ValueError(
            f"tokenizer {cfg.kind!r}: {spec} checkpoint lacks {sorted(info['missing_keys'])}; "
            f"refusing to run with those left at their initial values"
        )
    got = (vae.config.latent_channels, downsample_of(vae))
    if got != (cfg.channels, cfg.downsample):
        raise ValueError(
            f"tokenizer {cfg.kind!r}: {spec} has {got[0]} latent channels at {got[1]}x downsampling, "
            f"but the config states {cfg.channels} at {cfg.downsample}x; the wrong model is in "
            f"the weights folder, or the config's CHANNELS/DOWNSAMPLE are wrong"
        )
    return vae


def _kl_downsample(vae: Any) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _scale_shift(vae: Any) -> ScaleShift:
    return ScaleShift(vae.config.scaling_factor, vae.config.shift_factor or 0.0)


@TOKENIZERS.register(FluxVAEConfig)
def build_flux_vae(cfg: FluxVAEConfig, device: torch.device, weights_dir: str | None = None) -> Tokenizer:
    from diffusers import AutoencoderKL

    vae = load_autoencoder(AutoencoderKL, cfg, weights_dir, _kl_downsample)
    return _gaussian(vae, _scale_shift(vae), cfg, device)


def _gaussian(
    vae: Any, norm: torch.nn.Module, cfg: GaussianAutoencoderConfig, device: torch.device
) -> Tokenizer:
    """A Gaussian autoencoder's tokenizer: its weights in the config's dtype, `norm` for its latents."""
    dtype = DTYPES[cfg.dtype]
    return AutoencoderTokenizer(vae.to(device, dtype), norm.to(device), cfg.channels, cfg.downsample, dtype,
                                sample=cfg.posterior == "sample")  # fmt: skip


@TOKENIZERS.register(RepaEVAEConfig)
def build_repa_e_vae(cfg: RepaEVAEConfig, device: torch.device, weights_dir: str | None = None) -> Tokenizer:
    return build_flux_vae(cfg, device, weights_dir)  # same class and normalisation, other weights


@TOKENIZERS.register(Flux2AEConfig)
def build_flux2_ae(cfg: Flux2AEConfig, device: torch.device, weights_dir: str | None = None) -> Tokenizer:
    if cfg.latent_norm == "prx-plain":
        # PRX's VaeTower: `AutoencoderKL.from_pretrained` on the FLUX.2 folder (same encoder, decoder and
        # quant convs; the bn.* statistics are unexpected keys, dropped) and its config's scaling_factor,
        # which the FLUX.2 config lacks, so the class default 0.18215 with no shift applies.
        return build_flux_vae(cfg, device, weights_dir)
    from diffusers import AutoencoderKLFlux2

    vae = load_autoencoder(
        AutoencoderKLFlux2, cfg, weights_dir, _kl_downsample
    )  # missing bn stats raise here
    if tuple(vae.config.patch_size) != (2, 2):
        raise ValueError(
            f"tokenizer 'flux2-ae': {cfg.MODEL} has patch_size {vae.config.patch_size}, expected (2, 2)"
        )
    bn = vae.bn  # BatchNorm2d(4C, affine=False): only its running statistics are used
    norm = LatentBatchNorm(bn.running_mean, torch.sqrt(bn.running_var + vae.config.batch_norm_eps))
    return _gaussian(vae, norm, cfg, device)


@TOKENIZERS.register(DCAEConfig)
def build_dc_ae(cfg: DCAEConfig, device: torch.device, weights_dir: str | None = None) -> Tokenizer:
    from diffusers import AutoencoderDC

    vae = load_autoencoder(AutoencoderDC, cfg, weights_dir, lambda v: v.spatial_compression_ratio)
    norm = ScaleShift(vae.config.scaling_factor, 0.0)
    return DeterministicAutoencoderTokenizer(
        vae.to(device, DTYPES[cfg.dtype]), norm, cfg.channels, cfg.downsample, DTYPES[cfg.dtype], sample=False
    )


def build_tokenizer(
    cfg, data, device: torch.device, weights_dir: str | None = None, cache_dir=None
) -> Tokenizer:
    """The tokenizer of config `cfg`. One trained on the data domain (`needs_domain`) also gets the data
    config and the folder it keeps itself in (the eval cache, beside the attribute net)."""
    extra = {"data": data, "cache_dir": cache_dir} if cfg.needs_domain else {}
    return TOKENIZERS.build(cfg, device, weights_dir=weights_dir, **extra)


from trainer.factors import domain_ae  # noqa: E402, F401 - the demo's domain-ae kind registers itself
