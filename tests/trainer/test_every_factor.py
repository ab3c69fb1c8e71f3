"""Every entry of every registry, built at tiny size, trains a few steps and resumes exactly.

Pretrained components load tiny random-init models of their real classes from a weights folder
laid out like the HF cache (tiny_weights.py), through the same loading code as real weights.
A registry entry without a case here fails `test_every_registry_entry_has_a_case`.
"""

import json
import shutil

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_weights import T5GEMMA_DIM, install_everything
from trainer_testing import final_metrics

from trainer import job
from trainer.config import REGISTRIES
from trainer.data.synthetic import SyntheticConfig, SyntheticShapes, long_caption, short_caption
from trainer.runtime import checkpoint

TEACHER = {"kind": "tiny", "width": 16, "layers": 1, "heads": 2, "patch_size": 2}
CASES = {  # (config path, kind) → overrides of the tiny base config
    ("data", "synthetic"): {},
    ("data", "parquet"): {"data": "PARQUET"},
    ("data", "folder"): {"data": "FOLDER"},
    ("text_encoder", "tiny-t5"): {},
    ("text_encoder", "hashed-words"): {"text_encoder": {"kind": "hashed-words", "dim": 32, "max_length": 8}},
    ("text_encoder", "t5gemma"): {"text_encoder": {"kind": "t5gemma", "dim": T5GEMMA_DIM, "max_length": 16}},
    ("tokenizer", "pixel"): {},
    ("tokenizer", "flux-vae"): {
        "tokenizer": {"kind": "flux-vae", "dtype": "float32"},
        "data": {"resolution": 32},
    },
    ("tokenizer", "repa-e-vae"): {
        "tokenizer": {"kind": "repa-e-vae", "dtype": "float32"},
        "data": {"resolution": 32},
    },
    ("tokenizer", "flux2-ae"): {
        "tokenizer": {"kind": "flux2-ae", "dtype": "float32"},
        "data": {"resolution": 32},
    },
    ("tokenizer", "dc-ae"): {
        "tokenizer": {"kind": "dc-ae", "dtype": "float32"},
        "data": {"resolution": 64},
        "model": {"preset": "tiny", "patch_size": 1},
    },
    ("tokenizer", "domain-ae"): {
        "tokenizer": {"kind": "domain-ae", "steps": 20},
        "model": {"preset": "tiny", "patch_size": 1},
    },
    ("optimizer", "adamw"): {},
    ("optimizer", "muon"): {"optimizer": {"kind": "muon", "lr": 1e-3}},
    ("precision", "fp32"): {},
    ("precision", "bf16"): {"precision": {"kind": "bf16"}},
    ("parallel", "ddp"): {},
    # one process runs unwrapped; tests/trainer/test_fsdp.py shards over two
    ("parallel", "fsdp"): {"parallel": {"kind": "fsdp"}},
    ("ema", "ema"): {"ema": {"kind": "ema", "decay": 0.9}},
    ("contrastive", "contrastive"): {"contrastive": {"kind": "contrastive", "group": 2}},
    ("routing", "tread"): {"routing": {"kind": "tread", "start": 1, "end": 3}},
    ("routing", "sprint"): {"routing": {"kind": "sprint", "start": 1, "end": 3}},
    ("repa", "repa"): {"repa": {"kind": "repa", "block": 1, "teacher": TEACHER}},
    ("repa", "irepa"): {"repa": {"kind": "irepa", "block": 1, "teacher": TEACHER}},
    # an option that changes what trains, beyond a registry entry: PRX's bf16 projector
    ("repa.projector_dtype", "bf16"): {
        "repa": {"kind": "repa", "block": 1, "teacher": TEACHER, "projector_dtype": "bf16"}
    },
    **{
        ("repa.teacher", kind): {"repa": {"kind": "repa", "block": 1, "teacher": {"kind": kind}}}
        for kind in REGISTRIES["repa.teacher"].kinds
        if kind != "tiny"
    },
    ("repa.teacher", "tiny"): {},  # the repa cases above use it
    # an option that changes what trains: PRX's aspect-ratio buckets (16 px, 4-px sides: 20×12, 16², 12×20),
    # with routing and REPA on the varying token grid
    ("data.buckets", "prx"): {
        "data": "PARQUET-BUCKETS",
        "routing": {"kind": "tread", "start": 1, "end": 3},
        "repa": {"kind": "repa", "block": 0, "teacher": TEACHER},
    },
    ("resolution_aware", "token"): {"resolution_aware": {"kind": "token"}},
    ("resolution_aware", "vec"): {"resolution_aware": {"kind": "vec"}},
    # a random trunk with the package's real linear layers; 16 px reaches VGG's fifth block at 1 px
    ("lpips", "lpips"): {"lpips": {"kind": "lpips", "backbone": "random", "weight": 0.5}},
    ("perceptual_dino", "p-dino"): {
        "perceptual_dino": {"kind": "p-dino", "encoder": TEACHER, "resolution": 8}
    },
}


