"""Fréchet distance against clean-fid, MMD against the formula evaluated directly."""

from __future__ import annotations

import inspect
import types
import warnings

import cleanfid.fid
import numpy as np
import pytest
import scipy.linalg
import torch
from cleanfid.fid import frechet_distance as cleanfid_frechet

from eval.distances import GaussianStats, frechet_distance, mmd


def _inception_like(rng, n: int, d: int, rank: int | None = None, shift: float = 0.0) -> np.ndarray:
    """Non-negative, correlated features (ReLU of a random linear map), optionally of low rank."""
    w = rng.standard_normal((rank or d, d)) / np.sqrt(d)
    z = rng.standard_normal((n, rank or d))
    return np.maximum(0.5 * z @ w + 0.3 + shift, 0.0).astype(np.float32)


@pytest.fixture(autouse=True)
def _cleanfid_on_new_scipy(monkeypatch):
    """clean-fid 0.1.35 calls `linalg.sqrtm(..., disp=False)`, which scipy 1.18 removed (1.16-1.17 warn).
    There, hand clean-fid's module a `linalg` whose sqrtm takes `disp` and answers as the old one did."""
    if "disp" in inspect.signature(scipy.linalg.sqrtm).parameters:
        return
    new_sqrtm = scipy.linalg.sqrtm

    def sqrtm(a, disp=True):
        root = new_sqrtm(a)
        return root if disp else (root, None)

    monkeypatch.setattr(cleanfid.fid, "linalg", types.SimpleNamespace(sqrtm=sqrtm))


def _cleanfid(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy 1.16-1.17 deprecate the sqrtm(disp=...) clean-fid passes
        return cleanfid_frechet(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


@pytest.mark.parametrize(
    "n_a, n_b, d, rank",
    [
        (3000, 3000, 192, None),  # full rank
        (3000, 2000, 192, 48),  # both covariances of rank 48
        (150, 3000, 192, None),  # one set smaller than the dimension: singular covariance
        (100, 150, 192, None),  # both singular
    ],
)
def test_frechet_equals_cleanfid(rng, n_a, n_b, d, rank):
    a = _inception_like(rng, n_a, d, rank)
    b = _inception_like(rng, n_b, d, rank, shift=0.05)
    ours, theirs = frechet_distance(a, b), _cleanfid(a, b)
    assert ours == pytest.approx(theirs, rel=1e-6)


@pytest.mark.parametrize("n_a, n_b", [(500, 400), (40, 400), (400, 30), (20, 30)])
def test_frechet_routes_agree(rng, n_a, n_b):
    """Stats, (mu, sigma) pairs and features (the n×n route when a set has fewer samples than dimensions)."""
    a, b = _inception_like(rng, n_a, 64), _inception_like(rng, n_b, 64, shift=0.1)
    sa, sb = GaussianStats.from_features(a), GaussianStats.from_features(b)
    ref = frechet_distance(sa, sb)  # D×D route
    # with a singular Σ the D×D route also sums √ of its round-off eigenvalues (~1e-8 relative)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-7)
    assert frechet_distance((sa.mu, sa.sigma), b) == pytest.approx(ref, rel=1e-7)
    assert frechet_distance(a, sb) == pytest.approx(ref, rel=1e-7)


def test_gaussian_stats_match_numpy_in_chunks(rng, monkeypatch):
    monkeypatch.setattr("eval.distances._ROWS_PER_CHUNK", 37)  # force several chunks
    x = _inception_like(rng, 500, 16)
    s = GaussianStats.from_features(x)
    np.testing.assert_allclose(s.mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-14)


def test_frechet_properties(rng):
    a, b = _inception_like(rng, 800, 32), _inception_like(rng, 800, 32, shift=0.2)
    assert abs(frechet_distance(a, a)) < 1e-9
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(a, b[:, :16])


def _mmd_direct(x, y, sigma=10.0, scale=1000.0) -> float:
    """The CMMD formula pair by pair: biased estimator, diagonals included."""
    x, y = x.astype(np.float64), y.astype(np.float64)

    def k(a, b):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * sigma**2))

    return scale * (k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())


def _unit(rng, n, d, shift=0.0):
    x = rng.standard_normal((n, d)) + shift
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("block", [None, 64])  # one block; several, with partial edge blocks
def test_mmd_equals_direct_formula(rng, block):
    x, y = _unit(rng, 150, 24), _unit(rng, 110, 24, shift=0.3)
    assert mmd(x, y, block=block) == pytest.approx(_mmd_direct(x, y), rel=1e-9)


def test_mmd_large_norm_features_and_other_sigma(rng):
    # unnormalised features far from the origin: the pooled-mean centring keeps float64 exact
    x = rng.normal(50.0, 3.0, (120, 16))
    y = rng.normal(50.5, 3.0, (90, 16))
    assert mmd(x, y, sigma=4.0, scale=1.0) == pytest.approx(_mmd_direct(x, y, sigma=4.0, scale=1.0), rel=1e-8)


def test_mmd_properties(rng):
    x, y = _unit(rng, 200, 32), _unit(rng, 200, 32, shift=0.2)
    far = _unit(rng, 200, 32, shift=0.6)
    assert abs(mmd(x, x)) < 1e-10
    assert mmd(x, y) == pytest.approx(mmd(y, x), rel=1e-10)
    assert 0 < mmd(x, y) < mmd(x, far)
    assert mmd(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(mmd(x, y), rel=1e-12)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        mmd(x, y[:, :8])


def test_a_grid_of_small_images_is_enlarged_pixel_for_pixel(tmp_path):
    from PIL import Image

    from eval.images import save_grid

    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    path = save_grid(images, tmp_path / "g.png", nrow=2, pad=2, min_tile=96)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 + 2 * (96 + 2), 2 + 2 * (96 + 2), 3)  # 16 px tiles shown at 96 px
    assert np.array_equal(grid[2 : 2 + 96 : 6, 2 : 2 + 96 : 6], images[0])  # every sample pixel kept as is
