"""GPU step times of a sweep's arms through the trainer's own train step, eager and compiled, beside
the bare compiled PRX step, with Muon's step parts and the training state's memory: one command.

For a sweep (default sweeps/prx.yaml: PRX-1.2B, 256 px; batch 32 per GPU) it runs, in this order:

1. the baseline arm eager and compiled (`train.compile: off` / `on`);
2. ../shared/bench/prx_bare_step.py --compile at the same size and batch, in a subprocess: the anchor
   the compiled baseline is read against (trainer step / bare step);
3. every other arm of the sweep compiled, each against the compiled baseline. The arms are the sweep's
   own expansion (ablate's loader, first seed), so another sweep file needs no change here;
4. in each Muon arm, Muon's step split into its parts at world 1 (`muon.muon_step_parts`) and projected
   to more ranks (`muon.project_muon_step`) at --gather-gbps;
5. in each arm, memory at world 1: the peak, and the training state (weights, gradients, optimizer
   state) that FSDP would shard, with per-rank projections for DDP and FSDP (the lent machine has one
   GPU; with one process `parallel: fsdp` runs unsharded, so there is no sharded run to measure);
6. last, the compiled baseline with torch's own attention-kernel order instead of cuDNN first
   (`trainer/runtime/compile.py` ATTENTION): whether preferring cuDNN pays.

Inputs are random tensors of each arm's shapes: latents (B, C, h, w) of its tokenizer, text embeddings
(B, Lt, D) of its text encoder (half padding), raw images for REPA's teacher. A pretrained (or
domain-trained) teacher becomes a random-init DINOv2-with-registers ViT of its width, depth and patch
(MLP 2x wide where DINOv2's is 4x: REPA's cost is a slight underestimate). Only where inputs come from
is replaced; the step is the trainer's. Arms whose steps are then the same (they differ in captions,
data or tokenizer weights) are measured once. FLOPs are counted by FlopCounterMode on an eager step;
MFU = FLOPs / step time / the card's dense bf16 peak, shown in the table where an arm does the
baseline's work.

Writes <out-dir>/<device>-<sweep name>.json (every row, rewritten after each) and .md (the table for
the README), and prints the table.

    python bench/gpu.py                                          # sweeps/prx.yaml on the GPU
    python bench/gpu.py --sweep sweeps/prx-pixel-1024.yaml --arms tread,sprint
    python bench/gpu.py --sweep sweeps/demo.yaml --device cpu --compile off --steps 2 --no-anchor

On a lent device machine (no diffusers, pydantic or submitit there): see bench/gpu.sh.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from fsdp_memory import held_bytes, projected_bytes  # bench/ is the script's folder
from torch.utils.flop_counter import FlopCounterMode

from ablate.sweep.expand import expand
from ablate.sweep.schema import BASELINE, load_sweep
from trainer.config import TrainConfig
from trainer.data.sampling import StepBatchSampler
from trainer.factors.muon import muon_step_parts, project_muon_step
from trainer.factors.tokenizer import Latents
from trainer.model import PRESETS
from trainer.runtime import compile as compile_mod
from trainer.runtime.dist import Dist
from trainer.train import Trainer

ROOT = Path(__file__).resolve().parent.parent
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16, vendor figures
# The bare-step anchor: beside the checkout, or copied into it to travel to a device machine (gpu.sh).
ANCHORS = (ROOT.parent / "shared/bench/prx_bare_step.py", ROOT / ".cache/bench/prx_bare_step.py")
# ViT (depth, heads) by width, for the random-init stand-ins of pretrained teachers: S, B, L, H, g.
VIT_SIZES = {384: (12, 6), 768: (12, 12), 1024: (24, 16), 1280: (32, 16), 1536: (40, 24)}
WORLDS = (2, 4, 8, 16)  # rank counts Muon's step and the memory are projected to


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


def sweep_arms(sweep_file: str | Path) -> tuple[str, list[tuple[str, dict]]]:
    """(sweep name, [(delta, resolved config)]): the sweep's expansion at its first seed, baseline first."""
    sweep = load_sweep(sweep_file)
    return sweep.name, [(s.delta, s.config) for s in expand(sweep) if s.seed == sweep.seeds[0]]


