"""The latent / caption-embedding cache: keys, layout, and training from it equals training without it."""

import json
import os

import pytest
import torch
import yaml
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from trainer_testing import logged_losses as losses
from trainer_testing import merge, metrics_by_step

from core.weights import install
from trainer import job
from trainer.config import TrainConfig, load
from trainer.data import cache
from trainer.factors.tokenizer import FluxVAEConfig
from trainer.runtime import checkpoint

SMALL = {"data": {"num_train": 64, "num_val": 8}, "eval": {"batch_size": 4}}


@pytest.fixture
def config(tiny_cfg):
    """TrainConfig of the tiny preset (conftest's TINY) at a smaller dataset, with overrides."""
    return lambda **over: TrainConfig.model_validate(merge(merge(tiny_cfg, SMALL), over))


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def final_weights(run_dir) -> dict:
    return load_file(checkpoint.latest(run_dir) / "transformer" / "diffusion_pytorch_model.safetensors")


def test_the_key_covers_only_what_produces_the_cache(config):
    base = config()
    same = [
        config(optimizer={"kind": "muon"}),
        config(precision={"kind": "bf16"}),
        config(seed=3),
        config(train={"steps": 99, "batch_size": 8}),
        config(eval={"caption": None}),  # None = training column
        config(cache={"dir": "/elsewhere"}),
    ]
    assert {cache.cache_key(c.encoded()) for c in same} == {cache.cache_key(base.encoded())}
    differ = [
        config(data={"caption": "short"}),
        config(eval={"caption": "short"}),
        config(data={"num_train": 65}),
        config(text_encoder={"seed": 1}),
        config(text_encoder={"max_length": 16}),
        config(text_encoder={"clean": "prx"}),  # the cache holds the cleaned captions' embeddings
        config(tokenizer={"kind": "flux-vae"}),
        config(tokenizer={"kind": "flux-vae", "posterior": "mean"}),
    ]
    keys = [cache.cache_key(c.encoded()) for c in differ]
    assert len(set(keys)) == len(keys) and cache.cache_key(base.encoded()) not in keys


def test_layout_shards_and_resume(config, tmp_path):
    cfg = config()
    enc = cfg.encoded()
    root = cache.precompute(enc, tmp_path, shard_size=24, batch_size=10, device="cpu", log=lambda *_: None)
    assert root == tmp_path / cache.cache_key(enc)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["hash"] == cache.cache_key(enc) and manifest["source"]["captions"] == {
        "train": "long",
        "val": "long",
    }
    assert manifest["splits"]["train"]["shards"] == [
        "train-00000.safetensors",
        "train-00001.safetensors",
        "train-00002.safetensors",
    ]  # 24 + 24 + 16
    assert manifest["latent"] is None and manifest["text"]["length"] == 32  # pixels: nothing to cache
    shard = load_file(root / "train-00002.safetensors")
    assert set(shard) == {"text", "mask"}  # the caption embeddings only: x = 2·image − 1 costs nothing
    assert {f.stat().st_mode & 0o777 for f in root.iterdir()} == {0o666 & ~umask()}  # teammates read it
    assert shard["text"].shape == (int(shard["mask"].sum()), 32)  # only unpadded tokens are stored

    # an item equals encoding it live, padded positions read back as zeros
    train, _ = cache.DATA.build(cfg.data)
    split = cache.CachedSplit(train, root, manifest["splits"]["train"], 32)
    live = cache.build_inputs(enc, None, torch.device("cpu"))[0]
    item = split[50]
    emb, mask = live.text([item["caption"]])
    assert torch.equal(item["mask"], mask[0]) and torch.equal(item["text"][mask[0]], emb[0][mask[0]])
    assert not item["text"][~mask[0]].any()
    assert "latent_mean" not in item  # the trainer computes pixels' latents from the image

    # interrupted: the manifest and one shard are gone → only that shard is recomputed
    kept = (root / "train-00000.safetensors").stat().st_mtime_ns
    (root / "manifest.json").unlink()
    (root / "train-00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete .*`python -m trainer.data.cache precompute"):
        cache.open_cache(enc, tmp_path)
    cache.precompute(enc, tmp_path, shard_size=24, batch_size=10, device="cpu", log=lambda *_: None)
    assert (root / "train-00000.safetensors").stat().st_mtime_ns == kept
    assert torch.equal(
        load_file(root / "train-00001.safetensors")["text"],
        cache._encode_text(live.text, [train[i]["caption"] for i in range(24, 48)])[0],
    )


