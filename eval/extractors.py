"""Feature extractors by name: one registry, one entry per extractor.

Every extractor takes uint8 NHWC RGB batches (see `eval.images`) and returns (N, D) float32 features.
`preprocess` returns exactly the tensor the network receives, so tests can check it against the
documented resize and normalisation; `embed` runs the network and the final normalisation.

| name               | network                                              | preprocessing                                          | features |
|--------------------|------------------------------------------------------|--------------------------------------------------------|----------|
| inception          | clean-fid's Inception-2015-12-05 TorchScript (`InceptionV3W`) | clean-fid mode "clean": `build_resizer("clean")`, PIL bicubic per channel in float32 to 299, [0, 255]; the net applies (x−128)/128 | 2048-d pool, raw |
| inception-prx      | torch-fidelity's `FeatureExtractorInceptionV3` (the network of torchmetrics' FID) | PRX's FID input: float images truncated to uint8 (`clamp(x·255, 0, 255).to(uint8)`; real images resized by torch's antialiased bilinear on floats first, as PRX's eval set), then wrapped by `(x * 255).byte()` (x ↦ (256 − x) mod 256, near colour inversion); the net resizes to 299 (TF1-compatible bilinear) and applies (x−128)/128 | 2048-d pool, raw |
| clip-vit-l14-336   | transformers `CLIPVisionModelWithProjection`, `openai/clip-vit-large-patch14-336` | centre-crop to the shorter side, PIL bicubic on uint8 to 336 (antialiased, as google-research `cmmd`), /255, CLIP mean/std | `image_embeds`, L2-normalised, 768-d |
| dinov2-vitl14-reg  | transformers `Dinov2WithRegistersModel`, `facebook/dinov2-with-registers-large` | /255, `F.interpolate(bicubic, 518, align_corners=False)` (no antialias, no crop, as PRX), ImageNet mean/std | CLS after the final norm (`pooler_output`), L2-normalised, 1024-d |
| domain-attr        | `eval.domain.AttributeNet`, trained on the demo domain | /255 at native size | penultimate layer, L2-normalised |
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from cleanfid.downloads_helper import inception_url
from PIL import Image

from core.weights import (
    HFModelFile,
    HFWeights,
    MissingWeightsError,
    URLWeights,
    Weights,
    load_pretrained,
    require,
)
from eval.base import Extractor
from eval.domain import DOMAIN_WEIGHTS, DomainAttrExtractor
from eval.images import map_images

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------- inception

INCEPTION_WEIGHTS = URLWeights(
    filename="inception-2015-12-05.pt",
    url=inception_url,  # clean-fid's own source for the file
    default_dir="./" if platform.system() == "Windows" else "/tmp",  # where clean-fid itself keeps it
)


class InceptionExtractor(Extractor):
    """clean-fid's FID features, mode "clean". `model` maps (N, 3, 299, 299) float in [0, 255] to
    (N, 2048): `cleanfid.inception_torchscript.InceptionV3W`, or any module with that contract."""

    name = "inception"
    resolution = 299

    def __init__(
        self, model: torch.nn.Module, device: str | torch.device = "cpu", version: str | None = None
    ):
        from importlib.metadata import version as package_version

        from cleanfid.resize import build_resizer

        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self._resize = build_resizer("clean")  # clean-fid's own PIL float32 bicubic resize to 299
        self.version = version or f"inception-2015-12-05/clean-fid-{package_version('clean-fid')}-clean"

    @classmethod
    def load(cls, weights_dir: str | Path | None, device: str | torch.device = "cpu") -> InceptionExtractor:
        from cleanfid.inception_torchscript import InceptionV3W

        require(INCEPTION_WEIGHTS, weights_dir, needed_by=f"extractor '{cls.name}'")
        folder = INCEPTION_WEIGHTS.path(weights_dir).parent
        return cls(InceptionV3W(str(folder), download=False, resize_inside=False), device)

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        resized = map_images(self._resize, images)  # each (299, 299, 3) float32 in [0, 255]
        return torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).to(self.device)  # (N, 3, 299, 299)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)  # (N, 2048)


# ------------------------------------------------------------------------------------- inception-prx

PRX_INCEPTION_WEIGHTS = URLWeights(
    filename="weights-inception-2015-12-05-6726825d.pth",
    # = torch_fidelity's URL_INCEPTION_V3 (a test checks); importing torch-fidelity here would import
    # torchvision for every user of this module
    url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    default_dir=str(Path(torch.hub.get_dir()) / "checkpoints"),  # where torchmetrics' FID keeps it itself
)


def prx_wrap(images: torch.Tensor) -> torch.Tensor:
    """What PRX's FID hands Inception: its uint8 images through torchmetrics' `(imgs * 255).byte()`.

    `FrechetInceptionDistance(normalize=True)` expects floats in [0, 1]; PRX's callback passes uint8,
    and uint8 arithmetic wraps: x ↦ 255·x mod 256 = (256 − x) mod 256. 0 and 128 stay, every other
    value is mirrored (1 ↔ 255, 2 ↔ 254): the images are (nearly) colour-inverted."""
    return (images * 255).byte()


class InceptionPRXExtractor(Extractor):
    """PRX's own FID features (metric `fid_prx`): what torchmetrics' `FrechetInceptionDistance(normalize=True)`
    extracts from the uint8 images PRX's eval callback feeds it, in torchmetrics 1.7.4 (PRX's uv.lock).

    The uint8 images are PRX's too: float images are truncated, not rounded (`quantise = "floor"`, PRX's
    `torch.clamp(x * 255, 0, 255).to(torch.uint8)`), and the trainer resizes the real images for it with
    torch (`resize = "torch"`: PRX's eval set goes through torchvision's `resize(antialias=True)`,
    bilinear, on float images in [0, 1]), not PIL. Images handed over as uint8 (a folder of PNGs) are
    taken as they are. `preprocess` applies the wrap (`prx_wrap`) and returns uint8 (N, 3, H, W) at the
    images' own size: the network resizes. `model` maps that to (N, 2048): torch-fidelity's `FeatureExtractorInceptionV3`
    with its TF1-compatible bilinear resize to 299 (torchmetrics' FID before 1.8; `antialias=False`
    since), or any module with the contract of torchmetrics' `feature=` argument."""

    name = "inception-prx"
    quantise = "floor"
    resize = "torch"

    def __init__(
        self, model: torch.nn.Module, device: str | torch.device = "cpu", version: str | None = None
    ):
        from importlib.metadata import version as package_version

        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.version = version or (
            f"inception-2015-12-05-6726825d/torch-fidelity-{package_version('torch-fidelity')}"
            "-tf1bilinear299/prx-uint8-wrap/floor/torch-resize"
        )

    @classmethod
    def load(
        cls, weights_dir: str | Path | None, device: str | torch.device = "cpu"
    ) -> InceptionPRXExtractor:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        require(PRX_INCEPTION_WEIGHTS, weights_dir, needed_by=f"extractor '{cls.name}' (metric fid_prx)")
        path = str(PRX_INCEPTION_WEIGHTS.path(weights_dir))
        net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=path
        )
        return cls(_FirstFeature(net), device)

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)  # (N, 3, H, W)
        return prx_wrap(x)  # uint8

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)  # (N, 2048)


