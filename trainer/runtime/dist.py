"""Process group set-up: one process per device, from submitit, torchrun or `accelerate launch`.

All three export the env:// variables (RANK, WORLD_SIZE, MASTER_ADDR, …) or, for submitit,
let us export them; a single process needs none of them.

Two timeouts (`train.collective_timeout_s`, `train.collective_timeout_long_s`): every collective of the
default group fails after the short one, so a dead process or node stops the job within minutes instead
of holding every GPU. Where the others wait for a phase only the main process runs (writing or verifying a
checkpoint, computing the metrics and the first eval's reference features), they wait in `wait_for_main`
or `broadcast_object`, on a gloo group of their own made with the long timeout: a barrier there holds no
GPU stream, and the short timeout never sees the main process's long phase. A sharded checkpoint is
written by every process in a background thread whose collectives (DCP's plan, the manifest's checksums)
run on a third group, `saving`, so they never interleave with the training thread's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    long: Any = None  # the long-timeout process group (`init`); None: the default group's timeout
    saving: Any = (
        None  # a gloo group for the checkpoint writer's thread alone (its collectives run beside training's)
    )

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wait_for_main(self) -> None:
        """Every process waits here, under the long timeout, until the main process has finished a phase
        it runs alone (the others would otherwise wait for it in the next collective, under the short one)."""
        if self.world > 1:
            tdist.barrier(group=self.long)

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank (a decision only the main process may take, e.g. which checkpoint,
        after verifying it: under the long timeout)."""
        if self.world > 1:
            box = [obj]
            tdist.broadcast_object_list(box, src=0, group=self.long)
            return box[0]
        return obj

    def gather_object(self, obj, group: Any = None) -> list:
        """Every rank's `obj`, in rank order, on every rank (on `group`; default the long-timeout one)."""
        if self.world > 1:
            box: list = [None] * self.world
            tdist.all_gather_object(box, obj, group=group if group is not None else self.long)
            return box
        return [obj]

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


def init(timeout_s: float = 600, long_timeout_s: float = 1800) -> Dist:
    """This process's place, its device, and (with several processes) the default process group, whose
    collectives time out after `timeout_s`, and a gloo group timing out after `long_timeout_s`."""
    _export_submitit_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", gpu_of(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    long = saving = None
    if world > 1:
        if not tdist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            tdist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        long = tdist.new_group(backend="gloo", timeout=timedelta(seconds=long_timeout_s))
        saving = tdist.new_group(backend="gloo", timeout=timedelta(seconds=long_timeout_s))
    return Dist(rank, world, local_rank, device, long, saving)


def shutdown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()
