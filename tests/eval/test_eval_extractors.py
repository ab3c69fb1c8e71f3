"""Extractors: what each network receives (checked against the documented resize and
normalisation, recomputed here independently), loading from a weights folder, missing-weight errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_testing import INCEPTION_FILE, save_in_hf_cache, tiny_clip, tiny_dino, write_tiny_inception
from PIL import Image

from core.weights import URLWeights
from eval.extractors import (
    EXTRACTORS,
    ClipExtractor,
    DinoV2Extractor,
    InceptionExtractor,
    MissingWeightsError,
    load_extractor,
    weights_for,
)


def _known_image(h: int = 40, w: int = 30) -> np.ndarray:
    """A deterministic non-square uint8 RGB image with edges, gradients and saturated pixels."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(7 * xx + 3 * yy) % 256, (xx * yy) % 256, np.where((xx // 5 + yy // 5) % 2, 255, 0)], -1)
    return img.astype(np.uint8)


def _record_inputs(model: torch.nn.Module) -> list[torch.Tensor]:
    """Captures the pixel tensor every forward of `model` receives (positional or `pixel_values=`)."""
    seen: list[torch.Tensor] = []

    def hook(_module, args, kwargs):
        seen.append((args[0] if args else kwargs["pixel_values"]).detach().clone())

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


# ------------------------------------------------------------------------------------------ inception


def test_inception_input_is_cleanfid_clean_resize(tiny_inception_dir):
    ext = InceptionExtractor.load(tiny_inception_dir)
    seen = _record_inputs(ext.model)
    img = _known_image()
    feats = ext.features(img[None])
    # mode "clean": each channel resized alone as a float32 PIL image ("F"), bicubic, clipped to [0, 255]
    expected = np.stack(
        [
            np.asarray(
                Image.fromarray(img[..., c].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC)
            )
            for c in range(3)
        ]
    ).clip(0, 255)  # (3, 299, 299)
    assert seen[0].shape == (1, 3, 299, 299) and seen[0].dtype == torch.float32
    np.testing.assert_array_equal(seen[0][0].numpy(), expected)
    assert feats.shape == (1, 2048) and feats.dtype == np.float32