class _FirstFeature(torch.nn.Module):
    """torch-fidelity returns a tuple of the requested features; torchmetrics' FID keeps the first as (N, D)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0].reshape(x.shape[0], -1)


# ------------------------------------------------------------------------------------------------ clip

CLIP_WEIGHTS = HFModelFile("openai/clip-vit-large-patch14-336")


def center_crop_square(image: np.ndarray) -> np.ndarray:
    """(H, W, C) → (S, S, C), S = min(H, W), offsets rounded like torchvision's CenterCrop."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
    return image[top : top + s, left : left + s]


class HFExtractor(Extractor):
    """A transformers vision model from the HF cache, normalised with `MEAN`/`STD` after resizing."""

    WEIGHTS: HFWeights
    MODEL_CLASS: str  # transformers class name
    MEAN: tuple[float, float, float]
    STD: tuple[float, float, float]
    PREPROCESSING: str  # part of `version`: changing the preprocessing changes every cache key
    resolution: int

    def __init__(
        self, model: torch.nn.Module, device: str | torch.device = "cpu", version: str | None = None
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.version = version or f"{self.WEIGHTS.repo_id}/{self.PREPROCESSING}"
        self._mean = torch.tensor(self.MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.STD, device=self.device).view(1, 3, 1, 1)

    @classmethod
    def load(cls, weights_dir: str | Path | None, device: str | torch.device = "cpu") -> HFExtractor:
        import transformers

        model_class = getattr(transformers, cls.MODEL_CLASS)
        return cls(
            load_pretrained(model_class, cls.WEIGHTS, weights_dir, needed_by=f"extractor '{cls.name}'"),
            device,
        )


class ClipExtractor(HFExtractor):
    """CMMD's CLIP ViT-L/14@336 image embeddings, L2-normalised."""

    name = "clip-vit-l14-336"
    resolution = 336
    WEIGHTS = CLIP_WEIGHTS
    MODEL_CLASS = "CLIPVisionModelWithProjection"
    MEAN, STD = CLIP_MEAN, CLIP_STD
    PREPROCESSING = f"crop-pilbicubic{resolution}-clipnorm"

    def _resize(self, image: np.ndarray) -> np.ndarray:
        square = Image.fromarray(center_crop_square(image))
        return np.asarray(square.resize((self.resolution, self.resolution), Image.BICUBIC))  # uint8 (S, S, 3)

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        resized = np.stack(map_images(self._resize, images))  # (N, 336, 336, 3) uint8
        x = torch.from_numpy(resized).to(self.device).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, 336, 336)
        return (x - self._mean) / self._std

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        emb = self.model(pixel_values=pixels).image_embeds  # (N, 768)
        return F.normalize(emb.float(), dim=-1)


