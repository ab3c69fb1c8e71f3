"""`make bench`: the trainer's cost against a bare PRX step, and every factor's cost, on CPU.

Prints one JSON line per measurement and writes them all to runs/bench/trainer.json, so two
machines or two commits can be compared. Ratios are measured in one process, one after the
other; compare ratios, not absolute times (these machines are noisy).

    python bench/run.py [--steps 30] [--batch 16]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
from fsdp_memory import memory_rows  # bench/ is the script's folder

from ablate.sweep.expand import merge
from trainer import flow
from trainer.config import TrainConfig
from trainer.data.sampling import StepBatchSampler
from trainer.factors.muon import ns_flops_per_rank
from trainer.factors.optimizer import MuonConfig, muon_groups
from trainer.model import Denoiser, ModelConfig, build_prx
from trainer.runtime.dist import Dist
from trainer.train import Trainer

BASE = {
    "model": {"preset": "tiny"},
    "data": {"kind": "synthetic", "resolution": 32, "caption": "long", "num_val": 16},
    "text_encoder": {"kind": "tiny-t5"},
    "tokenizer": {"kind": "pixel"},
    "optimizer": {"kind": "adamw", "lr": 1e-4},
    "precision": {"kind": "fp32"},
    "checkpoint": {"every": 10**6},
    "eval": {"every": 10**6},
    "log": {"every": 10**6},
}


def merged(over: dict) -> dict:
    """BASE with `over` applied as a sweep's delta is."""
    return merge(BASE, over)[0]


def trainer_for(cfg: dict, steps: int, batch: int, run_dir: Path) -> Trainer:
    cfg = {**cfg, "train": {"steps": steps, "batch_size": batch, "caption_dropout": 0.1}}
    return Trainer(TrainConfig.model_validate(cfg), run_dir, Dist(0, 1, 0, torch.device("cpu")))


