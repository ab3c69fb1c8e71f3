"""Memory per process of DDP and FSDP (`parallel.kind`): parameters, gradients and optimizer state.

Measured: two CPU processes (gloo) each build the trainer for a small model, take two AdamW steps
and add up the bytes of the tensors they hold — for FSDP the local shards of the DTensors. Projected:
the same sums for PRX-1.2B (built on the meta device) at 8 and 16 processes, with FSDP2's rule that
each process holds ceil(rows / world) rows of every parameter (dim 0 padded to a multiple of world);
the measured world-2 rows are projected the same way, as a check of the projection.

This first table leaves out activations and DDP's communication buckets. `gathered_bytes` is FSDP's transient
whole weights: the root's (embeddings, final layer) for the whole step, plus two blocks at a time
(the running one and the prefetched next), in the dtype they are gathered in (bf16 under autocast,
as on CUDA; fp32 on CPU).

Then per GPU at 8 and 16 processes, for PRX-1.2B and a 5B PRX (`TARGETS`), with and without
activation checkpointing (`train.activation_checkpointing`): FSDP's sharded state (AdamW or Muon),
its transients, and activations. Activations are measured, not modelled: a tiny real PRX (`PROBE`,
the trainer's `Denoiser`, forward and backward on the CPU under bf16 autocast, the study's precision)
counts the bytes autograd keeps for backward (saved-tensor hooks; with checkpointing, what each
block's checkpoint keeps: its inputs), per sample, per block and per channel of width, at two token
counts. Those ratios are scaled by tokens × width × blocks to each target, times the study's batch
per GPU (global 256 split over the processes). Not counted: the CUDA context, NCCL buffers, the
allocator's fragmentation and the backward's activation gradients (`USABLE` leaves room for them).

    python bench/fsdp_memory.py    (also part of `make bench`, bench/run.py)
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
from pathlib import Path

import torch

MIB = 2**20
SMALL = {"preset": "tiny", "hidden_size": 256, "num_heads": 4, "axes_dim": (32, 32)}  # 4 blocks, ~5 M params


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def held_bytes(denoiser: torch.nn.Module, optimizer) -> dict[str, int]:
    """Bytes this process holds: parameters, gradients (one per trainable parameter, shaped and typed
    like its local tensor: FSDP reduce-scatters into the shard) and the optimizers' state tensors."""
    params = list(denoiser.parameters())
    state = [
        _local(v)
        for opt in optimizer.optimizers.values()
        for per_param in opt.state.values()
        for v in per_param.values()
        if isinstance(v, torch.Tensor)
    ]
    return {
        "param_bytes": sum(_local(p).nbytes for p in params),
        "grad_bytes": sum(_local(p).nbytes for p in params if p.requires_grad),
        "optimizer_bytes": sum(v.nbytes for v in state),
    }


