"""The reference-feature cache and the trainer-facing `score` / `Evaluator` API."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from core.weights import MissingWeightsError
from eval.distances import frechet_distance, mmd
from eval.evaluator import Evaluator, Reference, extractors_for, score
from eval.images import make_grid, read_image_folder, save_grid
from eval.reference_cache import CacheKey, ReferenceCache

# ------------------------------------------------------------------------------------------------ cache


def test_cache_computes_once_and_names_the_key(tmp_path, rng):
    cache = ReferenceCache(tmp_path)
    key = CacheKey("unsplash-eval@v1", "inception", "inception-2015-12-05/clean", 40)
    calls = []

    def compute():
        calls.append(1)
        return rng.standard_normal((40, 8)).astype(np.float32)

    first = cache.get_or_compute(key, compute)
    second = cache.get_or_compute(key, compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.feats, second.feats)
    np.testing.assert_allclose(second.stats.sigma, np.cov(first.feats.astype(np.float64), rowvar=False))
    path = cache.path(key)
    assert path.name.startswith("unsplash-eval-v1__inception__n40__") and path.suffix == ".npz"
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["dataset"] == "unsplash-eval@v1" and sidecar["version"] == key.version
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temp files behind
    # any field of the key changes the entry
    other = CacheKey("unsplash-eval@v1", "inception", "inception-2015-12-05/clean", 41)
    assert cache.path(other) != path and cache.load(other) is None


def test_cache_rejects_a_wrong_sample_count(tmp_path):
    key = CacheKey("d", "x", "v", 10)
    with pytest.raises(ValueError, match="expected \\(10, D\\)"):
        ReferenceCache(tmp_path).save(key, np.zeros((9, 4), np.float32))


# ---------------------------------------------------------------------------------------------- evaluate


def _real_images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(40, 200, 24)[None, :, None, None] + rng.normal(0, 25, (n, 24, 1, 1))
    return np.clip(base + rng.normal(0, 10, (n, 24, 24, 3)), 0, 255).astype(np.uint8)  # (n, 24, 24, 3)


class _CountingSource:
    def __init__(self, images):
        self.images, self.calls = images, 0

    def __call__(self):
        self.calls += 1
        return self.images


@pytest.fixture
def extractors(inception, clip, dino):
    return {"inception": inception, "clip-vit-l14-336": clip, "dinov2-vitl14-reg": dino}


def test_evaluate_returns_each_metric_as_its_definition(extractors, tmp_path):
    real, gen = _real_images(12, seed=0), _real_images(10, seed=1)
    ref = Reference("toy-real", 12, _CountingSource(real), tmp_path)
    out = score(gen, ref, ["fid", "cmmd", "dino_mmd"], extractors=extractors, batch_size=4)
    assert set(out) == {"fid", "cmmd", "dino_mmd"} and all(isinstance(v, float) for v in out.values())
    f = {n: e.features(real) for n, e in extractors.items()}
    g = {n: e.features(gen) for n, e in extractors.items()}
    assert out["fid"] == pytest.approx(frechet_distance(g["inception"], f["inception"]), rel=1e-6)
    assert out["cmmd"] == pytest.approx(mmd(g["clip-vit-l14-336"], f["clip-vit-l14-336"]), rel=1e-6)
    assert out["dino_mmd"] == pytest.approx(mmd(g["dinov2-vitl14-reg"], f["dinov2-vitl14-reg"]), rel=1e-6)


def test_reference_pass_is_shared_and_cached_across_evaluators(extractors, tmp_path):
    source = _CountingSource(_real_images(16))
    ref = Reference("toy-real", 12, source, tmp_path)  # the source has 16; the first 12 are used
    gen = _real_images(6, seed=2)
    first = Evaluator(["cmmd", "dino_mmd"], ref, extractors=extractors, batch_size=5)(gen)
    assert source.calls == 1  # one pass over the real images for both extractors
    assert len(list(tmp_path.glob("*.npz"))) == 2
    second = Evaluator(["cmmd", "dino_mmd"], ref, extractors=extractors, batch_size=5)(gen)
    assert source.calls == 1 and second == first
    Evaluator(["fid"], ref, extractors=extractors)(gen)
    assert source.calls == 2  # a new extractor needs the real images once more


def test_reference_with_too_few_images_is_an_error(extractors, tmp_path):
    ref = Reference("toy-real", 20, lambda: _real_images(8), tmp_path)
    with pytest.raises(ValueError, match="expected 20 images"):
        Evaluator(["fid"], ref, extractors=extractors)(_real_images(4))


def test_image_forms_give_the_same_metrics(extractors, tmp_path):
    """uint8 NHWC, float NCHW in [0, 1], a list of batches and a PNG folder are the same images."""
    ref = Reference("toy-real", 10, lambda: _real_images(10), tmp_path / "cache")
    ev = Evaluator(["cmmd", "dino_mmd"], ref, extractors=extractors, batch_size=4)
    gen = _real_images(7, seed=3)
    expected = ev(gen)
    as_float = torch.from_numpy(gen).permute(0, 3, 1, 2).float() / 255.0
    assert ev(as_float) == pytest.approx(expected, rel=1e-6)
    assert ev([gen[:3], gen[3:]]) == pytest.approx(expected, rel=1e-6)
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, im in enumerate(gen):
        Image.fromarray(im).save(folder / f"{i:04d}.png")
    assert ev(read_image_folder(folder, batch_size=2)) == pytest.approx(expected, rel=1e-6)


def test_features_then_compute_equals_call(extractors, tmp_path):
    """The multi-process path: features per shard, gathered, then one compute."""
    ref = Reference("toy-real", 10, lambda: _real_images(10), tmp_path)
    ev = Evaluator(["cmmd", "dino_mmd"], ref, extractors=extractors)
    gen = _real_images(8, seed=4)
    shards = [ev.features(gen[:5]), ev.features(gen[5:])]
    gathered = {n: np.concatenate([s[n] for s in shards]) for n in shards[0]}
    assert ev.compute(gathered) == pytest.approx(ev(gen), rel=1e-6)


def test_metric_and_reference_errors(extractors, tmp_path):
    with pytest.raises(
        ValueError,
        match=r"unknown metric 'kid' \(did you mean 'fid'\?\); the generation metrics are fid, fid_prx, cmmd",
    ):
        Evaluator(["kid"], None, extractors=extractors)
    with pytest.raises(ValueError, match="pass reference="):
        Evaluator(["fid"], None, extractors=extractors)
    with pytest.raises(MissingWeightsError, match="ablate weights download SWEEP --dir"):
        Evaluator(["cmmd"], Reference("r", 1, lambda: None, tmp_path), weights_dir=tmp_path / "weights")
    assert extractors_for(["fid", "domain_fd", "domain_mmd", "prompt_adherence"]) == [
        "inception",
        "domain-attr",
    ]


def test_domain_metrics_through_evaluate(tmp_path):
    from render_shapes import NUM_CLASSES, dataset

    from eval.domain import DomainAttrExtractor, train_attribute_net

    images, labels = dataset(300, seed=0)
    ext = DomainAttrExtractor(train_attribute_net(images, labels, NUM_CLASSES, seed=0, epochs=2))
    real, _ = dataset(50, seed=10)
    ref = Reference("shapes-test", 50, lambda: real, tmp_path)
    gen, gen_labels = dataset(40, seed=11)
    requested = {**gen_labels, "background": np.full(40, -1)}  # prompts that do not name the background
    out = score(gen, ref, ["domain_fd", "domain_mmd", "prompt_adherence"],
                   extractors={"domain-attr": ext}, requested=requested)  # fmt: skip
    feats = ext.features(gen)
    assert out["domain_fd"] == pytest.approx(frechet_distance(feats, ext.features(real)), rel=1e-6)
    predicted = ext.predict(gen)
    asked = [(predicted[a] == gen_labels[a]) for a in NUM_CLASSES if a != "background"]
    assert out["prompt_adherence"] == pytest.approx(np.concatenate(asked).mean())
    with pytest.raises(ValueError, match="needs the requested attributes"):
        score(gen, None, ["prompt_adherence"], extractors={"domain-attr": ext})


# ------------------------------------------------------------------------------------------------- grid


def test_save_grid_layout(tmp_path, rng):
    images = rng.integers(0, 256, (5, 8, 6, 3), dtype=np.uint8)
    path = save_grid(images, tmp_path / "grids" / "step_100.png", nrow=3, pad=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 + 2 * (8 + 2), 2 + 3 * (6 + 2), 3)
    np.testing.assert_array_equal(grid[2:10, 2:8], images[0])
    np.testing.assert_array_equal(grid[12:20, 10:16], images[4])  # row 1, column 1
    assert (grid[12:20, 18:24] == 255).all()  # the empty sixth cell is padding colour
    as_float = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    np.testing.assert_array_equal(make_grid(as_float, nrow=3), grid)
