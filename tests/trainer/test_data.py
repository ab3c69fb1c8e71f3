import torch

from trainer.data.sampling import StepBatchSampler
from trainer.data.synthetic import ATTRIBUTES, SyntheticConfig, build_synthetic, long_caption


def test_synthetic_domain_is_deterministic_and_captions_differ_in_detail():
    cfg = SyntheticConfig(resolution=16, num_train=64, num_val=8)
    a, _ = build_synthetic(cfg)
    b, _ = build_synthetic(cfg.model_copy(update={"caption": "short"}))
    x, y = a[5], b[5]
    assert torch.equal(x["image"], y["image"]) and x["image"].shape == (3, 16, 16)
    assert 0 <= x["image"].min() and x["image"].max() <= 1
    attrs = {k: int(v) for k, v in zip(ATTRIBUTES, x["attrs"], strict=True)}
    assert x["caption"] == long_caption(attrs)
    for name, values in ATTRIBUTES.items():  # the long caption names every attribute
        assert values[attrs[name]] in x["caption"]
    assert y["caption"] == f"a {ATTRIBUTES['shape'][attrs['shape']]}"
    assert len(y["caption"]) < len(x["caption"])


def test_validation_images_are_held_out():
    train, val = build_synthetic(SyntheticConfig(resolution=8, num_train=32, num_val=4))
    assert len(train) == 32 and len(val) == 4
    assert val.offset == 32  # indices disjoint from training


def test_ranks_split_the_global_batch_and_resume_reads_the_same_batches():
    full = list(StepBatchSampler(10, 4, seed=3, start_step=0, total_steps=6))
    r0 = list(StepBatchSampler(10, 4, seed=3, start_step=0, total_steps=6, rank=0, world=2))
    r1 = list(StepBatchSampler(10, 4, seed=3, start_step=0, total_steps=6, rank=1, world=2))
    assert [a + b for a, b in zip(r0, r1, strict=True)] == full
    assert list(StepBatchSampler(10, 4, seed=3, start_step=4, total_steps=6)) == full[4:]
    # each epoch is a permutation: the first 10 positions cover every index once
    flat = [i for batch in full for i in batch]
    assert sorted(flat[:10]) == list(range(10))
