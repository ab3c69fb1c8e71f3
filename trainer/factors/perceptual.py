"""Perceptual losses on the predicted clean image: LPIPS and perceptual DINO (Photoroom/PRX
`prx/algorithm/lpips.py`, `prx/algorithm/perceptual_dino.py`, configs/yamls/*/LPIPS.yaml and
Perceptual_DINO.yaml).

Both compare x̂0, the net's clean estimate (its raw output under x-prediction, x_t − t·v under
v-prediction; trainer/flow.py `clean`), with the real image x0, as images in [-1, 1]:

    loss = weight · (1/b) · Σ_i [t_i < t_threshold] · d(x̂0_i, x0_i)

- `lpips`: d = LPIPS (the `lpips` package's network: a frozen VGG16 or AlexNet trunk, its linear layers
  calibrated on human judgements, shipped in its wheel), on both images resized by `resize`
  (bilinear, align_corners False). PRX: VGG, weight 0.1, t_threshold 1, resize 0.5 at 1024 px.
- `p-dino`: d = mean over patches of 1 − cos(f(x̂0), f(x0)), f the patch tokens (final norm, CLS and
  registers stripped) of a frozen DINO (the REPA teachers, trainer/factors/repa.py) on both images
  resized (bilinear, align_corners False) to `resolution` px, then clamped to [0, 1] and ImageNet-
  normalised; no gradient through the real image's branch. PRX: DINOv2-B/14 with registers, weight
  0.01, t_threshold 1, 224 px.

Where PRX differs, and why:
- PRX's two losses refuse any arm but x-prediction in pixel space (they raise at start-up otherwise), so
  its flux1-vae-benchmark LPIPS.yaml and Perceptual_DINO.yaml cannot run as committed. Here a latent arm
  decodes x̂0 through the frozen tokenizer's decoder, with gradients (`Prediction.pred_images`), and compares
  it with the real image.
- PRX divides the masked sum by the number of samples under the threshold on each GPU, which depends on
  how the batch is split; here by the process's rows (the same at any process count). The two agree at
  t_threshold 1, PRX's setting (t < 1 always).
- PRX recovers x0 as x_t − max(t, 0.05)·v_target, which is x0 itself in x-prediction, PRX's only mode.
- PRX stores both networks in bf16; here they are fp32 under the arm's autocast (bf16 on GPUs).

The frozen networks are no part of the denoiser: not trained, not in checkpoints. LPIPS's ImageNet trunk
is torchvision's weight file, which `ablate weights download` fetches like every other weight; a missing
one is a one-line error naming it and that command. `backbone: random` is a seeded random trunk (with the
package's real linear layers), for the CPU tests and the demo.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from core.weights import URLWeights, require
from trainer.factors.repa import TEACHERS
from trainer.flow import Prediction
from trainer.model import FactorContext
from trainer.registry import Config, Registry

LPIPS = Registry("lpips")
PERCEPTUAL_DINO = Registry("perceptual_dino")


def _hub_checkpoints() -> str:
    """Where torchvision keeps downloaded weights ($TORCH_HOME/hub/checkpoints): a file fetched there by
    torchvision itself is found without a weights folder."""
    return str(Path(torch.hub.get_dir()) / "checkpoints")


# torchvision's ImageNet weights of the trunks lpips builds (VGG16_Weights / AlexNet_Weights.IMAGENET1K_V1;
# a test checks them against torchvision's own table, which would import torchvision here)
TRUNKS: dict[str, URLWeights] = {
    "vgg": URLWeights(
        "vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth", _hub_checkpoints()
    ),  # fmt: skip
    "alex": URLWeights(
        "alexnet-owt-7be5be79.pth",
        "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        _hub_checkpoints(),
    ),  # fmt: skip
}


def masked_mean(per_sample: torch.Tensor, t: torch.Tensor, threshold: float) -> torch.Tensor:
    """(1/b) Σ_i [t_i < threshold] · per_sample_i: the rows above the threshold count as zero."""
    return (per_sample.float() * (t < threshold).float()).mean()


# -- LPIPS -------------------------------------------------------------------------------------------------
class LPIPSConfig(Config):
    kind: Literal["lpips"] = "lpips"
    weight: float = Field(0.1, gt=0, description="loss = weight · LPIPS(x̂0, x0) (PRX: 0.1)")
    net: Literal["vgg", "alex"] = Field("vgg", description="LPIPS trunk (PRX: vgg)")
    t_threshold: float = Field(1.0, gt=0, le=1, description="only samples with t below this (1 = all, PRX)")
    resize: float = Field(
        1.0,
        gt=0,
        le=1,
        description="scale both images by this first, bilinear (PRX: 0.5 at 1024 px, 1 at 256)",
    )
    backbone: Literal["imagenet", "random"] = Field(
        "imagenet",
        description="imagenet = torchvision's trunk weights (LPIPS as published); random = a seeded "
        "random trunk for CPU tests and the demo, not a perceptual metric",
    )

    def weights(self) -> list[URLWeights]:
        return [TRUNKS[self.net]] if self.backbone == "imagenet" else []


def lpips_network(net: str, backbone: str, weights_dir: str | None) -> torch.nn.Module:
    """`lpips.LPIPS` with its linear layers from the package's wheel and the trunk from torchvision's weight
    file (or seeded random). Built on the meta device first: lpips would otherwise build torchvision's whole
    classifier and fetch the trunk from the network itself."""
    import lpips

    if backbone == "imagenet":
        require(TRUNKS[net], weights_dir, needed_by=f"lpips (net {net})")
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # lpips passes torchvision's deprecated `pretrained`
        model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
    model = model.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]):  # leave the trainer's global RNG untouched
        torch.manual_seed(0)
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.reset_parameters()
    model.scaling_layer = (
        lpips.lpips.ScalingLayer()
    )  # its constant shift and scale, which to_empty left unset
    if backbone == "imagenet":
        trunk = torch.load(TRUNKS[net].path(weights_dir), map_location="cpu", weights_only=True)
        # lpips keeps torchvision's `features` layers under their indices, in slices
        for slice_ in model.net.children():
            for index, layer in slice_.named_children():
                layer.load_state_dict({k: trunk[f"features.{index}.{k}"] for k in layer.state_dict()})
    linear = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"  # shipped in the wheel
    model.load_state_dict(torch.load(linear, map_location="cpu", weights_only=True), strict=False)
    return model.eval().requires_grad_(False)


class LPIPSTerm:
    def __init__(self, cfg: LPIPSConfig, network: torch.nn.Module):
        self.weight, self.t_threshold, self.resize, self.network = (
            cfg.weight,
            cfg.t_threshold,
            cfg.resize,
            network,
        )

    def __call__(self, p: Prediction) -> torch.Tensor:
        pred, real = p.pred_images, p.images * 2 - 1  # (b, 3, H, W) in about [-1, 1]
        if self.resize != 1:
            pred, real = (F.interpolate(x, scale_factor=self.resize, mode="bilinear", align_corners=False)
                          for x in (pred, real))  # fmt: skip
        per_sample = self.network(pred, real).view(-1)  # (b,)
        return self.weight * masked_mean(per_sample, p.t, self.t_threshold)


@LPIPS.register(LPIPSConfig)
def build_lpips(cfg: LPIPSConfig, ctx: FactorContext) -> LPIPSTerm:
    return LPIPSTerm(cfg, lpips_network(cfg.net, cfg.backbone, ctx.weights_dir).to(ctx.device))


# -- perceptual DINO -------------------------------------------------------------------------------------
class PerceptualDINOConfig(Config):
    kind: Literal["p-dino"] = "p-dino"
    weight: float = Field(0.01, gt=0, description="loss = weight · mean over patches of 1 − cos (PRX: 0.01)")
    encoder: TEACHERS.union() = Field(
        description="frozen DINO, as REPA's teachers (kind: " + ", ".join(TEACHERS.kinds) + "; "
        "PRX: dinov2-vitb14-reg)"
    )
    t_threshold: float = Field(1.0, gt=0, le=1, description="only samples with t below this (1 = all, PRX)")
    resolution: int = Field(224, ge=1, description="both images are resized to this square first (PRX: 224)")


class PerceptualDINOTerm:
    def __init__(self, cfg: PerceptualDINOConfig, encoder: torch.nn.Module):
        self.weight, self.t_threshold, self.size = (
            cfg.weight,
            cfg.t_threshold,
            (cfg.resolution, cfg.resolution),
        )
        self.encoder = encoder

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (b, 3, H, W) in about [-1, 1] → patch tokens (b, P, D), as PRX: resize, then clamp."""
        x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return self.encoder.tokens(((x + 1) / 2).clamp(0, 1))

    def __call__(self, p: Prediction) -> torch.Tensor:
        pred = self.features(p.pred_images)  # (b, P, D)
        with torch.no_grad():
            real = self.features(p.images * 2 - 1)
        cos = F.cosine_similarity(pred.float(), real.float(), dim=-1)  # (b, P)
        return self.weight * masked_mean((1 - cos).mean(dim=-1), p.t, self.t_threshold)


@PERCEPTUAL_DINO.register(PerceptualDINOConfig)
def build_perceptual_dino(cfg: PerceptualDINOConfig, ctx: FactorContext) -> PerceptualDINOTerm:
    return PerceptualDINOTerm(cfg, TEACHERS.build(cfg.encoder, ctx))
