"""`make bench`: how long a checkpoint save stops the job, measured here and projected for PRX-1.2B.

Measured on a few hundred MB of fp32 tensors shaped like PRX-1.2B's block weights (weights, two AdamW
moments, an EMA shadow), each the median of --repeats:
- the old save (before async saves): safetensors' writer, torch.save, then every file read back
  for SHA-256, then flushed; all of it while every other process waited at the barrier;
- staging: the copy into host buffers kept from the last save, the only part the job now waits for
  (`Stager`; on a GPU a copy into pinned memory, `--device cuda` measures that);
- the new write, in the background: `checkpoint.save` itself (streamed safetensors, torch.save, XXH3
  as the bytes pass, flushed, renamed into place).
Projected: the blocking seconds per save of each path for sweeps/prx.yaml's PRX-1.2B (its parameters
counted from the real config, `state_bytes`), without and with the EMA. The gather of sharded state,
the same in both, is left out.

    python bench/save_bench.py [--mb 400] [--repeats 3] [--device cpu|cuda] [--dir runs/bench]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ablate.sweep.expand import expand
from ablate.sweep.schema import load_sweep
from core.atomic import commit_dir
from core.rundir import RunDir
from trainer.runtime import checkpoint
from trainer.runtime.async_save import Stager, nbytes, state_bytes

GB = 1e9
SIDE = 1792  # PRX-1.2B's hidden size: its block matrices are 1792 wide


def model_like(mb: int, device: str) -> tuple[dict, dict]:
    """(weights, state) of about `mb` MB: weights, AdamW's two moments and an EMA shadow per matrix."""
    n = max(1, round(mb * 1e6 / (4 * SIDE * SIDE * 4)))
    weights = {f"prx.blocks.{i}.weight": torch.randn(SIDE, SIDE, device=device) for i in range(n)}
    moments = {
        i: {"exp_avg": torch.randn_like(w), "exp_avg_sq": torch.rand_like(w)}
        for i, w in enumerate(weights.values())
    }
    state = {"optimizer": {"adamw": {"state": moments, "param_groups": [{"lr": 1e-4, "params": list(range(n))}]}},
             "ema": {"shadow": {k: w.clone() for k, w in weights.items()}}, "step": 1}  # fmt: skip
    return weights, state


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def old_save(folder: Path, weights: dict, state: dict) -> tuple[float, float]:
    """(write s, SHA-256 re-read s) of the save as it was: the writers, the re-read, the flush."""
    shutil.rmtree(folder, ignore_errors=True)
    tmp = folder / ".tmp"
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    save_file(weights, tmp / "weights.safetensors")
    torch.save(state, tmp / "state.pt")
    t1 = time.perf_counter()
    for p in sorted(tmp.iterdir()):
        with p.open("rb") as f:
            hashlib.file_digest(f, "sha256").hexdigest()
    t2 = time.perf_counter()
    commit_dir(tmp, folder / "done")
    return time.perf_counter() - t2 + t1 - t0, t2 - t1


def measure(mb: int, repeats: int, device: str, folder: Path) -> dict:
    weights, state = model_like(mb, device)
    size = nbytes((weights, state))
    stager = Stager()
    t0 = time.perf_counter()
    host_w, host_s = stager.stage((weights, state))  # the first save allocates the buffers
    first = time.perf_counter() - t0
    staging = median_s(lambda: stager.stage((weights, state)), repeats)
    run, olds, news = RunDir(folder / "new"), [], []
    for step in range(repeats):  # alternately: a busy spell of the machine hits both paths
        olds.append(old_save(folder / "old", host_w, host_s))
        news.append(median_s(lambda: checkpoint.save(run, step, b"{}", host_w, host_s, keep=1), 1))  # noqa: B023
    new = statistics.median(news)
    return {
        "bench": "checkpoint_save", "device": device, "bytes": size, "threads": torch.get_num_threads(),
        "staging_first_GBps": size / first / GB, "staging_GBps": size / staging / GB,
        "old_write_GBps": size / statistics.median(o[0] for o in olds) / GB,
        "sha256_reread_GBps": size / statistics.median(o[1] for o in olds) / GB,
        "new_write_GBps": size / new / GB,
    }  # fmt: skip


def projected(row: dict) -> list[dict]:
    """Blocking and background seconds per save for sweeps/prx.yaml's baseline and its EMA arm."""
    specs = {s.delta: s for s in expand(load_sweep(Path(__file__).parent.parent / "sweeps" / "prx.yaml"))}
    out = []
    for arm in ("baseline", "ema"):
        b = state_bytes(specs[arm].train)
        old = b.total / GB / row["old_write_GBps"] + b.total / GB / row["sha256_reread_GBps"]
        out.append(
            {"bench": "checkpoint_save_projected", "model": "prx-1.2b", "arm": arm, "parameters": b.parameters,
             "weights_GB": b.weights / GB, "optimizer_GB": b.optimizer / GB, "ema_GB": b.ema / GB,
             "old_blocking_s": old, "new_blocking_s": b.total / GB / row["staging_GBps"],
             "new_background_s": b.total / GB / row["new_write_GBps"]}
        )  # fmt: skip
    return out


def report(row: dict, rows: list[dict]) -> None:
    print(f"\nmeasured on {row['bytes'] / GB:.2f} GB of tensors ({row['device']}, {row['threads']} threads):")
    print(
        f"  old save: write {row['old_write_GBps']:.2f} GB/s, then SHA-256 re-read {row['sha256_reread_GBps']:.2f} GB/s"
    )
    print(
        f"  staging: {row['staging_GBps']:.2f} GB/s into kept buffers ({row['staging_first_GBps']:.2f} GB/s the first time)"
    )
    print(f"  new write (background): {row['new_write_GBps']:.2f} GB/s, XXH3 while writing")
    b = rows[0]
    print(f"\nPRX-1.2B ({b['parameters'] / 1e9:.2f} B parameters): weights {b['weights_GB']:.1f} GB, AdamW "
          f"{b['optimizer_GB']:.1f} GB, EMA {rows[1]['ema_GB']:.1f} GB")  # fmt: skip
    print(f"{'arm':<10}{'GB':>7}{'old blocking s':>16}{'new blocking s':>16}{'new background s':>18}")
    for r in rows:
        total = r["weights_GB"] + r["optimizer_GB"] + r["ema_GB"]
        print(f"{r['arm']:<10}{total:>7.1f}{r['old_blocking_s']:>16.1f}{r['new_blocking_s']:>16.1f}"
              f"{r['new_background_s']:>18.1f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=400, help="MB of tensors measured")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="where the state lives: cpu, or cuda (pinned staging)")
    ap.add_argument("--dir", default="runs/bench", help="where the test checkpoints are written")
    ap.add_argument("--out", default="runs/bench/save.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        row = measure(args.mb, args.repeats, args.device, Path(tmp))
    rows = projected(row)
    print(json.dumps(row))
    report(row, rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps([row, *rows], indent=2))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
