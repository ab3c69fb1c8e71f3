"""Process group set-up: one process per device, from submitit, torchrun or `accelerate launch`.

All three export the env:// variables (RANK, WORLD_SIZE, MASTER_ADDR, …) or, for submitit,
let us export them; a single process needs none of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank (a decision only the main process may take, e.g. which checkpoint)."""
        if self.world > 1:
            box = [obj]
            tdist.broadcast_object_list(box, src=0)
            return box[0]
        return obj

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
        return x


def _export_submitit_env() -> None:
    """Inside a submitit job of several tasks, export env:// variables for torch.distributed."""
    if "RANK" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def gpu_of(local_rank: int, gpus: int) -> int:
    """The GPU a task uses: every task of a node sees all its GPUs; task LOCAL_RANK takes that one."""
    return local_rank % gpus


def init() -> Dist:
    _export_submitit_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", gpu_of(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, device)


def shutdown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()
