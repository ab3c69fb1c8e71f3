"""Host memory per process of parquet training data, at 1 and 2 processes: rows read a row group at a
time (trainer/data/rows.py) against the whole file read into Python dicts (the reader before it, kept
here for the comparison: `pd.read_parquet(path).to_dict("records")`).

The bench writes a synthetic parquet once to a temporary folder: ROWS rows, each a unique 32x32 BMP
of random pixels (3 KB) and a caption, 64 rows per row group, images uncompressed and without
statistics (min/max of image bytes would put two images per row group into the footer). For each reader
and world size, W processes run at once. Each builds the training set and reads its share of STEPS
global batches of BATCH through a DataLoader over the step sampler, as the trainer does. It then
reports its RSS after imports, its peak RSS (getrusage), the seconds per step and the row groups it
decoded. Last, the row-group reader alone on a file of a quarter of the rows: its memory does not
depend on the dataset's size.

    python bench/data_memory.py [--rows 100000] [--steps 50] [--batch 64]   (part of `make bench`)
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MIB = 2**20
SIDE, GROUP, NUM_VAL = 32, 64, 256


def write_parquet(path: Path, rows: int) -> None:
    """ROWS unique BMPs (a fixed header, random pixels) and captions, written 10k rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE)).save(buf, format="BMP")
    header = buf.getvalue()[: -SIDE * SIDE * 3]  # 96-byte rows need no padding
    rng = np.random.default_rng(0)
    schema = pa.schema([("image", pa.binary()), ("caption", pa.string())])
    with pq.ParquetWriter(path, schema, compression={"image": "none", "caption": "snappy"},
                          use_dictionary=["caption"], write_statistics=["caption"]) as out:  # fmt: skip
        for lo in range(0, rows, 10_000):
            pixels = rng.integers(0, 256, (min(rows, lo + 10_000) - lo, SIDE * SIDE * 3), dtype=np.uint8)
            images = [header + p.tobytes() for p in pixels]
            captions = [f"a photo of thing number {i}" for i in range(lo, lo + len(images))]
            out.write_table(pa.table({"image": images, "caption": captions}, schema=schema), GROUP)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def whole_file(path: str):
    """The reader before trainer/data/rows.py: every row a Python dict, image bytes included."""
    import pandas as pd

    from trainer.data.datasets import ImageTextDataset, open_encoded

    rows = pd.read_parquet(path).to_dict("records")
    return ImageTextDataset(rows[:-NUM_VAL], lambda row: open_encoded(row["image"]), SIDE, "caption", None)


def worker(reader: str, path: str, rank: int, world: int, steps: int, batch: int) -> dict:
    import pandas  # noqa: F401 - both readers' libraries imported before the first measurement
    import pyarrow.dataset  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    from PIL import BmpImagePlugin  # noqa: F401
    from torch.utils.data import DataLoader

    from trainer.data.datasets import ParquetConfig, build_parquet
    from trainer.data.sampling import StepBatchSampler

    start = rss()
    t0 = time.perf_counter()
    if reader == "row groups":
        train, _ = build_parquet(
            ParquetConfig(path=path, caption="caption", resolution=SIDE, num_val=NUM_VAL)
        )
    else:
        train = whole_file(path)
    setup = time.perf_counter() - t0
    sampler = StepBatchSampler(len(train), batch, 0, 0, steps, rank, world)
    t0 = time.perf_counter()
    seen = sum(len(b["caption"]) for b in DataLoader(train, batch_sampler=sampler))
    held = getattr(train.rows, "held", None)
    return {
        "reader": reader,
        "world": world,
        "rank": rank,
        "samples": seen,
        "rss_after_imports_mib": round(start / MIB, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB, 1),
        "setup_s": round(setup, 2),
        "ms_per_step": round((time.perf_counter() - t0) / steps * 1000, 1),
        "row_groups_decoded": held.decoded if held else None,
        "row_groups_held_peak": held.peak if held else None,
    }


def measure(path: Path, reader: str, world: int, steps: int, batch: int) -> list[dict]:
    """W processes at once, each reading its share; their reports."""
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        reader,
        str(path),
        "--steps",
        str(steps),
        "--batch",
        str(batch),
    ]
    procs = [
        subprocess.Popen([*cmd, "--rank", str(r), "--world", str(world)], stdout=subprocess.PIPE, text=True)
        for r in range(world)
    ]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"data_memory worker failed ({reader}, world {world}): exit {p.returncode}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--worker", nargs=2, metavar=("READER", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.rank, args.world, args.steps, args.batch)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.parquet"
        t0 = time.perf_counter()
        write_parquet(path, args.rows)
        print(f"# {args.rows} rows, {path.stat().st_size / MIB:.0f} MiB, {GROUP} rows per row group, "
              f"written in {time.perf_counter() - t0:.1f} s; {args.steps} steps of global batch {args.batch}")  # fmt: skip
        rows = [r for reader in ("row groups", "whole file") for world in (1, 2)
                for r in measure(path, reader, world, args.steps, args.batch)]  # fmt: skip
        quarter = Path(tmp) / "quarter.parquet"  # the row-group reader's memory does not grow with the rows
        write_parquet(quarter, args.rows // 4)
        rows += [{**r, "reader": f"row groups, {args.rows // 4} rows"}
                 for r in measure(quarter, "row groups", 1, args.steps, args.batch)]  # fmt: skip
    print(
        "| reader | processes | rank | peak RSS MiB | after imports MiB | data MiB | setup s | ms/step | row groups decoded (peak held) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        groups = (
            "—"
            if r["row_groups_decoded"] is None
            else f"{r['row_groups_decoded']} ({r['row_groups_held_peak']})"
        )
        print(f"| {r['reader']} | {r['world']} | {r['rank']} | {r['peak_rss_mib']:.0f} | "
              f"{r['rss_after_imports_mib']:.0f} | {r['peak_rss_mib'] - r['rss_after_imports_mib']:.0f} | "
              f"{r['setup_s']} | {r['ms_per_step']} | {groups} |")  # fmt: skip
    out = Path("runs/bench/data_memory.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