def bench_config(config: dict, batch: int, steps: int, compile_choice: str) -> dict:
    """An arm's resolved config, runnable with no weights, data or network: the bench's batch, steps and
    compile choice, no eval metrics or cache, a random-init ViT for a pretrained or domain teacher."""
    cfg = copy.deepcopy(config)
    cfg["train"].update(batch_size=batch, steps=steps, compile=compile_choice)
    cfg["eval"]["metrics"], cfg["cache"] = [], None
    teacher = TrainConfig.model_validate(cfg).repa.teacher if cfg.get("repa") else None
    if teacher is not None and teacher.kind != "tiny":
        layers, heads = VIT_SIZES.get(teacher.width, (2, 1))
        spec = getattr(teacher, "spec", None)
        cfg["repa"]["teacher"] = {
            "kind": "tiny",
            "width": teacher.width,
            "layers": layers,
            "heads": heads,
            "patch_size": teacher.patch_size,
            "registers": spec.registers if spec else 0,
        }
    return cfg


def step_key(tc: TrainConfig) -> str:
    """What a step on random inputs depends on: the config less data, captions, weights and evaluation;
    of the tokenizer and text encoder only their shapes."""
    skip = {"seed", "weights_dir", "data", "text_encoder", "tokenizer", "cache", "eval", "log", "checkpoint"}
    key = tc.model_dump(mode="json", exclude=skip)
    key["shapes"] = [
        tc.data.resolution,
        tc.tokenizer.channels,
        tc.tokenizer.downsample,
        tc.text_encoder.dim,
        tc.text_encoder.max_length,
    ]
    return json.dumps(key, sort_keys=True)


def timed_median(fn, device: torch.device, repeats: int = 3) -> float:
    """Median seconds of `fn` over `repeats` calls after one warm-up call, the device synchronised."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory(tr: Trainer, peak: int) -> dict:
    """World-1 memory, and projections per rank at WORLDS ranks: the measured peak less the training
    state this process holds (parameters, gradients, optimizer state: `fsdp_memory.held_bytes`), plus
    what one rank of a DDP or FSDP run holds (`fsdp_memory.projected_bytes`, AdamW's state; FSDP's
    transient bf16 gathers included). Activations are taken as unchanged and DDP's gradient buckets
    are left out, as fsdp_memory does. Projections, not measurements."""
    held, gib = held_bytes(tr.denoiser, tr.optimizer), 2**-30
    out = {k.replace("_bytes", "_gib"): v * gib for k, v in held.items()}
    if peak:
        out["peak_gib"] = peak * gib
        for world in WORLDS:
            for kind in ("ddp", "fsdp"):
                rank = projected_bytes(tr.denoiser, world, kind == "fsdp", 2)
                out[f"{kind}_{world}_rank_gib"] = (peak - sum(held.values()) + sum(rank.values())) * gib
    return out


def muon_parts(tr: Trainer, device: torch.device, gather_gbps: float) -> dict | None:
    """Muon's step at world 1 in its parts, and projected to WORLDS ranks; None without Muon."""
    muon = tr.optimizer.optimizers.get("muon")
    if muon is None:
        return None
    for p in muon.index:  # the train step's zero_grad freed the gradients: any will do for timing
        p.grad = torch.randn_like(p)
    parts = muon_step_parts(muon)
    out = {k: parts[k] for k in ("step_s", "momentum_s", "exchange_s", "apply_s")}
    out.update(ns_s=sum(parts["ns_s"]), matrices=len(parts["ns_s"]), gather_gbps=gather_gbps)
    out["projected"] = {w: project_muon_step(parts, w, gather_gbps) for w in WORLDS}
    return out