# ---------------------------------------------------------------------------------------------- dinov2

DINOV2_WEIGHTS = HFModelFile("facebook/dinov2-with-registers-large")


class DinoV2Extractor(HFExtractor):
    """DINO-MMD's DINOv2 ViT-L/14 with registers: CLS token, L2-normalised (PRX's definition)."""

    name = "dinov2-vitl14-reg"
    resolution = 518
    WEIGHTS = DINOV2_WEIGHTS
    MODEL_CLASS = "Dinov2WithRegistersModel"
    MEAN, STD = IMAGENET_MEAN, IMAGENET_STD
    PREPROCESSING = f"interp-bicubic{resolution}-imagenetnorm"

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        size = (self.resolution, self.resolution)
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)  # (N, 3, 518, 518)
        return (x - self._mean) / self._std

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        cls_token = self.model(pixel_values=pixels).pooler_output  # (N, 1024), after the final LayerNorm
        return F.normalize(cls_token.float(), dim=-1)


# -------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ExtractorEntry:
    weights: Weights
    load: Callable[..., Extractor]  # (weights_dir, device) -> Extractor


EXTRACTORS: dict[str, ExtractorEntry] = {
    "inception": ExtractorEntry(INCEPTION_WEIGHTS, InceptionExtractor.load),
    "inception-prx": ExtractorEntry(PRX_INCEPTION_WEIGHTS, InceptionPRXExtractor.load),
    "clip-vit-l14-336": ExtractorEntry(CLIP_WEIGHTS, ClipExtractor.load),
    "dinov2-vitl14-reg": ExtractorEntry(DINOV2_WEIGHTS, DinoV2Extractor.load),
    "domain-attr": ExtractorEntry(DOMAIN_WEIGHTS, DomainAttrExtractor.load),
}


def _entry(name: str) -> ExtractorEntry:
    if name not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor '{name}'; choose one of: {', '.join(EXTRACTORS)}")
    return EXTRACTORS[name]


def load_extractor(
    name: str, weights_dir: str | Path | None = None, device: str | torch.device = "cpu"
) -> Extractor:
    """Loads `name` from `weights_dir` (or the default caches); `MissingWeightsError` when absent."""
    return _entry(name).load(weights_dir, device)


def weights_for(name: str) -> Weights:
    return _entry(name).weights


__all__ = [
    "EXTRACTORS",
    "ClipExtractor",
    "DinoV2Extractor",
    "Extractor",
    "InceptionExtractor",
    "InceptionPRXExtractor",
    "MissingWeightsError",
    "load_extractor",
    "weights_for",
]