def test_training_from_the_cache_is_bit_identical_with_pixels(make_run, tmp_path):
    over = merge(SMALL, {"train": {"steps": 6}})
    live = make_run("live", **over)
    cached = make_run("cached", **merge(over, {"cache": {"dir": str(tmp_path / "cache")}}))
    # --out defaults to cache.dir. Encoding in batches of the training batch size keeps GPU matmuls (whose
    # rounding can depend on the batch size) identical to the live run's, so the check is exact on GPUs too.
    cache.main(["precompute", str(cached / "config.yaml"), "--workers", "0", "--batch-size", "4"])
    job.run(live), job.run(cached)
    assert losses(live) == losses(cached)
    assert metrics_by_step(live) == metrics_by_step(cached)
    wa, wb = final_weights(live), final_weights(cached)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_vae_cache_keeps_the_posterior_and_matches_live_training(make_run, tmp_path, monkeypatch):
    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=16,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    vae.save_pretrained(tmp_path / "src")
    weights = tmp_path / "weights"
    install(FluxVAEConfig.MODEL, tmp_path / "src", weights)
    over = merge(
        SMALL,
        {
            "train": {"steps": 6},
            "data": {"resolution": 32},
            "tokenizer": {"kind": "flux-vae", "dtype": "float32"},
        },
    )
    cached = make_run("cached", **merge(over, {"cache": {"dir": str(tmp_path / "cache")}}))
    root = cache.precompute(
        load(cached / "config.yaml").encoded(),
        tmp_path / "cache",
        weights_dir=str(weights),
        log=lambda *_: None,
    )
    shard = load_file(root / "train-00000.safetensors")
    assert (
        shard["latent_mean"].shape == shard["latent_std"].shape == (64, 16, 4, 4)
    )  # mean and std, no sample

    # the cached run never loads the VAE: no weights folder is given to it
    job.run(cached)
    live = make_run("live", **merge(over, {"weights_dir": str(weights)}))
    job.run(live)
    # same draws (z = mean + std·ε from the step generator); only the VAE's batch-size rounding differs
    assert losses(cached) == pytest.approx(losses(live), rel=1e-4)
    for step, m in metrics_by_step(live).items():
        assert metrics_by_step(cached)[step]["val_loss"] == pytest.approx(m["val_loss"], rel=1e-4)


def test_a_cache_of_another_config_is_refused_naming_both_hashes(config, tmp_path):
    cfg = config(cache={"dir": str(tmp_path)})
    enc = cfg.encoded()
    with pytest.raises(FileNotFoundError, match=f"key {cache.cache_key(enc)}.* is missing; fill it with"):
        cache.build_inputs(enc, cfg.cache, torch.device("cpu"))
    other = config(data={"caption": "short"}).encoded()
    made = cache.precompute(other, tmp_path, log=lambda *_: None)
    made.rename(cache.cache_path(enc, tmp_path))  # e.g. a folder copied under the wrong name
    with pytest.raises(
        ValueError,
        match=f"manifest hash {cache.cache_key(other)} does not match this config's "
        f"cache key {cache.cache_key(enc)}",
    ):
        cache.build_inputs(enc, cfg.cache, torch.device("cpu"))


def test_cli_needs_a_cache_folder(tiny_cfg, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(merge(tiny_cfg, SMALL)))
    with pytest.raises(SystemExit, match="has no cache.dir; pass --out DIR"):
        cache.main(["precompute", str(path)])