def test_every_registry_entry_has_a_case():
    missing = [
        (path, kind) for path, reg in REGISTRIES.items() for kind in reg.kinds if (path, kind) not in CASES
    ]
    assert not missing, f"add a case for {missing}"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return install_everything(tmp_path_factory.mktemp("weights"), tmp_path_factory.mktemp("scratch"))


def image_rows(n=24, aspects=False):
    """Synthetic scenes at 24 px; with `aspects`, one in three cropped to 24×14 and one to 14×24 (W×H)."""
    ds = SyntheticShapes(SyntheticConfig(resolution=24, num_train=n), 0, n)
    for i in range(n):
        item = ds[i]
        attrs = {
            k: int(v)
            for k, v in zip(("shape", "colour", "size", "position", "background"), item["attrs"], strict=True)
        }
        img = Image.fromarray((item["image"].permute(1, 2, 0).numpy() * 255).astype("uint8"))
        if aspects and i % 3:
            img = img.crop((0, 0, 24, 14) if i % 3 == 1 else (0, 0, 14, 24))
        yield img, long_caption(attrs), short_caption(attrs)


def dataset(kind: str, root) -> dict:
    if kind == "parquet-buckets":
        return {**dataset_of("parquet", root, aspects=True), "buckets": "prx", "bucket_px": 4}
    return dataset_of(kind, root)


def dataset_of(kind: str, root, aspects=False) -> dict:
    root.mkdir(exist_ok=True)
    rows = []
    for i, (img, long, short) in enumerate(image_rows(aspects=aspects)):
        if kind == "parquet":
            import io

            buf = io.BytesIO()
            img.save(buf, format="PNG")
            rows.append({"image": buf.getvalue(), "long": long, "short": short})
        else:
            img.save(root / f"{i}.png")
            rows.append({"file_name": f"{i}.png", "long": long, "short": short})
    if kind == "parquet":
        pd.DataFrame(rows).to_parquet(root / "data.parquet")
        return {
            "kind": "parquet",
            "path": str(root / "data.parquet"),
            "caption": "long",
            "resolution": 16,
            "num_val": 4,
        }
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"kind": "folder", "path": str(root), "caption": "long", "resolution": 16, "num_val": 4}


def final_weights(run_dir):
    ckpt = checkpoint.latest(run_dir)
    out = load_file(ckpt / "transformer" / "diffusion_pytorch_model.safetensors")
    out.update({f"factors.{k}": v for k, v in load_file(ckpt / "factors.safetensors").items()})
    return out


@pytest.mark.parametrize(
    "case", [c for c, over in CASES.items() if over or c[0] == "data"], ids=lambda c: f"{c[0]}={c[1]}"
)
def test_entry_trains_and_resumes_exactly(case, make_run, weights, tmp_path, domain_cache):
    over = dict(CASES[case])
    if over.get("data") in ("PARQUET", "FOLDER", "PARQUET-BUCKETS"):
        over["data"] = dataset(over["data"].lower(), tmp_path / "data")
    common = {
        "weights_dir": str(weights),
        "train": {"steps": 3, "batch_size": 2, "warmup_steps": 0},
        "checkpoint": {"every": 2, "keep": 3},
        "eval": {"every": 3, "batch_size": 4, "cache_dir": str(domain_cache)},
        "log": {"every": 1},
    }
    d = make_run("arm", **{**common, **over})
    job.run(d)
    assert json.loads((d / "status.json").read_text())["state"] == "done"
    assert final_metrics(d)["val_loss"] > 0
    ref = final_weights(d)

    # interrupt after step 2: drop what came after the checkpoint and run again
    shutil.rmtree(d / "checkpoints" / "step_00000003")
    (d / "result.json").unlink()
    job.run(d)
    again = final_weights(d)
    assert ref.keys() == again.keys()
    assert all(torch.equal(ref[k], again[k]) for k in ref), case
