"""`make bench`: what a checkpoint costs an FSDP arm, gathered whole by rank 0 against DCP shards.

Two gloo processes on this CPU hold a sharded PRX (width 512, depth 8: 48 M parameters, 193 MB fp32,
the meta-init test's large model) with AdamW state and an EMA: 0.77 GB of training state, half on
each. The real `Checkpointer` saves and resumes it both ways, one after the other in one run:
- whole (the format before sharded checkpoints): weights, optimizer state and EMA gathered onto rank
  0's CPU, staged and written there by one process; on resume every process reads the whole files;
- sharded (trainer/runtime/sharded.py): each process stages its own shards and writes them with DCP.
Each figure is the median of --repeats saves after one untimed save of each kind (DCP's first call,
the staging buffers' allocation) (rank 0's clock; `wait` = what the job stops for,
`write` = the background write until the checkpoint is complete, `resume` = verification and
loading, on every process), and rank 0's peak RSS growth over the run.

    python bench/sharded_save.py [--repeats 3] [--dir runs/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch

LARGE = dict(
    preset=None, hidden_size=512, depth=8, num_heads=8, mlp_ratio=3.5, patch_size=2, axes_dim=(32, 32)
)


def _held(dist):
    """A sharded denoiser, AdamW with its state, and an EMA, as the trainer holds them."""
    from trainer.factors.ema import EMAConfig, ModelEMA
    from trainer.factors.optimizer import Optimizers
    from trainer.factors.precision import Precision
    from trainer.model import Denoiser, ModelConfig, build_prx
    from trainer.runtime.checkpoint import Held
    from trainer.runtime.parallel import FSDPConfig, build_fsdp

    torch.manual_seed(0)
    den = Denoiser(build_prx(ModelConfig(**LARGE), 3, 32))
    layout = build_fsdp(FSDPConfig(), den, dist, Precision(torch.float32, False, "cpu"))
    adamw = torch.optim.AdamW(den.parameters(), lr=1e-4)
    for p in den.parameters():
        p.grad = torch.randn_like(p)
    adamw.step()
    ema = ModelEMA(EMAConfig(decay=0.9), den)
    return Held(den, layout, Optimizers(adamw=adamw), ema, dist)


def _task(rank: int, world: int, port: int, folder: str, repeats: int, out: str) -> None:
    from core.rundir import RunDir
    from trainer.runtime import dist as distributed
    from trainer.runtime.checkpoint import CheckpointConfig, Checkpointer

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))  # fmt: skip
    dist = distributed.init()
    held = _held(dist)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = {}
    for kind in ("sharded", "whole"):  # sharded first: peak RSS only grows, and the whole save needs more
        # the Sharded layout saving the way it used to (whole), or in shards
        held.parallel.sharded = kind == "sharded"
        run = RunDir(Path(folder) / kind)
        run.path.mkdir(parents=True, exist_ok=True)
        times: dict[str, list[float]] = {"wait": [], "write": [], "resume": []}
        # one Checkpointer across the saves, as the trainer keeps one (and its staging buffers)
        ckpt = Checkpointer(CheckpointConfig(every=1, keep=1), run, 10**6, 0, held)
        ckpt.save(0, {})  # untimed: first-call costs, the staging buffers' allocation
        ckpt.wait()
        for i in range(repeats):
            t0 = time.perf_counter()
            ckpt.save(i + 1, {})
            t1 = time.perf_counter()
            ckpt.wait()
            t2 = time.perf_counter()
            ckpt.resume(lambda _: None)
            dist.wait_for_main()
            times["wait"].append(t1 - t0)
            times["write"].append(t2 - t1)
            times["resume"].append(time.perf_counter() - t2)
        size = sum(f.stat().st_size for f in run.checkpoints.rglob("*") if f.is_file())
        rows[kind] = {k: statistics.median(v) for k, v in times.items()}
        rows[kind].update(
            bytes=size, peak_rss_growth_mb=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        )
    if dist.main:
        Path(out).write_text(json.dumps(rows))
    distributed.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default="runs/bench")
    args = ap.parse_args()
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="sharded-save-", dir=args.dir)
    out = Path(folder) / "rows.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        torch.multiprocessing.start_processes(
            _task, args=(2, port, folder, args.repeats, str(out)), nprocs=2, start_method="spawn"
        )
        rows = json.loads(out.read_text())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result = {"processes": 2, "repeats": args.repeats, **rows}
    for kind, row in rows.items():
        print(json.dumps({"bench": "sharded_save", "kind": kind, **{k: round(v, 3) for k, v in row.items()}}))
    (Path(args.dir) / "sharded_save.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
