"""Helpers shared by the trainer tests (a unique module name: test files import it directly)."""

import json
import os
import socket

from ablate.sweep.expand import merge as deep_merge
from core.rundir import RunDir

# The demo's baseline at test size: real code paths, seconds per run.
TINY = {
    "seed": 0,
    "model": {"preset": "tiny"},
    "data": {"kind": "synthetic", "resolution": 16, "caption": "long", "num_train": 512, "num_val": 16},
    "text_encoder": {"kind": "tiny-t5", "d_model": 32, "max_length": 32},
    "tokenizer": {"kind": "pixel"},
    "optimizer": {"kind": "adamw", "lr": 1e-3},
    "precision": {"kind": "fp32"},
    "train": {"steps": 8, "batch_size": 4, "warmup_steps": 2, "threads": 1},
    "checkpoint": {"every": 4},
    "eval": {"every": 4, "caption": "long", "batch_size": 8},
    "log": {"every": 2},
}


def merge(base: dict, over: dict) -> dict:
    """`base` with `over` applied exactly as a sweep's delta is (a new `kind` replaces the component whole)."""
    return deep_merge(base, over)[0]


def logged_losses(run_dir):
    return [json.loads(ln)["loss"] for ln in (run_dir / "log.jsonl").read_text().splitlines()]


def crash_at(step: int):
    """A context in which `Trainer.train_step` raises KeyboardInterrupt at `step`: the job is killed mid-run."""
    import contextlib

    from trainer.train import Trainer

    @contextlib.contextmanager
    def patched():
        real_step = Trainer.train_step

        def crashing(self, s, batch):
            if s == step:
                raise KeyboardInterrupt
            return real_step(self, s, batch)

        Trainer.train_step = crashing
        try:
            yield
        finally:
            Trainer.train_step = real_step

    return patched()


def metrics_by_step(run_dir) -> dict[int, dict[str, float]]:
    """{step: metrics} from the run folder's eval/step_N.json (the one metrics channel)."""
    return RunDir(run_dir).metrics_by_step()


def final_metrics(run_dir) -> dict[str, float]:
    """The metrics of the run's last evaluated step."""
    by_step = metrics_by_step(run_dir)
    return by_step[max(by_step)]


def _task(rank: int, world: int, ports: list[int], run_dirs: list[str]) -> None:
    """One process of a job per run folder, given the env:// variables torchrun (or submitit) exports."""
    import torch

    from trainer import job

    torch.set_num_threads(1)
    for port, run_dir in zip(ports, run_dirs, strict=True):  # a fresh rendezvous per job
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))  # fmt: skip
        job.run(run_dir)


def run_processes(*run_dirs, world: int = 2) -> None:
    """job.run of each folder in turn, in `world` forked processes (gloo): they start with torch, diffusers
    and transformers imported (a submitit task imports them again, ~10 s a process on two cores), and
    run every folder without starting again. Raises a task's error."""
    import torch

    sockets = [socket.socket() for _ in run_dirs]
    for s in sockets:  # held open together: distinct free ports
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    args = (world, ports, [str(d) for d in run_dirs])
    torch.multiprocessing.start_processes(_task, args=args, nprocs=world, start_method="fork")