def share(p: torch.Tensor, world: int, sharded: bool) -> int:
    """Elements of `p` one process holds: FSDP2's ceil(rows / world) rows of it, or all of it."""
    return math.ceil(p.shape[0] / world) * (p.numel() // p.shape[0]) if sharded and p.ndim else p.numel()


def projected_bytes(
    denoiser: torch.nn.Module, world: int, sharded: bool, gather_bytes: int
) -> dict[str, int]:
    """`held_bytes` of one process (the busiest) for AdamW, from the parameter shapes alone; plus
    `gathered_bytes` under FSDP (module docstring). `gather_bytes`: bytes per gathered element."""

    params = list(denoiser.parameters())
    size = sum(share(p, world, sharded) * p.element_size() for p in params)
    blocks = [sum(p.numel() for p in b.parameters()) for b in denoiser.prx.blocks]
    root = sum(p.numel() for p in params) - sum(blocks)
    return {
        "param_bytes": size,
        "grad_bytes": size,
        "optimizer_bytes": 2 * size + 4 * len(params),  # exp_avg, exp_avg_sq; a fp32 step count each
        "gathered_bytes": (root + 2 * max(blocks)) * gather_bytes if sharded else 0,
    }


def _task(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    """One process: the trainer for `cfg`, two steps on its share of each batch, its bytes to `out`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from trainer.config import TrainConfig
    from trainer.data.sampling import StepBatchSampler
    from trainer.runtime import dist as distributed
    from trainer.train import Trainer

    d = distributed.init()
    try:
        tr = Trainer(TrainConfig.model_validate(cfg), Path(out), d)
        steps, batch = 2, cfg["train"]["batch_size"]
        sampler = StepBatchSampler(len(tr.train_set), batch, 0, 0, steps, d.rank, d.world)
        for step, b in enumerate(torch.utils.data.DataLoader(tr.train_set, batch_sampler=sampler)):
            tr.train_step(step, b)
        mine = held_bytes(tr.denoiser, tr.optimizer)
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, mine)
        if d.main:
            (Path(out) / f"{cfg['parallel']['kind']}.json").write_text(json.dumps(gathered))
    finally:
        distributed.shutdown()


def measured(base: dict, world: int = 2) -> list[dict]:
    """DDP and FSDP at `world` CPU processes: the busiest process's bytes, and the projection of them."""
    from ablate.sweep.expand import merge
    from trainer.config import TrainConfig
    from trainer.model import Denoiser, build_prx

    rows = []
    with tempfile.TemporaryDirectory() as out:
        for kind in ("ddp", "fsdp"):
            over = {
                "model": SMALL,
                "parallel": {"kind": kind},
                "train": {"steps": 2, "batch_size": 2 * world},
            }
            cfg = merge(base, over)[0]
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            torch.multiprocessing.start_processes(
                _task, args=(world, port, cfg, out), nprocs=world, start_method="fork"
            )
            ranks = json.loads((Path(out) / f"{kind}.json").read_text())
            busiest = max(ranks, key=lambda r: sum(r.values()))
            tc = TrainConfig.model_validate(cfg)
            with torch.device("meta"):
                model = Denoiser(build_prx(tc.model, tc.tokenizer.channels, tc.text_encoder.dim))
            rows.append(
                row(
                    "small",
                    kind,
                    world,
                    "measured (cpu)",
                    busiest,
                    sum(p.numel() for p in model.parameters()),
                )
            )
            projected = projected_bytes(model, world, kind == "fsdp", gather_bytes=4)  # fp32 on CPU
            rows.append(row("small", kind, world, "projected", projected, rows[-1]["params"]))
    return rows


def projected_prx(worlds=(8, 16)) -> list[dict]:
    """PRX-1.2B (Flux VAE latents, T5Gemma text) with AdamW, fp32 weights, bf16 gathers (CUDA)."""
    from trainer.model import Denoiser, ModelConfig, build_prx

    with torch.device("meta"):
        model = Denoiser(build_prx(ModelConfig(preset="prx-1.2b"), 16, 2304))
    n = sum(p.numel() for p in model.parameters())
    return [
        row("prx-1.2b", kind, world, "projected", projected_bytes(model, world, kind == "fsdp", 2), n)
        for world in worlds
        for kind in ("ddp", "fsdp")
    ]


def row(model: str, kind: str, world: int, how: str, sizes: dict, params: int) -> dict:
    total = sum(v for k, v in sizes.items() if k != "gathered_bytes")
    return {"bench": "memory_per_rank", "model": model, "params": params, "kind": kind, "world": world,
            "how": how, **sizes, "state_bytes": total}  # fmt: skip


def print_table(rows: list[dict]) -> None:
    print("\nMemory per process: parameters + gradients + AdamW state (MiB; gathered = FSDP's transient)")
    print(
        f"{'model':<10}{'kind':<6}{'ranks':>6}  {'how':<16}{'params':>9}{'grads':>9}{'optim':>9}{'total':>10}{'gathered':>10}"
    )
    for r in rows:
        print(
            f"{r['model']:<10}{r['kind']:<6}{r['world']:>6}  {r['how']:<16}{r['param_bytes'] / MIB:>9.1f}"
            f"{r['grad_bytes'] / MIB:>9.1f}{r['optimizer_bytes'] / MIB:>9.1f}{r['state_bytes'] / MIB:>10.1f}"
            + (f"{r['gathered_bytes'] / MIB:>10.1f}" if "gathered_bytes" in r else f"{'-':>10}")
        )  # fmt: skip


# Activations per GPU: measured on a tiny PRX, scaled to the targets.
# The probe keeps the 1.2B's block shape: heads of 64, GeGLU 3.5 × width, 16 latent channels and patch 2
# (Flux VAE), 256 text tokens (T5Gemma's length in the study); only width and depth are small.
PROBE = {"preset": None, "hidden_size": 256, "depth": 2, "num_heads": 4, "mlp_ratio": 3.5,
         "patch_size": 2, "axes_dim": (32, 32)}  # fmt: skip
TEXT_TOKENS, TEXT_DIM = 256, 64
PROBE_GRIDS = (8, 16)  # token grid sides: 64 and 256 image tokens
# the difference of two batches is per sample: batch-independent bytes (autocast's bf16 weights) cancel
PROBE_BATCHES = (2, 4)

# The targets. No 5B PRX is published: Photoroom/PRX (configs/yamls/model/, 1a052fd) has prx_small
# (1.24B: width 1792, depth 16, 28 heads of 64) and prx_base (7.3B: width 3584, depth 24, 28 heads of 128).
# The 5B here is an assumption: prx_base narrowed to width 3072 (24 heads of 128), 5.1B parameters.
TARGETS = {
    "prx-1.2b": {"preset": "prx-1.2b"},
    "prx-5b": {"preset": None, "hidden_size": 3072, "depth": 24, "num_heads": 24, "mlp_ratio": 3.5,
               "patch_size": 2, "axes_dim": (64, 64)},
}  # fmt: skip
# (image, image tokens): the Flux VAE's latents (8× down, patch 2) at 256 and 1024 px (sweeps/prx.yaml),
# and 1024 px in pixel space, patch 32 (sweeps/prx-pixel-1024.yaml; its bottleneck embedding aside).
SHAPES = (("256px vae", 256), ("1024px pixel", 1024), ("1024px vae", 4096))
GLOBAL_BATCH = 256  # both sweeps' train.batch_size: split evenly over the processes
GIB = 2**30
CARDS = {"80GB": 81559 * MIB, "141GB": 143771 * MIB}  # what an H100 80GB and an H200 report
USABLE = 0.9  # fits: total ≤ 90% of the card; the rest for what is not counted (CUDA context, NCCL
# buffers, the allocator's fragmentation, the backward's activation gradients)


def saved_bytes(batch: int, grid: int, checkpointed: bool, probe: dict = PROBE) -> dict:
    """Bytes autograd keeps for backward in one real forward of the probe PRX under bf16 autocast:
    {"outside": embeddings, final layer and loss, "blocks": [each block's]}. Counted by saved-tensor
    hooks, each storage once, where first kept; parameters and the batch itself are left out. With
    `checkpointed` (the trainer's trainer/runtime/activations.py) a block's own saves are the
    checkpoint's, invisible here, and what it keeps is its inputs: those are counted for the block.
    The backward is run too, as training runs it."""
    from trainer.model import Denoiser, ModelConfig, build_prx
    from trainer.runtime.activations import checkpoint_blocks

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        denoiser = Denoiser(build_prx(ModelConfig(**probe), 16, TEXT_DIM))
        x = torch.randn(batch, 16, 2 * grid, 2 * grid)  # (B, 16, h, w) latents: grid² tokens of patch 2
        t, txt = torch.rand(batch), torch.randn(batch, TEXT_TOKENS, TEXT_DIM)  # (B,), (B, Lt, D_text)
    mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.bool)  # (B, Lt)
    if checkpointed:
        checkpoint_blocks(denoiser)
    skip = {v.untyped_storage().data_ptr() for v in (*denoiser.parameters(), x, t, txt, mask)}
    kept: set[int] = set()  # storages counted (all alive until the backward: addresses are unique)
    out = {"outside": 0, "blocks": [0] * len(denoiser.prx.blocks)}
    at: list = [None]  # the block running, None outside

    def count(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip | kept:
            kept.add(storage.data_ptr())
            if at[0] is None:
                out["outside"] += storage.nbytes()
            else:
                out["blocks"][at[0]] += storage.nbytes()
        return tensor

    def enter(index: int, kwargs: dict) -> None:
        at[0] = index
        if checkpointed:  # the checkpoint holds the block's inputs until its backward
            for v in kwargs.values():
                if isinstance(v, torch.Tensor):
                    count(v)

    for i, block in enumerate(denoiser.prx.blocks):
        block.register_forward_pre_hook(lambda m, a, kw, i=i: enter(i, kw), with_kwargs=True)
        block.register_forward_hook(lambda m, a, o: at.__setitem__(0, None))
    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        loss = (denoiser(x, t, txt, mask).pred.float() - x).pow(2).mean()
    loss.backward()
    return out


def activation_ratios(probe: dict = PROBE) -> dict:
    """Bytes kept per sample and per channel of width, as (constant, per image token), for one block
    ("block") and for the rest ("shared": embeddings, final layer, loss and what the blocks share),
    without checkpointing ("full") and with ("checkpointed"); "measured": the probe's bytes per sample
    {image tokens: (one block, shared)}."""
    width, depth = probe["hidden_size"], probe["depth"]
    out = {}
    for mode in ("full", "checkpointed"):
        measured = {}
        for grid in PROBE_GRIDS:
            lo, hi = (saved_bytes(b, grid, mode == "checkpointed", probe) for b in PROBE_BATCHES)
            n = PROBE_BATCHES[1] - PROBE_BATCHES[0]
            block = (hi["blocks"][-1] - lo["blocks"][-1]) / n  # the last block: nothing shared left in it
            total = (sum(hi["blocks"]) + hi["outside"] - sum(lo["blocks"]) - lo["outside"]) / n
            measured[grid * grid] = (block, total - depth * block)
        (l1, m1), (l2, m2) = measured.items()
        slopes = [(b - a) / (l2 - l1) for a, b in zip(m1, m2, strict=True)]
        out[mode] = {
            part: ((m1[k] - slopes[k] * l1) / width, slopes[k] / width)
            for k, part in enumerate(("block", "shared"))
        }
        out[mode]["measured"] = measured
    return out


def activation_bytes(
    ratios: dict, width: int, depth: int, tokens: int, batch: int, checkpointed: bool
) -> float:
    """Activations at their peak (the backward's start) for `batch` samples of `tokens` image tokens:
    what every block and the rest keep; with checkpointing, plus one block's full set, recomputed in
    the backward one block at a time."""

    def kept(mode: str, part: str) -> float:  # bytes per sample
        constant, per_token = ratios[mode][part]
        return (constant + per_token * tokens) * width

    mode = "checkpointed" if checkpointed else "full"
    per_sample = kept(mode, "shared") + depth * kept(mode, "block")
    return batch * (per_sample + (kept("full", "block") if checkpointed else 0))


def muon_bytes(denoiser: torch.nn.Module, world: int) -> int:
    """Muon's state per process under FSDP: an fp32 momentum per shard of each Muon matrix; AdamW's
    two fp32 moments (and a step count) for the rest, grouped as `build_muon` groups them."""
    from trainer.factors.optimizer import MuonConfig, muon_groups

    groups = muon_groups(MuonConfig(), denoiser)
    return sum(4 * share(p, world, True) for p in groups["muon"]) + sum(
        8 * share(p, world, True) + 4 for p in groups["adamw"]
    )


def per_gpu(ratios: dict, worlds=(8, 16)) -> list[dict]:
    """Each target at each world size and image shape under FSDP: state (AdamW; Muon beside it),
    transients, activations with and without checkpointing, in GiB, and whether they fit each card."""
    from trainer.model import Denoiser, ModelConfig, build_prx

    rows = []
    for name, sizes in TARGETS.items():
        cfg = ModelConfig(**sizes)
        with torch.device("meta"):
            model = Denoiser(build_prx(cfg, 16, 2304))  # Flux VAE latents, T5Gemma text
        dims = cfg.sizes()
        block = max(sum(p.numel() for p in b.parameters()) for b in model.prx.blocks)
        for world in worlds:
            state = projected_bytes(model, world, True, gather_bytes=2)  # bf16 gathers (autocast)
            adamw = state["param_bytes"] + state["grad_bytes"] + state["optimizer_bytes"]
            muon = adamw - state["optimizer_bytes"] + muon_bytes(model, world)
            # gathered bf16 weights, and the block in flight's gradient before its reduce-scatter:
            # bf16 as computed plus the fp32 copy reduced (MixedPrecisionPolicy reduce_dtype)
            transient = state["gathered_bytes"] + 6 * block
            batch = GLOBAL_BATCH // world
            for image, tokens in SHAPES:
                r = {"bench": "memory_per_gpu", "model": name, "params": sum(p.numel() for p in model.parameters()),
                     "width": dims["hidden_size"], "depth": dims["depth"], "world": world, "image": image,
                     "tokens": tokens, "batch": batch, "state_adamw_gib": adamw / GIB,
                     "state_muon_gib": muon / GIB, "transient_gib": transient / GIB}  # fmt: skip
                for ac, key in ((False, "full"), (True, "checkpointed")):
                    act = activation_bytes(ratios, dims["hidden_size"], dims["depth"], tokens, batch, ac)
                    total = adamw + transient + act
                    room = [USABLE * cap - adamw - transient for cap in CARDS.values()]
                    r[f"act_{key}_gib"], r[f"total_{key}_gib"] = act / GIB, total / GIB
                    r[f"fits_{key}"] = [card for card, cap in CARDS.items() if total <= USABLE * cap]
                    # the largest train.micro_batch_size that fits the 80 GB card (0: none does): a divisor
                    # of the batch (as the config asks), with the whole fp32 gradient each process keeps
                    # while micro-batches accumulate (FSDP2's unsharded grad, Sharded.accumulating)
                    fit = (room[0] - 4 * r["params"]) * batch // act
                    r[f"micro_80gb_{key}"] = max(
                        (d for d in range(1, batch + 1) if batch % d == 0 and d <= fit), default=0
                    )
                rows.append(r)
    return rows


def print_per_gpu(rows: list[dict], ratios: dict) -> None:
    per = {m: ratios[m]["measured"] for m in ("full", "checkpointed")}
    print("\nActivations kept for backward by the probe PRX (width 256, bf16 autocast), KiB per sample:")
    for mode, measured in per.items():
        print(f"  {mode:<13}" + "  ".join(f"{n} tokens: block {b / 1024:.0f}, rest {s / 1024:.0f}"
                                          for n, (b, s) in measured.items()))  # fmt: skip
    print("\nTargets: " + "; ".join(sorted({f"{r['model']} {r['params'] / 1e9:.2f}B (width {r['width']}, depth "
                                             f"{r['depth']})" for r in rows})))  # fmt: skip
    print(f"Memory per GPU under FSDP (GiB), global batch {GLOBAL_BATCH}; state = params + grads + AdamW; "
          f"fits: ≤ {USABLE:.0%} of the card; micro: largest micro-batch fitting 80 GB")  # fmt: skip
    print(f"{'model':<9}{'ranks':>5}  {'image':<13}{'tokens':>6}{'b/gpu':>6}{'state':>7}{'muon':>7}"
          f"{'trans':>7} |{'act':>7}{'total':>7} {'fits':<10}{'micro':>5} |{'act AC':>7}{'total':>7}"
          f" {'fits':<10}{'micro':>5}")  # fmt: skip
    for r in rows:
        cols = "".join(f" |{r[f'act_{k}_gib']:>7.1f}{r[f'total_{k}_gib']:>7.1f} "
                       f"{'+'.join(r[f'fits_{k}']) or 'no':<10}{r[f'micro_80gb_{k}']:>5}"
                       for k in ("full", "checkpointed"))  # fmt: skip
        print(f"{r['model']:<9}{r['world']:>5}  {r['image']:<13}{r['tokens']:>6}{r['batch']:>6}"
              f"{r['state_adamw_gib']:>7.1f}{r['state_muon_gib']:>7.1f}{r['transient_gib']:>7.1f}" + cols)  # fmt: skip


def memory_rows(base: dict) -> list[dict]:
    rows = measured(base) + projected_prx()
    print_table(rows)
    ratios = activation_ratios()
    gpu = per_gpu(ratios)
    print_per_gpu(gpu, ratios)
    measured_rows = [{"bench": "activations_per_sample", "mode": m, "probe_width": PROBE["hidden_size"],
                      "tokens": n, "block_bytes": b, "shared_bytes": sh}
                     for m in ("full", "checkpointed") for n, (b, sh) in ratios[m]["measured"].items()]  # fmt: skip
    return rows + measured_rows + gpu


if __name__ == "__main__":
    from run import BASE

    for r in memory_rows(BASE):
        print(json.dumps(r))