def measure(
    name: str,
    cfg: dict,
    steps: int,
    warmup: int,
    tmp: Path,
    device: torch.device,
    gather_gbps: float,
    **compiled,
) -> dict:
    """One arm: FLOPs of an eager step, `warmup` steps (compiling happens here), then `steps` timed.
    `compiled`: fields of the trainer's `Compiled` to replace (the attention order)."""
    tc = TrainConfig.model_validate(cfg)
    batch, res = tc.train.batch_size, tc.data.resolution
    data = RandomImages(4 * batch, res)
    side = res // tc.tokenizer.downsample
    inputs = RandomInputs(
        tc.tokenizer.channels, side, tc.text_encoder.max_length, tc.text_encoder.dim, device
    )
    with torch.device(device):  # weights initialised on the device: seconds, not a CPU init of each weight
        tr = Trainer(tc, tmp / name, Dist(0, 1, 0, device), inputs=(inputs, data, data))
    tr.compiled = dataclasses.replace(tr.compiled, **compiled)
    sampler = StepBatchSampler(len(data), batch, 0, 0, tc.train.steps)
    batches = iter(
        torch.utils.data.DataLoader(
            data,
            batch_sampler=sampler,
            num_workers=8 if device.type == "cuda" else 0,
            pin_memory=device.type == "cuda",
        )
    )
    with FlopCounterMode(display=False) as counter, torch.compiler.set_stance("force_eager"):
        tr.train_step(0, next(batches))
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the peak of the steps as they run, compiled or not
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for s in range(1, warmup + 1):
        tr.train_step(s, next(batches))
    sync()
    t1 = time.perf_counter()
    for s in range(warmup + 1, warmup + steps + 1):
        loss, _ = tr.train_step(s, next(batches))
    sync()
    dt = (time.perf_counter() - t1) / steps
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in dev), None)
    max_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    row = {
        "arm": name,
        "compile": tc.train.compile,
        "attention": "cudnn-first" if tr.compiled.orders_attention else "torch",
        "device": dev,
        "batch": batch,
        "step_s": dt,
        "batches_per_s": 1 / dt,
        "samples_per_s": batch / dt,
        "warmup_s": t1 - t0,
        "tflop_per_step": flops / 1e12,
        "achieved_tflops": flops / dt / 1e12,
        "mfu": flops / dt / 1e12 / peak if peak else None,
        "loss": float(loss),
        "max_mem_gib": max_mem / 2**30 if max_mem else None,
        "memory": memory(tr, max_mem),
    }

    for p in tr.denoiser.parameters():  # zero_grad freed the step's gradients: any will do for timing
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    row["optimizer_step_s"] = timed_median(tr.optimizer.step, device)
    if (muon := muon_parts(tr, device, gather_gbps)) is not None:
        row["muon"] = muon
    del tr, batches
    if device.type == "cuda":  # the next arm gets the memory back
        gc.collect()
        torch.cuda.empty_cache()
    return row


