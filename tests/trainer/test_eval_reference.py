"""`eval.reference` (photos with their own captions, from a parquet file or an image folder) and the
`fid_prx` metric, through the trainer's real set-up: the config, `GenerationMetrics`, the sampler, the
evaluator, the reference cache, and torch-fidelity's Inception loaded from a weights folder (random
weights, the real architecture). A reference set brings its prompts: the eval prompts are its captions,
each sampled from its row's noise, and the real images are its photos, the same for every arm.

The reference features are checked against PRX's own FID code path: torchmetrics'
`FrechetInceptionDistance(normalize=True)` fed uint8 images, as PRX's eval callback does.
"""

from __future__ import annotations

import io
import json
import os
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


def encoded(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def caption_folder(root, imgs: list[Image.Image], names: list[str]):
    """An image folder as the reference kind reads it: the files, and metadata.jsonl naming each beside its
    caption (caption_llm_s, as PRX's Unsplash set)."""
    rows = []
    for i, (img, name) in enumerate(zip(imgs, names, strict=True)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        img.save(root / name, **({"quality": 90} if name.endswith(".jpg") else {"lossless": True}))
        rows.append({"file_name": name, "caption_llm_s": f"folder photo {i}", "other": "x"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_reference_sets_from_a_folder_and_a_parquet_file_as_prx_scores_them(tmp_path, prx_weights):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # row order, not path order: metadata.jsonl lists d.webp first
    folder = caption_folder(tmp_path / "real", random_images(seed=1), ["d.webp", "b/c.jpg", "a.png"])
    (folder / "notes.txt").write_text("not an image")
    reference = {"kind": "folder", "path": str(folder), "caption": "caption_llm_s"}
    ev = trainer(tmp_path, "folder", prx_weights, reference).evaluation.generation.evaluator
    assert ev.reference.num_samples == 2  # eval.samples of the 3 rows, in row order
    feats = ev.reference_features()["inception-prx"].feats  # (2, 2048)
    expected = np.stack(
        [prx_prepared(Image.open(folder / "d.webp")), prx_prepared(Image.open(folder / "b" / "c.jpg"))]
    )
    pil = np.stack([prepared(Image.open(folder / "d.webp")), prepared(Image.open(folder / "b" / "c.jpg"))])
    assert (expected != pil).mean() > 0.5  # PRX's resize and truncation: most values differ from ours
    total, cov = torchmetrics_features(prx_weights, expected)  # PRX's FID on these real images
    np.testing.assert_allclose(feats.sum(0, dtype=np.float64), total.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(feats.T.astype(np.float64) @ feats, cov.numpy(), rtol=1e-4, atol=1e-3)

    imgs = random_images(seed=2)
    path = tmp_path / "real.parquet"
    pq.write_table(pa.table({"img": [encoded(im) for im in imgs], "caption": ["x"] * 3}), path)
    reference = {"kind": "parquet", "path": str(path), "image_column": "img", "caption": "caption"}
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
    # the captions are not the images': another caption column reads the same features
    pq.write_table(
        pa.table({"img": [encoded(im) for im in imgs], "caption": ["x"] * 3, "alt": ["y"] * 3}), path
    )
    stamp = ReferenceSet(ReferenceConfig.model_validate(reference), 16).identity()
    assert (
        ReferenceSet(ReferenceConfig.model_validate({**reference, "caption": "alt"}), 16).identity() == stamp
    )
    pq.write_table(
        pa.table({"img": [encoded(im) for im in random_images(seed=3)], "caption": ["x"] * 3}), path
    )
    assert ReferenceSet(ReferenceConfig.model_validate(reference), 16).identity() != stamp
    # a folder's image changed under the same metadata.jsonl is a changed set too
    random_images(seed=4)[2].save(folder / "a.png")
    os.utime(folder / "a.png", ns=(1, 1))
    folder_ref = {"kind": "folder", "path": str(folder), "caption": "caption_llm_s"}
    assert ReferenceSet(ReferenceConfig.model_validate(folder_ref), 16).identity() != ev.reference.dataset


class Recording:
    """The trainer's own sampler, recording the captions and starting noise each call is given."""

    def __init__(self, sampler):
        self.sampler, self.captions, self.noise = sampler, [], []

    def latent_shape(self, resolution: int):
        return self.sampler.latent_shape(resolution)

    def __call__(self, captions: list[str], noise: torch.Tensor) -> torch.Tensor:
        self.captions += captions
        self.noise.append(noise.clone())
        return self.sampler(captions, noise)


def test_a_reference_set_brings_its_prompts_their_noise_and_its_photos_to_every_arm(tmp_path, prx_weights):
    """Two arms that train on different captions and seeds, scored against one reference set: both sample
    its captions in its row order from the same per-row noise (not the held-out rows' captions), and the
    real images are its photos."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    imgs = random_images(seed=5)
    captions = ["a red fox in snow", "a lighthouse at dusk", "three pears on a table"]
    path = tmp_path / "unsplash.parquet"
    pq.write_table(pa.table({"image": [encoded(im) for im in imgs], "caption_llm_s": captions}), path)
    reference = {"kind": "parquet", "path": str(path), "caption": "caption_llm_s"}
    arms = {
        "baseline": {},
        "short-captions": {"seed": 1, "data": {"caption": "short"}, "eval": {"caption": "short"}},
    }
    seen = {}
    for name, over in arms.items():
        ev = {
            "metrics": ["fid_prx"],
            "samples": 2,
            "reference": reference,
            "cache_dir": str(tmp_path / "cache"),
        }
        cfg = TrainConfig.model_validate(
            merge(merge(TINY, {"weights_dir": str(prx_weights), "eval": ev}), over)
        )
        (tmp_path / name).mkdir()
        tr = Trainer(cfg, tmp_path / name, Dist(0, 1, 0, torch.device("cpu")))
        held_out = [p["caption"] for p in tr.val_set.prompts([0, 1])]
        recording = Recording(tr.sampler)
        metrics, grid, _ = tr.evaluation(tr.denoiser, recording)
        assert np.isfinite(metrics["fid_prx"]) and len(grid) == 2
        assert recording.captions == captions[:2] and not set(held_out) & set(captions)
        generation = tr.evaluation.generation
        np.testing.assert_array_equal(  # the real images are the reference's photos, prepared
            np.concatenate(list(generation.evaluator.reference.images())), [prepared(im) for im in imgs[:2]]
        )
        seen[name] = (recording.captions, torch.cat(recording.noise), generation.evaluator.reference.dataset)
    (base_captions, base_noise, base_set), (captions_b, noise_b, set_b) = seen.values()
    assert base_captions == captions_b and base_set == set_b
    torch.testing.assert_close(base_noise, noise_b, rtol=0, atol=0)  # row j's noise, whatever the arm's seed
    assert not torch.equal(base_noise[0], base_noise[1])
    # one reference-feature entry for both arms
    assert [json.loads(p.read_text())["dataset"] for p in (tmp_path / "cache").glob("*.json")] == [base_set]


def test_the_reference_caption_column_is_part_of_the_eval_identity_not_of_what_trains():
    from ablate.sweep.expand import config_identity

    def identity(caption: str):
        ref = {"kind": "parquet", "path": "u.parquet", "caption": caption}
        cfg = TrainConfig.model_validate(merge(TINY, {"eval": {"reference": ref}}))
        return config_identity(cfg.model_dump(mode="json"))

    long, short = identity("caption_llm_s"), identity("caption_moondream")
    assert long.hash == short.hash and long.eval_hash != short.eval_hash


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
    def config(reference: dict, **ev):
        return TrainConfig.model_validate(merge(TINY, {"eval": {"reference": reference, **ev}}))

    with pytest.raises(ValueError, match="image_column applies to a parquet reference set"):
        config({"kind": "folder", "path": "x", "image_column": "y", "caption": "c"})
    with pytest.raises(
        ValueError, match=r"eval.reference needs caption: the column of its own captions"
    ) as e:
        config({"kind": "parquet", "path": "x"})
    with pytest.raises(ValueError, match=r"eval.metrics \['prompt_adherence'\] score what the demo domain"):
        config({"kind": "parquet", "path": "x", "caption": "c"}, metrics=["prompt_adherence"])
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "metadata.jsonl").write_text('{"file_name": "0.png", "caption": "a"}\n')
    for reference, message in [
        ({"kind": "parquet", "path": str(tmp_path / "none.parquet")}, "none.parquet: no such parquet file"),
        ({"kind": "folder", "path": str(tmp_path)}, "metadata.jsonl does not exist (eval.reference.path"),
        ({"kind": "folder", "path": str(tmp_path / "meta"), "caption": "long"},
         "no column 'long' (eval.reference.caption); columns: caption, file_name"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(message)) as e:
            ReferenceSet(ReferenceConfig.model_validate({"caption": "caption", **reference}), 16)
        assert "\n" not in str(e.value) and "eval.reference." in str(e.value)


def test_fid_prx_real_images_are_torch_resized_when_the_arm_reads_a_cache_too(tmp_path, prx_weights):
    """Held-out protocol on a parquet set of 24 px images trained at 16 px: an arm reading the latent cache
    scores fid_prx on the same real images, resized with torch as PRX's eval set, as an arm without it
    (the reference features are shared by name across the sweep)."""
    from test_every_factor import dataset_of

    from trainer.data import cache

    ev = {"metrics": ["fid_prx"], "samples": 4, "batch_size": 2, "cache_dir": str(tmp_path / "eval-cache")}
    base = merge(
        TINY, {"data": dataset_of("parquet", tmp_path / "data"), "weights_dir": str(prx_weights), "eval": ev}
    )
    with_cache = TrainConfig.model_validate(merge(base, {"cache": {"dir": str(tmp_path / "latents")}}))
    cache.precompute(
        with_cache.encoded(), tmp_path / "latents", shard_size=8, batch_size=8, device="cpu", log=print
    )
    refs = []
    for name, cfg in (("plain", TrainConfig.model_validate(base)), ("cached", with_cache)):
        (tmp_path / name).mkdir()
        refs.append(
            Trainer(
                cfg, tmp_path / name, Dist(0, 1, 0, torch.device("cpu"))
            ).evaluation.generation.evaluator.reference
        )
    plain, cached = (torch.cat(list(r.images_for("torch")())) for r in refs)
    pil = torch.cat([torch.from_numpy(b) for b in refs[0].images_for("pil")()]).permute(0, 3, 1, 2) / 255
    assert refs[0].dataset == refs[1].dataset and plain.shape == (4, 3, 16, 16)
    assert torch.equal(cached, plain) and not torch.allclose(plain, pil, atol=1 / 255)  # torch's, not PIL's
