"""GPU throughput of every factor at the study's size: PRX-1.2B, 256 px, random latents and text.

Latents (B, 16, 32, 32) and T5Gemma-shaped text embeddings (B, 256, 2304, half padding) are
random tensors of the right shapes, fed through the trainer's own train step (the only part
replaced is where inputs come from); REPA's teacher is a random-init ViT-L/14, so its cost is close to
real. Prints one JSON line per arm: batches/s, samples/s, counted FLOPs, MFU.

    python bench/gpu.py [--batch 32] [--steps 10] [--arms baseline,tread,...]

Run beside ../shared/bench/prx_bare_step.py --size prx-1.2b on the same card to read the
trainer's overhead as a ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer.config import TrainConfig
from trainer.data import StepBatchSampler
from trainer.dist import Dist
from trainer.tokenizer import Latents
from trainer.train import Trainer

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, vendor figures

BASE = {
    "model": {"preset": "prx-1.2b"},
    "data": {"kind": "synthetic", "resolution": 256},  # only its resolution is used here
    "text_encoder": {"kind": "t5gemma"},  # shapes only: 2304-d, 256 tokens
    "tokenizer": {"kind": "flux-vae"},  # shapes only: 16 channels, 8x
    "optimizer": {"kind": "adamw", "lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-15},
    "precision": {"kind": "fp32", "autocast": "bf16"},
    "train": {"grad_clip": 0.2, "caption_dropout": 0.1},
}
# ViT-L/14 with registers at random init (width 1024, 24 layers, 16 heads): DINOv2-L-reg's shape
# except its MLP (2x width here, 4x in DINOv2), so REPA's teacher cost is a slight underestimate.
TEACHER = {"kind": "tiny", "width": 1024, "layers": 24, "heads": 16, "patch_size": 14}
ARMS = {
    "baseline": {},
    "muon": {"optimizer": {"kind": "muon"}},
    "bf16-weights": {"precision": {"kind": "bf16", "autocast": "bf16"}},
    "contrastive-fm": {"contrastive": {"kind": "contrastive"}},
    "tread": {"routing": {"kind": "tread"}},
    "sprint": {"routing": {"kind": "sprint"}},
    "repa-dinov2": {"repa": {"kind": "repa", "teacher": TEACHER}},
    "ema": {"ema": {"kind": "ema"}},
}


class RandomImages(torch.utils.data.Dataset):
    """Raw images for REPA's teacher; captions are never encoded (RandomInputs stands in)."""

    def __init__(self, n: int, res: int):
        self.n, self.res = n, res

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {
            "image": torch.rand(3, self.res, self.res, generator=g),
            "caption": "",
            "attrs": torch.full((5,), -1),
        }


class RandomInputs:
    """Latents and text embeddings as random tensors of the study's shapes, made on the device."""

    def __init__(self, channels: int, side: int, length: int, dim: int, device: torch.device):
        self.c, self.side, self.length, self.dim, self.device = channels, side, length, dim, device

    def __call__(self, batch, device):
        b = len(batch["caption"])
        mask = torch.zeros(b, self.length, dtype=torch.bool, device=device)
        mask[:, : self.length // 2] = True  # half padding, as captions are
        lat = Latents(torch.randn(b, self.c, self.side, self.side, device=device), None)
        return lat, torch.randn(b, self.length, self.dim, device=device), mask

    def empty(self):
        mask = torch.zeros(1, self.length, dtype=torch.bool, device=self.device)
        mask[:, 0] = True
        return torch.zeros(1, self.length, self.dim, device=self.device), mask


def measure(
    name: str, over: dict, batch: int, steps: int, warmup: int, tmp: Path, preset: str, device: torch.device
) -> dict:
    cfg = {
        **BASE,
        **over,
        "train": {**BASE["train"], "steps": warmup + steps + 1, "batch_size": batch},
        "model": {"preset": preset},
    }
    tc = TrainConfig.model_validate(cfg)
    side = tc.data.resolution // tc.tokenizer.downsample
    data = RandomImages(4 * batch, tc.data.resolution)
    inputs = RandomInputs(
        tc.tokenizer.channels, side, tc.text_encoder.max_length, tc.text_encoder.dim, device
    )
    tr = Trainer(tc, tmp / name, Dist(0, 1, 0, device), inputs=(inputs, data, data))
    sampler = StepBatchSampler(len(data), batch, 0, 0, warmup + steps + 1)
    batches = iter(
        torch.utils.data.DataLoader(
            data,
            batch_sampler=sampler,
            num_workers=8 if device.type == "cuda" else 0,
            pin_memory=device.type == "cuda",
        )
    )
    with FlopCounterMode(display=False) as counter:
        tr.train_step(0, next(batches))
    flops = counter.get_total_flops()
    for s in range(1, warmup + 1):
        tr.train_step(s, next(batches))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for s in range(warmup + 1, warmup + steps + 1):
        loss, _ = tr.train_step(s, next(batches))
    sync()
    dt = (time.perf_counter() - t0) / steps
    dev = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in dev), None)
    out = {
        "arm": name,
        "device": dev,
        "batch": batch,
        "step_s": dt,
        "batches_per_s": 1 / dt,
        "samples_per_s": batch / dt,
        "tflop_per_step": flops / 1e12,
        "achieved_tflops": flops / dt / 1e12,
        "mfu": flops / dt / 1e12 / peak if peak else None,
        "loss": float(loss),
        "max_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    del tr
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--preset", default="prx-1.2b", help="model preset (tiny: a CPU smoke test)")
    ap.add_argument("--out", default="runs/bench/gpu.json")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.arms.split(","):
            rows.append(
                measure(name, ARMS[name], args.batch, args.steps, args.warmup, Path(tmp), args.preset, device)
            )
            print(json.dumps(rows[-1]), flush=True)
    base = next((r for r in rows if r["arm"] == "baseline"), None)
    if base:
        for r in rows:
            r["vs_baseline_step_time"] = r["step_s"] / base["step_s"]
            print(
                f"{r['arm']:<16} {r['batches_per_s']:6.2f} batch/s  {r['vs_baseline_step_time']:.2f}x step time"
                f"  MFU {r['mfu'] or 0:.2f}"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
