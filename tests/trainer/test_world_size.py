"""An arm's losses do not depend on how many processes trained it (docs/architecture.md's contract).

Each factor of the two study sweeps (sweeps/prx.yaml, sweeps/prx-pixel-1024.yaml), at tiny size,
trains 3 steps in one process and in two (gloo, forked; tests/trainer/trainer_testing.py's harness),
and the two must log the same loss at every step. Every per-sample draw (t, caption dropout, noise,
the posterior sample, routed tokens) is keyed by (seed, step, global sample index) and contrastive
negatives by global groups, so what is left is floating point: the order of the gradient all-reduce
and of the loss mean over the processes, ~1e-7 relative per step (measured: at most 2.1e-7 here).
The tolerance is 1e-5, room for three steps of that, while any one draw keyed by rank moves the loss
by 4e-4 to 0.5 (measured for each case with its draws, its routed tokens or its negatives keyed per
rank: every case fails). Three cases round harder: Muon orthogonalises its updates in bf16 (measured
1.6e-5; bound 1e-4), a bf16 REPA projector's gradients are summed in bf16 (2.6e-5; bound 1e-4) and
bf16 weights round every update to 8 bits of mantissa (9e-4; bound 3e-3).
"""

from __future__ import annotations

import pytest
import yaml
from trainer_testing import TINY, logged_losses, merge, metrics_by_step, run_processes

from trainer import job

# caption dropout 0.5: some captions drop at every step; lr 1e-2 from step 0 and the class's own init
# (a random final layer): every block's gates move at the first update, so from step 2 on the loss
# reads what the routed blocks did with the tokens they were given.
COMMON = {
    "model": {"init": "diffusers"},
    "optimizer": {"kind": "adamw", "lr": 1e-2},
    "train": {"steps": 3, "batch_size": 4, "warmup_steps": 0, "caption_dropout": 0.5},
    "log": {"every": 1, "wandb": {"mode": "disabled"}},
    "checkpoint": {"every": 3},
    "eval": {"every": 3},
}
TEACHER = {"kind": "tiny", "width": 16, "layers": 1, "heads": 2, "patch_size": 2}
PIXEL = {"flow": {"prediction": "x", "shift": 3.0}}  # the pixel sweep's baseline: JiT's x-prediction
ROUTE = {"start": 1, "end": 3}  # blocks 1..2 of the tiny model's 4
CASES = {  # name → (overrides of TINY + COMMON, relative tolerance)
    # sweeps/prx.yaml (256-px latents; here pixels at 16 px: the factors act the same)
    "baseline": ({}, 1e-5),
    "short-captions": ({"data": {"caption": "short"}}, 1e-5),
    "tread": ({"routing": {"kind": "tread", **ROUTE}}, 1e-5),
    "sprint": ({"routing": {"kind": "sprint", **ROUTE}}, 1e-5),
    "repa": ({"repa": {"kind": "repa", "block": 1, "teacher": TEACHER}}, 1e-5),
    "repa-in-tread": (
        {"routing": {"kind": "tread", **ROUTE}, "repa": {"kind": "repa", "block": 1, "teacher": TEACHER}},
        1e-5,
    ),  # fmt: skip
    "irepa-prx": (
        {
            "repa": {
                "kind": "irepa",
                "block": 1,
                "teacher": TEACHER,
                "projector": "attention",
                "target_norm": "per-token-mean",
            }
        },
        1e-5,
    ),  # fmt: skip
    "irepa-paper": ({"repa": {"kind": "irepa", "block": 1, "teacher": TEACHER}}, 1e-5),
    "repa-bf16-projector": (
        {"repa": {"kind": "repa", "block": 1, "teacher": TEACHER, "projector_dtype": "bf16"}},
        1e-4,
    ),  # fmt: skip
    "contrastive": ({"contrastive": {"kind": "contrastive", "group": 2}}, 1e-5),
    "muon": ({"optimizer": {"kind": "muon", "lr": 1e-2, "adam_lr": 1e-2}}, 1e-4),
    "bf16-weights": ({"precision": {"kind": "bf16", "flow_dtype": "bf16"}}, 3e-3),
    "ema": ({"ema": {"kind": "ema", "decay": 0.9}}, 1e-5),
    # a Gaussian autoencoder (the study's Flux VAE, tiny): its posterior sample is a per-sample draw too
    "flux-vae": ({"tokenizer": {"kind": "flux-vae", "dtype": "float32"}, "data": {"resolution": 32}}, 1e-5),
    "fsdp": ({"parallel": {"kind": "fsdp"}}, 1e-5),  # sharded over two, whole in one
    # the perceptual terms average over each process's rows, the rows at or above t_threshold as zeros
    "lpips-flux-vae": (
        {
            "tokenizer": {"kind": "flux-vae", "dtype": "float32"},
            "data": {"resolution": 32},
            "lpips": {"kind": "lpips", "backbone": "random", "t_threshold": 0.5},
        },
        1e-5,
    ),  # fmt: skip
    "perceptual-dino": ({"perceptual_dino": {"kind": "p-dino", "encoder": TEACHER, "resolution": 8}}, 1e-5),
    "resolution-aware": ({"resolution_aware": {"kind": "token"}}, 1e-5),
    # sweeps/prx-pixel-1024.yaml: its baseline and each of its deltas on it
    "pixel-x": (PIXEL, 1e-5),
    "pixel-v": ({"flow": {"prediction": "v", "shift": 3.0}}, 1e-5),
    "pixel-tread": ({**PIXEL, "routing": {"kind": "tread", **ROUTE}}, 1e-5),
    "pixel-sprint": ({**PIXEL, "routing": {"kind": "sprint", **ROUTE}}, 1e-5),
    "pixel-contrastive": ({**PIXEL, "contrastive": {"kind": "contrastive", "group": 2}}, 1e-5),
    "pixel-lpips": ({**PIXEL, "lpips": {"kind": "lpips", "backbone": "random", "t_threshold": 0.5}}, 1e-5),
    # the pixel sweep's aspect-ratio buckets (data: bucketed_parquet below), with TREAD on each bucket's grid
    "pixel-buckets": ({**PIXEL, "data": "BUCKETS", "routing": {"kind": "tread", **ROUTE}}, 1e-5),
}


