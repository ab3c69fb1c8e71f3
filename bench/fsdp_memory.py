"""Memory per process of DDP and FSDP (`parallel.kind`): parameters, gradients and optimizer state.

Measured: two CPU processes (gloo) each build the trainer for a small model, take two AdamW steps
and add up the bytes of the tensors they hold — for FSDP the local shards of the DTensors. Projected:
the same sums for PRX-1.2B (built on the meta device) at 8 and 16 processes, with FSDP2's rule that
each process holds ceil(rows / world) rows of every parameter (dim 0 padded to a multiple of world);
the measured world-2 rows are projected the same way, as a check of the projection.

Both leave out activations and DDP's communication buckets. `gathered_bytes` is FSDP's transient
whole weights: the root's (embeddings, final layer) for the whole step, plus two blocks at a time
(the running one and the prefetched next), in the dtype they are gathered in (bf16 under autocast,
as on CUDA; fp32 on CPU).

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


def projected_bytes(
    denoiser: torch.nn.Module, world: int, sharded: bool, gather_bytes: int
) -> dict[str, int]:
    """`held_bytes` of one process (the busiest) for AdamW, from the parameter shapes alone; plus
    `gathered_bytes` under FSDP (module docstring). `gather_bytes`: bytes per gathered element."""

    def rows(p: torch.Tensor) -> int:  # elements of the process's share of p
        return math.ceil(p.shape[0] / world) * (p.numel() // p.shape[0]) if sharded and p.ndim else p.numel()

    params = list(denoiser.parameters())
    size = sum(rows(p) * p.element_size() for p in params)
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


def memory_rows(base: dict) -> list[dict]:
    rows = measured(base) + projected_prx()
    print_table(rows)
    return rows


if __name__ == "__main__":
    from run import BASE

    for r in memory_rows(BASE):
        print(json.dumps(r))