def test_inception_features_equal_cleanfid_folder_pass(tiny_inception_dir, tmp_path, rng):
    """The same images through clean-fid's own feature pass (PNG folder, its resize, its dataloader)."""
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W

    images = rng.integers(0, 256, (5, 24, 20, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / f"{i:03d}.png")
    model = InceptionV3W(str(tiny_inception_dir), download=False)
    theirs = get_folder_features(
        str(tmp_path),
        model,
        num_workers=0,
        batch_size=4,
        device=torch.device("cpu"),
        mode="clean",
        verbose=False,
    )
    ours = InceptionExtractor(model).features(images, batch_size=3)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_float_images_are_quantised_like_png(inception, rng):
    images = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    as_float = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # NCHW in [0, 1]
    np.testing.assert_array_equal(inception.features(as_float), inception.features(images))


# ----------------------------------------------------------------------------------------------- clip


def test_clip_input_is_crop_pil_bicubic_clip_norm(clip):
    seen = _record_inputs(clip.model)
    img = _known_image(40, 30)  # portrait: the crop removes 5 rows top and bottom
    emb = clip.features(img[None])
    crop = img[5:35, :, :]
    resized = np.asarray(Image.fromarray(crop).resize((336, 336), Image.BICUBIC)).astype(np.float32) / 255.0
    mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
    expected = ((resized - mean) / std).transpose(2, 0, 1)  # (3, 336, 336)
    assert seen[0].shape == (1, 3, 336, 336)
    np.testing.assert_allclose(seen[0][0].numpy(), expected, atol=1e-6)
    with torch.no_grad():
        raw = clip.model(pixel_values=seen[0]).image_embeds
    np.testing.assert_allclose(emb, F.normalize(raw, dim=-1).numpy(), atol=1e-6)
    assert np.linalg.norm(emb, axis=1) == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------------------------- dinov2


def test_dino_input_is_bicubic_518_imagenet_norm(dino):
    seen = _record_inputs(dino.model)
    img = _known_image(40, 30)
    emb = dino.features(img[None])
    x = torch.from_numpy(img).permute(2, 0, 1)[None].double() / 255.0  # float64 reference
    x = F.interpolate(
        x, size=(518, 518), mode="bicubic", align_corners=False
    )  # no crop: aspect ratio changes
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    expected = (x - mean) / std
    assert seen[0].shape == (1, 3, 518, 518)
    np.testing.assert_allclose(
        seen[0].numpy(), expected.numpy(), atol=5e-5
    )  # float32 vs float64 interpolation
    with torch.no_grad():
        out = dino.model(pixel_values=seen[0])
    cls_after_norm = out.last_hidden_state[:, 0]  # the CLS token of the final-normed sequence
    np.testing.assert_allclose(emb, F.normalize(cls_after_norm, dim=-1).numpy(), atol=1e-6)
    assert np.linalg.norm(emb, axis=1) == pytest.approx(1.0, abs=1e-6)


def test_batching_does_not_change_features(dino, rng):
    images = rng.integers(0, 256, (5, 20, 20, 3), dtype=np.uint8)
    one_batch = dino.features(images, batch_size=5)
    batches = dino.features([images[:2], images[2:]], batch_size=2)
    np.testing.assert_allclose(batches, one_batch, atol=1e-5)


# ------------------------------------------------------------------------------------ loading, weights


def test_load_from_weights_folder(tmp_path):
    save_in_hf_cache(tiny_clip(), tmp_path, "openai/clip-vit-large-patch14-336")
    save_in_hf_cache(tiny_dino(), tmp_path, "facebook/dinov2-with-registers-large")
    write_tiny_inception(tmp_path)
    assert [
        weights_for(n).missing(tmp_path) for n in ("inception", "clip-vit-l14-336", "dinov2-vitl14-reg")
    ] == [None] * 3
    img = _known_image()[None]
    for name, cls in [("inception", InceptionExtractor), ("clip-vit-l14-336", ClipExtractor),
                      ("dinov2-vitl14-reg", DinoV2Extractor)]:  # fmt: skip
        ext = load_extractor(name, tmp_path)
        assert isinstance(ext, cls) and ext.name == name
        assert np.isfinite(ext.features(img)).all()


@pytest.mark.parametrize(
    "name, needle",
    [
        ("inception", INCEPTION_FILE),
        ("clip-vit-l14-336", "openai/clip-vit-large-patch14-336"),
        ("dinov2-vitl14-reg", "facebook/dinov2-with-registers-large"),
        ("domain-attr", "domain-attr-*.pt"),
    ],
)
def test_missing_weights_is_one_clear_line(tmp_path, name, needle):
    with pytest.raises(MissingWeightsError) as err:
        load_extractor(name, tmp_path / "weights")
    msg = str(err.value)
    assert "\n" not in msg
    assert needle in msg and f"ablate weights download SWEEP --dir {tmp_path / 'weights'}" in msg
    assert weights_for(name).missing(tmp_path / "weights") is not None


def test_unknown_extractor_lists_choices():
    with pytest.raises(ValueError, match="choose one of: " + ", ".join(EXTRACTORS)):
        load_extractor("vgg")


def test_url_download_writes_the_file_atomically(tmp_path):
    source = tmp_path / "src" / "model.pt"
    source.parent.mkdir()
    source.write_bytes(b"weights")
    spec = URLWeights("model.pt", source.as_uri(), default_dir=str(tmp_path / "default"))
    dest = tmp_path / "weights"
    assert spec.missing(dest) is not None
    spec.download(dest)
    assert (dest / "model.pt").read_bytes() == b"weights"
    assert spec.missing(dest) is None and list(dest.iterdir()) == [dest / "model.pt"]


def test_hf_download_prefers_safetensors_then_falls_back(tmp_path, monkeypatch):
    """The repo has only pytorch_model.bin: the first snapshot finds no safetensors, the second the .bin."""
    calls = []

    def fake_snapshot_download(repo_id, cache_dir, allow_patterns):
        calls.append(allow_patterns)
        snap = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("a" * 40)
        snap.mkdir(parents=True, exist_ok=True)
        (snap.parent.parent / "refs").mkdir(exist_ok=True)
        (snap.parent.parent / "refs" / "main").write_text("a" * 40)
        for pattern in allow_patterns:
            if pattern in ("config.json", "pytorch_model.bin"):
                (snap / pattern).write_text("{}")

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    spec = weights_for("clip-vit-l14-336")
    spec.download(tmp_path)
    assert calls == [["config.json", "model.safetensors"], ["config.json", "pytorch_model.bin"]]
    assert spec.missing(tmp_path) is None


def test_prefetched_keeps_order_and_raises_errors():
    from eval.base import prefetched

    assert list(prefetched(range(5), lambda i: i * i)) == [0, 1, 4, 9, 16]

    def fail_on_three(i):
        if i == 3:
            raise RuntimeError("bad batch 3")
        return i

    with pytest.raises(RuntimeError, match="bad batch 3"):
        list(prefetched(range(5), fail_on_three))