def bucketed_parquet(root) -> dict:
    """36 noise images, a third each 24×24, 24×14 and 14×24 (W×H), as data with buckets at 16 px, 4-px sides
    (buckets 12×20, 16², 20×12 W×H): 32 training rows, every bucket a few global batches of 4."""
    import io

    import numpy as np
    import pandas as pd
    from PIL import Image

    rng, rows = np.random.default_rng(0), []
    for i in range(36):
        w, h = ((24, 24), (24, 14), (14, 24))[i % 3]
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        rows.append({"image": buf.getvalue(), "long": f"noise {i}"})
    pd.DataFrame(rows).to_parquet(root / "buckets.parquet")
    return {"kind": "parquet", "path": str(root / "buckets.parquet"), "caption": "long", "resolution": 16,
            "num_val": 4, "buckets": "prx", "bucket_px": 4}  # fmt: skip


def flux_vae_weights(root):
    """A weights folder holding a tiny random-init Flux VAE under its real repo id (tiny_weights.py)."""
    from tiny_weights import tiny_autoencoder

    from core.weights import install
    from trainer.factors.tokenizer import TOKENIZERS

    tiny_autoencoder("flux-vae").save_pretrained(root / "flux-vae")
    install(TOKENIZERS.config_type("flux-vae").MODEL, root / "flux-vae", root / "weights")
    return root / "weights"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple]:
    """Every case once in one process (here) and once in two (one forked pair runs them all in turn)."""
    root = tmp_path_factory.mktemp("world")
    base = merge(merge(TINY, COMMON), {"weights_dir": str(flux_vae_weights(root))})
    dirs = {}
    for name, (over, _) in CASES.items():
        if over.get("data") == "BUCKETS":
            over = {**over, "data": bucketed_parquet(root)}
        for world in (1, 2):
            d = root / f"{name}-{world}"
            d.mkdir()
            d.joinpath("config.yaml").write_text(yaml.safe_dump(merge(base, over)))
            dirs[name, world] = d
    for name in CASES:
        job.run(dirs[name, 1])
    run_processes(*(dirs[name, 2] for name in CASES))
    return {name: (dirs[name, 1], dirs[name, 2]) for name in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_log_the_losses_of_one(name, runs):
    one, two = runs[name]
    a, b = logged_losses(one), logged_losses(two)
    gap = max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))
    va, vb = metrics_by_step(one)[3]["val_loss"], metrics_by_step(two)[3]["val_loss"]
    print(
        f"{name}: 1 process {a}, 2 processes {b}: largest relative gap {gap:.2e}, val {abs(vb - va) / va:.2e}"
    )
    assert len(a) == len(b) == 3
    assert b == pytest.approx(a, rel=CASES[name][1], abs=0)
    assert vb == pytest.approx(va, rel=CASES[name][1] * 10, abs=0)  # the held-out loss of the weights
