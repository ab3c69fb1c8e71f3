"""One process of the sharded-Muon test (test_optim.py): ShardedMuon over a few matrices, every rank
given the same random gradients (as DDP leaves them), its Newton–Schulz calls counted. Imports no
diffusers, so a spawned process starts in about a second."""

from __future__ import annotations

import torch
import torch.distributed as tdist

# repeated shapes (a share holds several), tall, wide and square (torch transposes tall ones)
SHAPES = [(24, 16), (16, 24), (16, 16), (16, 16), (32, 8), (8, 8), (20, 12)]
STEPS = 3
HYPER = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.9, "nesterov": True, "ns_steps": 5}


def matrices() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in SHAPES]


def set_grads(params: list[torch.nn.Parameter], step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Steps ShardedMuon STEPS times; saves its weights, state dict, split and Newton–Schulz calls."""
    torch.set_num_threads(1)
    from trainer.factors import optimizer as optim
    from trainer.runtime.dist import Dist

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    calls, newton_schulz = [], optim._zeropower_via_newtonschulz

    def counted(update, *args):
        calls.append(tuple(update.shape))
        return newton_schulz(update, *args)

    optim._zeropower_via_newtonschulz = counted
    params = matrices()
    opt = optim.ShardedMuon(params, Dist(rank, world, rank, torch.device("cpu")), **HYPER)
    for step in range(STEPS):
        set_grads(params, step)
        opt.step()
    torch.save(
        {
            "params": [p.detach() for p in params],
            "state": opt.state_dict(),
            "owner": opt.owner,
            "calls": calls,
        },
        f"{out_dir}/rank{rank}.pt",
    )
    tdist.destroy_process_group()