def anchor(args, tc: TrainConfig) -> dict:
    """prx_bare_step.py --compile at the baseline's (`tc`) size and the bench's batch, or why it was not run."""
    path = args.anchor or next((p for p in ANCHORS if p.exists()), None)
    if path is None:
        return {"skipped": f"no prx_bare_step.py at {' or '.join(map(str, ANCHORS))} (--anchor PATH)"}
    shapes = (tc.tokenizer.channels, tc.tokenizer.downsample, tc.text_encoder.dim)
    if tc.model.sizes() != PRESETS["prx-1.2b"] or shapes != (16, 8, 2304):
        return {"skipped": "the anchor's one size is PRX-1.2B on 16-channel 8x latents and 2304-d text"}
    cmd = [sys.executable, str(path), "--size", "prx-1.2b", "--compile", "--batch", str(args.batch)]
    cmd += ["--resolution", str(tc.data.resolution), "--text-tokens", str(tc.text_encoder.max_length)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.anchor_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.anchor_timeout} s: {' '.join(cmd)}"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        return {"error": f"exit {done.returncode}: {done.stderr[-800:]}"}
    return json.loads(lines[-1])


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' → 'h100', 'cpu' → 'cpu': the results' file name prefix."""
    model = re.search(r"\b[A-Z]+[0-9]{2,}[A-Z]*\b", name)
    return (model.group(0) if model else re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")).lower()


def table(report: dict) -> str:
    """The README's table: every arm's speed against the baseline of its compile choice, then the
    anchor, Muon, memory and attention lines."""
    rows = [r for r in report["rows"] if "error" not in r]
    base = {r["compile"]: r for r in rows if r["arm"] == BASELINE and "check" not in r}
    out = [
        "| arm | compile | batches/s | step time vs baseline | MFU | peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = base.get(r["compile"])
        same_work = ref is not None and abs(r["tflop_per_step"] / ref["tflop_per_step"] - 1) < 0.01
        mfu = f"{r['mfu']:.2f}" if r["mfu"] is not None and same_work else "—"
        vs = f"{r['step_s'] / ref['step_s']:.2f}" if ref else "—"
        mem = f"{r['max_mem_gib']:.1f}" if r["max_mem_gib"] else "—"
        arm = r["arm"] + (f" (= {r['same_step_as']})" if "same_step_as" in r else "")
        arm += " (torch's attention order)" if r.get("check") == "attention" else ""
        out.append(f"| {arm} | {r['compile']} | {r['batches_per_s']:.2f} | {vs} | {mfu} | {mem} |")
    a, lines = report.get("anchor") or {}, []
    if "step_s" in a:
        mfu = f"{a['mfu']:.2f}" if a.get("mfu") else "—"
        out.append(
            f"| bare PRX step (`prx_bare_step.py --compile`) | on | {a['batches_per_s']:.2f} | — | {mfu} | — |"
        )
        if "on" in base:
            lines.append(
                f"Compiled trainer step / bare compiled step: {base['on']['step_s'] / a['step_s']:.3f}x."
            )
    elif a:
        lines.append(f"Anchor not measured: {a.get('skipped') or a.get('error')}.")
    for r in rows:
        if "muon" in r and "same_step_as" not in r:
            m, ref = r["muon"], base.get(r["compile"])
            adam = f"; the baseline's AdamW step {1000 * ref['optimizer_step_s']:.1f} ms" if ref else ""
            p8 = m["projected"][8]
            lines.append(
                f"{r['arm']}: Muon's step at world 1 {1000 * m['step_s']:.1f} ms (Newton–Schulz "
                f"{1000 * m['ns_s']:.1f} ms over {m['matrices']} matrices){adam}; projected at 8 ranks "
                f"{1000 * p8['step_s']:.1f} ms (all-gather at {m['gather_gbps']:.0f} GB/s)."
            )
    if (ref := base.get("on") or base.get("off")) and "peak_gib" in ref["memory"]:
        m = ref["memory"]
        lines.append(
            f"Memory, baseline at world 1: peak {m['peak_gib']:.1f} GiB, of it parameters {m['param_gib']:.1f}, "
            f"gradients {m['grad_gib']:.1f}, optimizer state {m['optimizer_gib']:.1f}; projected per rank "
            f"at 8 ranks: DDP {m['ddp_8_rank_gib']:.1f} GiB, FSDP {m['fsdp_8_rank_gib']:.1f} GiB."
        )
    return "\n".join(out + ([""] if lines else []) + lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", default=str(ROOT / "sweeps/prx.yaml"))
    ap.add_argument("--arms", help="comma-separated deltas to time (default: all); the baseline always runs")
    ap.add_argument("--batch", type=int, default=32, help="per-GPU batch")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per arm")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first; compiling happens here")
    ap.add_argument(
        "--compile",
        choices=("both", "on", "off"),
        default="both",
        help="both: the baseline eager and compiled, the other arms compiled",
    )
    ap.add_argument("--backend", default=compile_mod.BACKEND, help="torch.compile backend")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--anchor", type=Path, help="prx_bare_step.py (default: ../shared/bench, .cache/bench)")
    ap.add_argument(
        "--anchor-timeout", type=int, default=300, help="seconds for the anchor's run, compiling included"
    )
    ap.add_argument("--no-anchor", action="store_true")
    ap.add_argument("--no-attention-check", action="store_true", help="skip step 6")
    ap.add_argument(
        "--gather-gbps",
        type=float,
        default=350.0,
        help="all-gather bus bandwidth (GB/s) Muon is projected with: an assumption until measured on "
        "the target node (nccl-tests all_gather_perf); 8-GPU NVLink H100/H200 nodes give about 350",
    )
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench/results")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    compile_mod.BACKEND = args.backend
    torch._dynamo.reset()

    name, arms = sweep_arms(args.sweep)
    if args.arms:
        wanted = set(args.arms.split(","))
        unknown = wanted - {d for d, _ in arms}
        if unknown:
            raise SystemExit(f"--arms {', '.join(sorted(unknown))}: not in {args.sweep}; its arms: "
                             f"{', '.join(d for d, _ in arms)}")  # fmt: skip
        arms = [(d, c) for d, c in arms if d == BASELINE or d in wanted]
    main_choice = "off" if args.compile == "off" else "on"
    plan = [(BASELINE, arms[0][1], "off")] if args.compile == "both" else []
    plan += [(d, c, main_choice) for d, c in arms]

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = args.out_dir / f"{device_slug(dev_name)}-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "sweep": name,
        "device": dev_name,
        "torch": torch.__version__,
        "backend": args.backend,
        "rows": [],
    }
    report.update(batch=args.batch, steps=args.steps, warmup=args.warmup)

    def run(delta: str, config: dict, choice: str, **compiled) -> dict:
        cfg = bench_config(config, args.batch, args.warmup + args.steps + 1, choice)
        key = step_key(TrainConfig.model_validate(cfg))
        same = next((r for r in report["rows"] if r.get("_key") == key and not compiled), None)
        if same is not None:
            row = {**same, "arm": delta, "same_step_as": same["arm"]}
        else:
            try:
                row = measure(delta, cfg, args.steps, args.warmup, tmp, device, args.gather_gbps, **compiled)
            except Exception as e:  # one arm's failure (out of memory, a compile error) spares the others
                traceback.print_exc()
                row = {"arm": delta, "compile": choice, "error": f"{type(e).__name__}: {e}"[:1000]}
                if device.type == "cuda":
                    gc.collect()
                    torch.cuda.empty_cache()
        row["_key"] = key if not compiled else None
        report["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("_key", "memory", "muon")}), flush=True)
        save()
        return row

    def save():
        rows = [{k: v for k, v in r.items() if k != "_key"} for r in report["rows"]]
        out.write_text(json.dumps({**report, "rows": rows}, indent=2))

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for delta, config, choice in plan:
            run(delta, config, choice)
            if delta == BASELINE and choice == "on" and not args.no_anchor:
                report["anchor"] = anchor(args, TrainConfig.model_validate(config))
                print(json.dumps({"anchor": report["anchor"]}), flush=True)
                save()
        if main_choice == "on" and device.type == "cuda" and not args.no_attention_check:
            torch._dynamo.reset()  # SDPA picks its kernel when the block is traced: compile afresh
            run(BASELINE, arms[0][1], "on", attention=())["check"] = "attention"
            save()
    save()
    md = table(report)
    out.with_suffix(".md").write_text(md)
    print("\n" + md, flush=True)
    return report


if __name__ == "__main__":
    main()
