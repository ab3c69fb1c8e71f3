"""`fid_prx`: PRX's own FID, torchmetrics' `FrechetInceptionDistance(normalize=True)` fed uint8 images.

The network and its weights (torch-fidelity's Inception) are checked against torchmetrics through the
trainer in tests/trainer/test_eval_reference.py; here: the uint8 wrap, the Fréchet value against
torchmetrics' own on a tiny feature module, and the missing-weights error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from eval_testing import TinyFeature

from core.weights import MissingWeightsError
from eval.evaluator import Evaluator, Reference, score
from eval.extractors import PRX_INCEPTION_WEIGHTS, InceptionPRXExtractor, load_extractor, prx_wrap


def reference_wrap(images: np.ndarray) -> np.ndarray:
    """x·255 in 8-bit arithmetic, i.e. modulo 256: (256 − x) mod 256."""
    return ((256 - images.astype(np.int64)) % 256).astype(np.uint8)


def test_the_wrap_is_torchmetrics_uint8_arithmetic():
    x = torch.tensor([0, 1, 2, 3, 64, 127, 128, 129, 200, 254, 255], dtype=torch.uint8)
    wrapped = prx_wrap(x)
    assert wrapped.dtype == torch.uint8
    assert wrapped.tolist() == [0, 255, 254, 253, 192, 129, 128, 127, 56, 2, 1]
    assert torch.equal(wrapped, (x * 255).byte())  # torchmetrics' update(): `(imgs * 255).byte()`
    np.testing.assert_array_equal(wrapped.numpy(), reference_wrap(x.numpy()))


def images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 1, 1, 3))
    return np.clip(base + rng.normal(0, 40, (n, 20, 20, 3)), 0, 255).astype(np.uint8)  # (n, 20, 20, 3)


def test_fid_prx_is_torchmetrics_fid_on_the_wrapped_images(tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    net = TinyFeature()
    ext = InceptionPRXExtractor(net)
    real, gen = images(24, seed=0), images(20, seed=1)
    ref = Reference("toy-real", 24, lambda: real, tmp_path)
    ours = score(gen, ref, ["fid_prx"], extractors={"inception-prx": ext}, batch_size=7)["fid_prx"]

    def nchw(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).permute(0, 3, 1, 2)

    # a custom feature module skips torchmetrics' byte conversion: hand it the wrapped images
    fid = FrechetInceptionDistance(feature=net, normalize=True)
    fid.update(nchw(reference_wrap(real)), real=True)
    fid.update(nchw(reference_wrap(gen)), real=False)
    assert ours == pytest.approx(float(fid.compute()), rel=1e-5)

    # the wrap is applied: the same network on the unwrapped images scores otherwise
    plain = FrechetInceptionDistance(feature=net, normalize=True)
    plain.update(nchw(real), real=True)
    plain.update(nchw(gen), real=False)
    assert abs(float(plain.compute()) - ours) > 0.05 * ours

    same = Evaluator(["fid_prx"], ref, extractors={"inception-prx": ext})(real)["fid_prx"]
    assert abs(same) < 1e-6 * ours  # identical sets


def test_fid_prx_weights_are_torchmetrics_and_a_missing_file_names_the_command(tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert PRX_INCEPTION_WEIGHTS.url == URL_INCEPTION_V3
    assert PRX_INCEPTION_WEIGHTS.filename == URL_INCEPTION_V3.rsplit("/", 1)[1]
    with pytest.raises(MissingWeightsError) as e:
        load_extractor("inception-prx", tmp_path / "weights")
    line = str(e.value)
    assert "\n" not in line and "weights-inception-2015-12-05-6726825d.pth" in line
    assert f"ablate weights download SWEEP --dir {tmp_path / 'weights'}" in line


def test_fid_prx_truncates_float_images_where_the_other_metrics_round(tmp_path):
    """PRX's eval callback makes uint8 with `torch.clamp(x * 255, 0, 255).to(torch.uint8)`, which truncates;
    the other metrics quantise as a PNG is written (round). By hand: 255·x = 10.6, 254.7, 127.5, −3, 300
    → truncated 10, 254, 127, 0, 255; rounded 11, 255, 128, 0, 255."""
    from eval.images import to_uint8_nhwc

    scaled = torch.tensor([10.6, 254.7, 127.5, -3.0, 300.0], dtype=torch.float64)
    x = (
        (scaled / 255).float().view(1, 1, 1, 5).expand(2, 3, 6, 5).contiguous()
    )  # (2, 3, 6, 5) float in ~[0, 1]
    floor = np.array([10, 254, 127, 0, 255], np.uint8)
    assert torch.equal(
        torch.clamp(x * 255.0, 0, 255).to(torch.uint8)[0, 0, 0], torch.from_numpy(floor)
    )  # PRX's
    assert (to_uint8_nhwc(x, "floor")[0, 0, :, 0] == floor).all()
    assert (to_uint8_nhwc(x)[0, 0, :, 0] == [11, 255, 128, 0, 255]).all()  # round: what a PNG holds
    assert (to_uint8_nhwc(x.numpy(), "floor") == to_uint8_nhwc(x, "floor")).all()  # numpy alike

    # through the evaluator: fid_prx's extractor sees the truncated images, the others the rounded ones
    ext = InceptionPRXExtractor(TinyFeature())
    # its real images come from the reference's torch-resized set when it has one (the trainer's)
    pil = np.zeros((2, 6, 5, 3), np.uint8)
    ref = Reference("r", 2, lambda: pil, tmp_path, torch_images=lambda: iter([x[:1], x[1:]]))
    ev = Evaluator(["fid_prx"], ref, extractors={"inception-prx": ext})
    feats = ev.reference_features()["inception-prx"].feats
    np.testing.assert_array_equal(feats, ext.features(to_uint8_nhwc(x, "floor")))
    got = ev.features(x)["inception-prx"]
    np.testing.assert_array_equal(got, ext.features(to_uint8_nhwc(x, "floor")))
    assert not np.allclose(got, ext.features(to_uint8_nhwc(x)))
    np.testing.assert_array_equal(
        ev.features(to_uint8_nhwc(x))["inception-prx"], ext.features(to_uint8_nhwc(x))
    )
