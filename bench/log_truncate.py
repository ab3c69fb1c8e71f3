"""Peak memory and time of cutting log.jsonl when a run resumes (`RunDir.truncate_log`), against the
reader before it (the whole log parsed into rows and written again, kept here for the comparison).

The bench writes a log.jsonl of about --mb MB once, rows shaped as the trainer logs them (every
field of `LogRow`, ~260 bytes a row), ending with a torn line as a kill mid-write leaves it. For each
reader and each resume point, a fresh process cuts a fresh copy of it and reports its RSS after
imports, its peak RSS (getrusage) and the seconds the cut took. The resume points: at the last
checkpoint (the rows of the last 1,000 steps dropped, the usual case) and a restart from step 0
(every row dropped: no checkpoint verified).

    python bench/log_truncate.py [--mb 477] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1e6
ROW = {"step": 0, "loss": 0.123456789, "lr": 9.87654321e-05, "grad_norm": 0.2345678901,
       "batches_per_s": 3.9512345678, "samples_per_s": 1011.51234567, "data_s": 0.0123456789,
       "compute_s": 0.2456789012, "eta_s": 12345.678901, "time": "2026-01-01T00:00:00+00:00"}  # fmt: skip


def write_log(path: Path, mb: float) -> int:
    """About `mb` MB of log rows, steps 1…N, then a torn line; returns N."""
    head, tail = json.dumps({**ROW, "step": "STEP"}).split('"STEP"')
    rows = int(mb * MB / len(f"{head}1000000{tail}\n"))
    with path.open("w") as f:
        for start in range(1, rows + 1, 100_000):
            f.write("".join(f"{head}{i}{tail}\n" for i in range(start, min(start + 100_000, rows + 1))))
        f.write(f'{{"step": {rows + 1}, "loss": 0.1')
    return rows


def old_truncate(run, step: int) -> int:
    """The cut before: every line parsed into a row, the rows kept written again (atomically)."""
    from core.atomic import atomic_write

    lines = [line for line in run.log.read_bytes().splitlines() if line.strip()]
    rows = run.log_rows()
    kept = [r for r in rows if r.step <= step]
    atomic_write(run.log, "".join(json.dumps(r.to_json()) + "\n" for r in kept))
    return len(lines) - len(rows)


def child(reader: str, step: int, folder: str) -> None:
    """One cut in this process: prints its RSS after imports, its peak and its seconds, as JSON."""
    from core.rundir import RunDir

    run = RunDir(folder)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    torn = old_truncate(run, step) if reader == "old" else run.truncate_log(step)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rss_after_imports_mb": before * 1024 / MB, "peak_rss_mb": peak * 1024 / MB,
                      "seconds": seconds, "torn": torn, "size_after_mb": run.log.stat().st_size / MB}))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=477.0, help="size of the log (the issue's was 477 MB)")
    p.add_argument("--dir", type=Path, default=None, help="where to write it (default: a temporary folder)")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="log-truncate-", dir=args.dir))
    try:
        source = root / "source.jsonl"
        rows = write_log(source, args.mb)
        print(f"log.jsonl: {source.stat().st_size / MB:.0f} MB, {rows:,} rows and a torn line", flush=True)
        results = []
        for where, step in (("resume at the last checkpoint", rows - 1000), ("restart from step 0", 0)):
            for reader, label in (("old", "old: parsed whole, rewritten"), ("new", "new: cut from the end")):
                run = root / "run"
                run.mkdir(exist_ok=True)
                shutil.copyfile(source, run / "log.jsonl")
                cmd = [sys.executable, __file__, "--child", reader, str(step), str(run)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                found = {"resume": where, "reader": label, **json.loads(out)}
                results.append(found)
                print(f"{where:31s} {label:30s} peak RSS {found['peak_rss_mb']:7.0f} MB "
                      f"(after imports {found['rss_after_imports_mb']:.0f} MB)  {found['seconds']:6.2f} s",
                      flush=True)  # fmt: skip
        print(json.dumps({"log_mb": source.stat().st_size / MB, "rows": rows, "results": results}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
