"""One process of the sharded-Muon tests (test_optim.py): ShardedMuon over a few matrices, every rank
given the same random gradients (as DDP leaves them), or FSDPMuon over the same matrices as row-sharded
DTensors (as FSDP2 leaves them); Newton–Schulz calls counted. Imports no diffusers, so a spawned
process starts in about a second."""

from __future__ import annotations

import torch
import torch.distributed as tdist

# repeated shapes (a share holds several), tall, wide and square (torch transposes tall ones); rows
# that do not split evenly over 3 or 4 processes, and fewer rows than processes (empty shards)
SHAPES = [(24, 16), (16, 24), (16, 16), (16, 16), (32, 8), (8, 8), (20, 12), (2, 12)]
STEPS = 3
HYPER = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.9, "nesterov": True, "ns_steps": 5}


def matrices() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in SHAPES]


def set_grads(params: list[torch.nn.Parameter], step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def count_newton_schulz(module) -> list[tuple[int, ...]]:
    """Records the shape of every matrix torch's Newton–Schulz is called on from `module`."""
    calls, newton_schulz = [], module._zeropower_via_newtonschulz

    def counted(update, *args):
        calls.append(tuple(update.shape))
        return newton_schulz(update, *args)

    module._zeropower_via_newtonschulz = counted
    return calls


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Steps ShardedMuon STEPS times; saves its weights, state dict, split and Newton–Schulz calls."""
    torch.set_num_threads(1)
    from trainer.factors import muon
    from trainer.runtime.dist import Dist

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    calls = count_newton_schulz(muon)
    params = matrices()
    opt = muon.ShardedMuon(params, Dist(rank, world, rank, torch.device("cpu")), **HYPER)
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


def run_fsdp(rank: int, world: int, replicas: int, init_file: str, out_dir: str) -> None:
    """Steps FSDPMuon STEPS times on the matrices sharded by rows over `world` processes (HSDP:
    `replicas` groups, each sharding over world/replicas), each process given its rows of the same
    gradients; saves the whole weights, the optimizer state as checkpoints gather it, this process's
    rows per matrix, the split and the Newton–Schulz calls."""
    torch.set_num_threads(1)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from trainer.factors import muon

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    if replicas == 1:
        mesh, places = init_device_mesh("cpu", (world,)), [Shard(0)]
    else:
        mesh = init_device_mesh("cpu", (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))
        places = [Replicate(), Shard(0)]

    def shard(whole: torch.Tensor) -> torch.Tensor:  # this process's rows, cut locally (FSDP2's split)
        return distribute_tensor(whole, mesh, places, src_data_rank=None)

    calls = count_newton_schulz(muon)
    model = torch.nn.Module()
    model.mats = torch.nn.ParameterList([torch.nn.Parameter(shard(p.detach())) for p in matrices()])
    params = list(model.mats)
    opt = muon.FSDPMuon(params, **HYPER)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 + step)  # set_grads' draws, sharded
        for p in params:
            p.grad = shard(torch.randn(p.shape, generator=g))
        opt.step()
    state = get_optimizer_state_dict(
        model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    torch.save(
        {
            "params": [p.detach().full_tensor() for p in params],
            "state": state,
            "rows": [p.to_local().shape[0] for p in params],
            "owner": opt.owner,
            "calls": calls,
        },
        f"{out_dir}/rank{rank}.pt",
    )
    tdist.destroy_process_group()
