"""`eval.reference` (real images from a parquet file or an image folder) and the `fid_prx` metric,
through the trainer's real set-up: the config, `GenerationEval`, the evaluator, the reference cache,
and torch-fidelity's Inception loaded from a weights folder (random weights, the real architecture).

The reference features are checked against PRX's own FID code path: torchmetrics'
`FrechetInceptionDistance(normalize=True)` fed uint8 images, as PRX's eval callback does.
"""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from trainer_testing import TINY, merge

from eval.extractors import PRX_INCEPTION_WEIGHTS
from trainer.config import TrainConfig
from trainer.data.datasets import ReferenceConfig, ReferenceSet
from trainer.runtime.dist import Dist
from trainer.train import Trainer

SIZES = [(28, 20), (20, 24), (24, 24)]  # (W, H): non-square files, centre-cropped like training images


@pytest.fixture(scope="module")
def prx_weights(tmp_path_factory):
    """A weights folder holding torch-fidelity's InceptionV3 (the network of torchmetrics' FID) with
    random He-initialised weights (features stay O(1) through its depth), under the real file name."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    folder = tmp_path_factory.mktemp("prx-weights")
    blank = folder / "blank.pth"
    torch.save({}, blank)
    with pytest.MonkeyPatch.context() as mp:  # keep the random init instead of loading `blank`
        mp.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, strict=True: None)
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=blank
        )
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), PRX_INCEPTION_WEIGHTS.path(folder))
    yield folder
    PRX_INCEPTION_WEIGHTS.path(folder).unlink()  # 95 MB: pytest keeps its last temporary folders


def random_images(seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


def prepared(img: Image.Image, side: int = 16) -> np.ndarray:
    """The documented preparation of a real image: RGB, centre square (floor offsets), bicubic to `side`."""
    img = img.convert("RGB")
    s = min(img.size)
    left, top = (img.width - s) // 2, (img.height - s) // 2
    return np.asarray(img.crop((left, top, left + s, top + s)).resize((side, side), Image.Resampling.BICUBIC))


def prx_prepared(img: Image.Image, side: int = 16) -> np.ndarray:
    """The same centre square as PRX prepares and scores its eval images: uint8 / 255 (`image_to_tensor`),
    torchvision's resize (antialias=True) on the float tensor, clamped, then its eval callback's
    `torch.clamp(x * 255, 0, 255).to(torch.uint8)`."""
    import torchvision.transforms.v2.functional as TF
    from torchvision import tv_tensors

    img = img.convert("RGB")
    s = min(img.size)
    left, top = (img.width - s) // 2, (img.height - s) // 2
    x = torch.from_numpy(np.array(img.crop((left, top, left + s, top + s)))).permute(2, 0, 1)
    x = TF.resize(tv_tensors.Image(x.to(torch.float32).div(255.0)), [side, side], antialias=True)
    x = torch.clamp(x.as_subclass(torch.Tensor), 0.0, 1.0)
    return torch.clamp(x * 255.0, 0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def trainer(tmp_path, name: str, weights, reference: dict | None) -> Trainer:
    ev = {"metrics": ["fid_prx"], "samples": 2, "reference": reference, "cache_dir": str(tmp_path / "cache")}
    run = tmp_path / name
    run.mkdir()
    cfg = TrainConfig.model_validate(merge(TINY, {"weights_dir": str(weights), "eval": ev}))
    return Trainer(cfg, run, Dist(0, 1, 0, torch.device("cpu")))


def torchmetrics_features(weights, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Σx and Σxxᵀ of the features PRX's FID accumulates for uint8 (N, H, W, 3) real images: torchmetrics'
    FID with normalize=True fed uint8 NCHW, resizing as torchmetrics 1.7.4 (PRX's lock) does."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    path = str(PRX_INCEPTION_WEIGHTS.path(weights))
    fid = FrechetInceptionDistance(normalize=True, antialias=False, feature_extractor_weights_path=path)
    fid.update(torch.from_numpy(images).permute(0, 3, 1, 2), real=True)
    return fid.real_features_sum, fid.real_features_cov_sum


def test_reference_sets_from_a_folder_and_a_parquet_file_as_prx_scores_them(tmp_path, prx_weights):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "real"
    (folder / "b").mkdir(parents=True)
    imgs = random_images(seed=1)
    imgs[0].save(folder / "a.png")
    imgs[1].save(folder / "b" / "c.jpg", quality=90)
    imgs[2].save(folder / "d.webp", lossless=True)
    (folder / "notes.txt").write_text("not an image")
    ev = trainer(
        tmp_path, "folder", prx_weights, {"kind": "folder", "path": str(folder)}
    ).evaluation.generation.evaluator
    assert ev.reference.num_samples == 2  # eval.samples of the 3 images, in path order
    feats = ev.reference_features()["inception-prx"].feats  # (2, 2048)
    expected = np.stack(
        [prx_prepared(Image.open(folder / "a.png")), prx_prepared(Image.open(folder / "b" / "c.jpg"))]
    )
    pil = np.stack([prepared(Image.open(folder / "a.png")), prepared(Image.open(folder / "b" / "c.jpg"))])
    assert (expected != pil).mean() > 0.5  # PRX's resize and truncation: most values differ from ours
    total, cov = torchmetrics_features(prx_weights, expected)  # PRX's FID on these real images
    np.testing.assert_allclose(feats.sum(0, dtype=np.float64), total.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(feats.T.astype(np.float64) @ feats, cov.numpy(), rtol=1e-4, atol=1e-3)

    def encoded(img: Image.Image) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    imgs = random_images(seed=2)
    path = tmp_path / "real.parquet"
    pq.write_table(pa.table({"img": [encoded(im) for im in imgs], "caption": ["x"] * 3}), path)
    reference = {"kind": "parquet", "path": str(path), "image_column": "img"}
    ev2 = trainer(tmp_path, "parquet", prx_weights, reference).evaluation.generation.evaluator
    np.testing.assert_array_equal(
        np.concatenate(list(ev2.reference.images())), [prepared(im) for im in imgs[:2]]
    )
    ev2.reference_features()

    # one cache entry per set (every arm reading these files shares it); a changed set gets a new one
    entries = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*.json")]
    assert sorted(e["dataset"] for e in entries) == sorted([ev.reference.dataset, ev2.reference.dataset])
    assert (
        ev.reference.dataset.startswith("reference:folder:") and "reference:parquet:" in ev2.reference.dataset
    )
    same = ReferenceSet(ReferenceConfig.model_validate(reference), 16)
    assert same.identity() == ev2.reference.dataset
    assert ReferenceSet(ReferenceConfig.model_validate(reference), 32).identity() != same.identity()
    pq.write_table(pa.table({"img": [encoded(im) for im in random_images(seed=3)]}), path)
    assert ReferenceSet(ReferenceConfig.model_validate(reference), 16).identity() != ev2.reference.dataset


def test_prx_resize_is_torchvision_antialiased_bilinear_on_floats_by_hand():
    """A 4×4 image whose rows are 0, 60, 120, 240 brought to 2×2. Antialiased bilinear at scale 2 weighs the
    input pixels at distances 0.5 and 1.5 from an output pixel's centre by 0.75 and 0.25 (a triangle twice
    as wide), dropping those outside the image and renormalising: (0.75·0 + 0.75·60 + 0.25·120) / 1.75 =
    300/7 and (0.25·60 + 0.75·120 + 0.75·240) / 1.75 = 1140/7, i.e. 42.86 and 162.86 of 255. PRX truncates
    them to 42 and 162; PIL's bicubic (the training images') gives 33 and 172."""
    import torchvision.transforms.v2.functional as TF
    from torchvision import tv_tensors

    from trainer.data.datasets import torch_resize

    row = np.array([0, 60, 120, 240], np.uint8)
    img = Image.fromarray(np.broadcast_to(row[None, :, None], (4, 4, 3)).copy())
    x = torch_resize(img, 2)  # (3, 2, 2) float
    torch.testing.assert_close(x * 255, torch.tensor([300 / 7, 1140 / 7]).expand(3, 2, 2), rtol=0, atol=1e-4)
    prx = TF.resize(
        tv_tensors.Image(torch.from_numpy(np.array(img)).permute(2, 0, 1) / 255.0), [2, 2], antialias=True
    )
    assert torch.equal(x, prx.as_subclass(torch.Tensor).clamp(0, 1))  # the call PRX's ArAwareResize makes
    assert torch.clamp(x * 255, 0, 255).to(torch.uint8)[0, 0].tolist() == [42, 162]
    assert np.asarray(img.resize((2, 2), Image.Resampling.BICUBIC))[0, :, 0].tolist() == [33, 172]


def test_a_bad_reference_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="image_column applies to a parquet reference set"):
        TrainConfig.model_validate(
            merge(TINY, {"eval": {"reference": {"kind": "folder", "path": "x", "image_column": "y"}}})
        )
    for reference, message in [
        ({"kind": "parquet", "path": str(tmp_path / "none.parquet")}, "none.parquet: no such parquet file"),
        ({"kind": "folder", "path": str(tmp_path)}, "no images (.png, .jpg, .jpeg, .bmp, .webp) under it"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)) as e:
            ReferenceSet(ReferenceConfig.model_validate(reference), 16)
        assert "\n" not in str(e.value) and "eval.reference.path" in str(e.value)
