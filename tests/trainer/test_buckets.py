"""Aspect-ratio buckets (`data.buckets: prx`, PRX's prx/dataset/transforms.py `ArAwareResize`): PRX's bucket
lists, the bucket an image goes to, its resize into it, one bucket per global batch at any process count,
and the combinations refused. Training and resuming bitwise with buckets: tests/trainer/test_every_factor.py
(case data.buckets=prx)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from trainer_testing import TINY, merge

from trainer.config import TrainConfig
from trainer.data.cache import cache_key
from trainer.data.datasets import DATA, DataError
from trainer.data.sampling import (
    BucketBatchSampler,
    StepBatchSampler,
    bucket_sizes,
    nearest_bucket,
    train_sampler,
)

# PRX's 256-px list (patch_size_pixels 32), worked by hand: n = 8 cells a side, widths of 6..11 cells with
# the tallest height floor(64 / w) and the converse; (H, W) in ascending aspect W/H.
PRX_256 = [(352, 160), (320, 192), (288, 224), (256, 256), (224, 288), (192, 320), (160, 352)]


def test_prx_bucket_lists_at_256_and_1024_px():
    assert bucket_sizes(256, 32) == PRX_256
    at_1024 = bucket_sizes(1024, 32)
    assert len(at_1024) == 27  # PRX's README and scripts/fine-t2i-to-mds.py: "27 buckets"
    assert at_1024[0] == (1440, 704) and at_1024[13] == (1024, 1024) and at_1024[-1] == (704, 1440)
    # the extremes fall a little outside [0.5, 2] (PRX floors the other side: 22 × 45 cells is 0.489)
    assert all(h % 32 == 0 and w % 32 == 0 and h * w <= 1024**2 and 0.48 < w / h < 2.05 for h, w in at_1024)


def test_an_image_goes_to_the_bucket_of_the_nearest_aspect_ratio():
    # 300×200 (W×H) is 1.5 wide: 320/192 = 1.667 is 0.167 off, 288/224 = 1.286 is 0.214 off
    assert PRX_256[nearest_bucket(300, 200, PRX_256)] == (192, 320)
    assert PRX_256[nearest_bucket(200, 300, PRX_256)] == (320, 192)  # 0.667: 0.6 is 0.067 off, 0.778 0.111
    assert PRX_256[nearest_bucket(1000, 1000, PRX_256)] == (256, 256)
    assert PRX_256[nearest_bucket(1000, 100, PRX_256)] == (160, 352)  # beyond the widest: the widest
    # a tie (aspect 1.5 between buckets 1.0 and 2.0): the narrower
    assert nearest_bucket(3, 2, [(2, 2), (1, 2)]) == 0


def folder(root, sizes: list[tuple[int, int]]) -> dict:
    """A folder dataset of plain images of the given (W, H) sizes, a caption each."""
    root.mkdir()
    rows = []
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (40 * i % 255, 90, 200)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "caption": f"image {i}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"kind": "folder", "path": str(root), "caption": "caption", "resolution": 256, "num_val": 2}


def test_training_images_are_resized_into_their_bucket_and_held_out_ones_stay_square(tmp_path):
    cfg = DATA.config_type("folder").model_validate(
        {
            **folder(tmp_path / "d", [(300, 200), (200, 300), (256, 256), (301, 200), (300, 200)]),
            "buckets": "prx",
        }
    )
    train, val = DATA.build(cfg)
    assert list(train.bucket_index()) == [5, 1, 3]  # (192, 320), (320, 192), (256, 256) in PRX_256
    assert [tuple(train[i]["image"].shape) for i in range(3)] == [(3, 192, 320), (3, 320, 192), (3, 256, 256)]
    # the held-out rows (val_loss, evaluation): centre-cropped squares as without buckets
    assert [tuple(val[i]["image"].shape) for i in range(2)] == [(3, 256, 256)] * 2


def sampler(buckets, world=1, rank=0, start=0, batch=4, seed=7):
    return BucketBatchSampler(buckets, batch, seed, start, 12, rank, world)


BUCKETS = np.random.default_rng(0).integers(0, 3, size=40)  # 40 items in 3 buckets


def test_every_global_batch_holds_one_bucket_and_each_epoch_each_item_at_most_once():
    s = sampler(BUCKETS)
    batches = [s.global_batch(step) for step in range(s.per_epoch)]
    assert all(len(set(BUCKETS[b])) == 1 for b in batches)
    assert len({i for b in batches for i in b}) == 4 * s.per_epoch  # no item twice in an epoch
    assert {int(BUCKETS[b[0]]) for b in batches} == {0, 1, 2}
    assert s.global_batch(s.per_epoch) != batches[0]  # the next epoch is drawn afresh


def test_two_processes_read_together_the_global_batches_of_one_and_a_resumed_run_the_same():
    one = list(sampler(BUCKETS))
    halves = zip(sampler(BUCKETS, world=2, rank=0), sampler(BUCKETS, world=2, rank=1), strict=True)
    assert [a + b for a, b in halves] == one
    assert list(sampler(BUCKETS, start=5)) == one[5:]  # a function of (seed, step): resumes exactly
    assert list(sampler(BUCKETS, seed=8)) != one


def test_the_square_data_keeps_the_plain_sampler_and_a_batch_no_bucket_fills_is_refused(tmp_path):
    cfg = DATA.config_type("folder").model_validate(folder(tmp_path / "d", [(300, 200)] * 6))
    train, _ = DATA.build(cfg)
    assert type(train_sampler(train, cfg, 2, 0, 0, 3)) is StepBatchSampler
    with pytest.raises(DataError, match=r"no aspect-ratio bucket holds train.batch_size=4 .*fullest holds 2"):
        sampler(np.array([0, 0, 1, 1, 2]))


def arm(**over) -> dict:
    data = {"kind": "parquet", "path": "x.parquet", "caption": "c", "resolution": 16, "num_val": 1}
    return merge(merge(TINY, {"data": data}), over)


def test_buckets_with_a_cache_of_latents_are_refused_and_a_caption_cache_is_shared():
    buckets = {"data": {"buckets": "prx", "bucket_px": 4}}
    vae = {"tokenizer": {"kind": "flux-vae"}, "data": {"resolution": 32}, "cache": {"dir": "/c"}}
    with pytest.raises(
        ValueError, match="data.buckets: prx with cache: tokenizer 'flux-vae'.s latents are cached"
    ):
        TrainConfig.model_validate(merge(arm(**vae), {"data": {"buckets": "prx", "bucket_px": 8}}))
    pixel = TrainConfig.model_validate(arm(cache={"dir": "/c"}, **buckets))  # pixels: captions only
    square = TrainConfig.model_validate(arm(cache={"dir": "/c"}))
    assert cache_key(pixel.encoded()) == cache_key(square.encoded())  # the cache holds nothing bucketed


def test_bucket_sides_off_the_token_grid_and_a_stray_bucket_px_are_refused():
    with pytest.raises(ValueError, match="bucket_px 3 is not a multiple of the model's 2 px per token"):
        TrainConfig.model_validate(arm(data={"buckets": "prx", "bucket_px": 3, "resolution": 15}))
    with pytest.raises(ValueError, match="bucket_px applies to buckets: prx"):
        TrainConfig.model_validate(arm(data={"bucket_px": 16}))
    with pytest.raises(ValueError, match="gives a single square bucket"):
        TrainConfig.model_validate(arm(data={"buckets": "prx", "bucket_px": 8}))