class TrainerClock:
    """Times the trainer's own step (data loading included) in rounds, so arms interleave."""

    def __init__(self, tr: Trainer, total_steps: int):
        self.tr, self.step = tr, 0
        sampler = StepBatchSampler(len(tr.train_set), tr.cfg.train.batch_size, 0, 0, total_steps)
        self.batches = iter(torch.utils.data.DataLoader(tr.train_set, batch_sampler=sampler))

    def run(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            loss, _ = self.tr.train_step(self.step, next(self.batches))
            self.step += 1
        float(loss)
        return (time.perf_counter() - t0) / steps


def time_bare(tr: Trainer, steps: int, warmup: int) -> float:
    """The same model and batch shapes: forward, MSE, backward, AdamW step — nothing else."""
    prx = copy.deepcopy(tr.denoiser.prx)
    opt = torch.optim.AdamW(prx.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-15)
    b, res = tr.cfg.train.batch_size, tr.cfg.data.resolution
    x0 = torch.randn(b, 3, res, res)
    txt = torch.randn(b, tr.text.max_length, tr.text.dim)
    mask = torch.ones(b, tr.text.max_length, dtype=torch.bool)

    def step():
        t = torch.sigmoid(torch.randn(b))
        noise = torch.randn_like(x0)
        pred = prx(flow.interpolate(x0, noise, t), t, txt, attention_mask=mask).sample
        loss = torch.nn.functional.mse_loss(pred, noise - x0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


DELTAS = {
    "baseline": {},
    "short-captions": {"data": {"caption": "short"}},
    "muon": {"optimizer": {"kind": "muon"}},
    "bf16-weights": {"precision": {"kind": "bf16"}},
    "contrastive-fm": {"contrastive": {"kind": "contrastive"}},
    "ema": {"ema": {"kind": "ema", "decay": 0.999}},
    "x-prediction": {"flow": {"prediction": "x", "shift": 3.0}},
    # the tiny preset has 4 blocks: route the middle two, align after block 1 (as 2..12 and 7 of 16)
    "tread": {"routing": {"kind": "tread", "start": 1, "end": 3}},
    "sprint": {"routing": {"kind": "sprint", "start": 1, "end": 3}},
    "repa": {"repa": {"kind": "repa", "block": 1, "teacher": {"kind": "tiny", "width": 64, "layers": 2}}},
    "irepa": {"repa": {"kind": "irepa", "block": 1, "teacher": {"kind": "tiny", "width": 64, "layers": 2}}},
}


def muon_shares(worlds=(1, 2, 4, 8, 16)) -> list[dict]:
    """Newton–Schulz FLOPs per rank of PRX-1.2B's Muon matrices (the model built on the meta device,
    grouped as build_muon groups them) when the ranks split them, and the busiest rank / mean."""
    cfg = MuonConfig()
    with torch.device("meta"):
        model = Denoiser(build_prx(ModelConfig(preset="prx-1.2b"), 16, 2304))  # Flux VAE, T5Gemma
    shapes = [tuple(p.shape) for p in muon_groups(cfg, model)["muon"]]
    rows = []
    for world in worlds:
        load = ns_flops_per_rank(shapes, world, cfg.ns_steps)
        rows.append(
            {"bench": "muon_ns_flops", "model": "prx-1.2b", "matrices": len(shapes), "world": world,
             "rank_tflop": max(load) / 1e12, "balance": max(load) / (sum(load) / world)}
        )  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30, help="measured steps per arm, split over rounds")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default="runs/bench/trainer.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    rounds, per_round = args.rounds, max(1, args.steps // args.rounds)
    total = args.warmup + rounds * per_round
    with tempfile.TemporaryDirectory() as tmp:
        clocks = {
            name: TrainerClock(trainer_for(merged(over), total, args.batch, Path(tmp)), total)
            for name, over in DELTAS.items()
        }
        for clock in clocks.values():
            clock.run(args.warmup)
        bare = [
            time_bare(clocks["baseline"].tr, per_round, args.warmup if r == 0 else 1) for r in range(rounds)
        ]
        times = {name: [] for name in clocks}
        for _ in range(rounds):  # round-robin: slow drifts of the machine hit every arm alike
            for name, clock in clocks.items():
                times[name].append(clock.run(per_round))
        ours = statistics.median(times["baseline"])
        rows.append(
            {
                "bench": "trainer_overhead",
                "preset": "tiny",
                "device": "cpu",
                "threads": torch.get_num_threads(),
                "batch": args.batch,
                "bare_step_s": statistics.median(bare),
                "trainer_step_s": ours,
                "ratio": ours / statistics.median(bare),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        for name in clocks:
            rows.append(
                {"bench": "factor_step_time", "delta": name, "step_s": statistics.median(times[name])}
            )
            print(json.dumps(rows[-1]), flush=True)
    base_s = next(r["step_s"] for r in rows if r.get("delta") == "baseline")
    for r in rows:
        if "delta" in r:
            r["vs_baseline"] = r["step_s"] / base_s
    print(f"\n{'delta':<18}{'step ms':>10}{'vs baseline':>14}")
    for r in rows:
        if "delta" in r:
            print(f"{r['delta']:<18}{1000 * r['step_s']:>10.1f}{r['vs_baseline']:>13.2f}x")
    print(
        f"trainer step / bare step: {rows[0]['ratio']:.2f}x "
        f"({1000 * rows[0]['trainer_step_s']:.1f} ms vs {1000 * rows[0]['bare_step_s']:.1f} ms)"
    )
    shares = muon_shares()
    rows += shares
    print(f"\nMuon Newton–Schulz per rank, PRX-1.2B ({shares[0]['matrices']} matrices, one step)")
    print(f"{'ranks':<8}{'TFLOP/rank':>12}{'max/mean':>10}")
    for r in shares:
        print(f"{r['world']:<8}{r['rank_tflop']:>12.2f}{r['balance']:>10.3f}")
    rows += memory_rows(BASE)  # DDP vs FSDP bytes per process: measured at 2 on CPU, PRX-1.2B at 8 and 16
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        yaml.safe_dump(rows) if args.out.endswith(".yaml") else json.dumps(rows, indent=2)
    )


if __name__ == "__main__":
    main()
