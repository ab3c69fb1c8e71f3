"""How long `ablate rank` takes on a large sweep: 1,000 arms (499 deltas and the baseline at two seeds), each
with its records, two eval steps of four metrics and their cached eval resamples, as the trainer writes them.

    .venv/bin/python bench/rank_bench.py [--arms 1000] [--repeats 5]

Prints the wall time of the whole command (a fresh process each time, as a user runs it) per output
format, the median and the spread over repeats, and what importing its modules alone costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.records import EvalRecord, Job, Result, Spec, Throughput  # noqa: E402
from core.rundir import RunDir  # noqa: E402

METRICS = ("prompt_adherence", "domain_fd", "domain_mmd", "val_loss")
RESAMPLES = 1000


def write_sweep(folder: Path, deltas: int, seeds: int) -> Path:
    sweep = folder / "big.yaml"
    body = {"name": "big", "output_dir": str(folder / "runs"),
            "baseline": {"eval": {"metrics": list(METRICS[:3])}},
            "deltas": {f"d{i:04d}": {"optimizer.lr": 1e-3 * (i + 2)} for i in range(deltas)},
            "seeds": list(range(seeds)), "rank_by": list(METRICS)}  # fmt: skip
    sweep.write_text(json.dumps(body))  # JSON is YAML
    rng = np.random.default_rng(0)
    (folder / "runs").mkdir()
    (folder / "runs" / ".ablate-sweep").write_text(json.dumps({"sweep": "big"}))
    for delta in ["baseline", *body["deltas"]]:
        for seed in range(seeds):
            write_arm(RunDir(folder / "runs" / f"{delta}-s{seed}"), delta, seed, rng)
    return sweep


def write_arm(run: RunDir, delta: str, seed: int, rng: np.random.Generator) -> None:
    run.path.mkdir(parents=True)
    run.write_spec(Spec(name=run.name, delta=delta, seed=seed, hash="0" * 12, hash_version=2, sweep="big"))
    run.write_job(Job(executor="debug", job_id="1", host="elsewhere"))
    run.set_status("running", step=200, total_steps=200)
    run.set_status("done", step=200)
    run.write_result(
        Result(name=run.name, step=200, throughput=Throughput(batches_per_s=10.0 + rng.random()))
    )
    for step in (100, 200):
        metrics = {m: float(rng.random()) for m in METRICS}
        names = run.write_resamples(step, {m: rng.random(RESAMPLES) for m in METRICS})
        run.write_eval(
            EvalRecord(step=step, metrics=metrics, val_samples=64, generated_samples=96, resampled=names)
        )


def timed(command: list[str], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        out.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-2000:])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arms", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ablate = str(Path(sys.executable).with_name("ablate"))
    with tempfile.TemporaryDirectory() as tmp:
        sweep = write_sweep(Path(tmp), args.arms // 2 - 1, 2)
        print(f"ablate rank on {args.arms} arms ({args.arms // 2 - 1} deltas x 2 seeds, {len(METRICS)} metrics, "
              f"{RESAMPLES} eval resamples each), {args.repeats} runs each, wall time of a fresh process:")  # fmt: skip
        for fmt in ("json", "table"):
            times = timed([ablate, "rank", str(sweep), "--format", fmt], args.repeats)
            print(
                f"  --format {fmt:5s}  median {statistics.median(times):.2f} s  (min {min(times):.2f}, max {max(times):.2f})"
            )
        imports = timed([sys.executable, "-c", "import ablate.cli, ablate.results.rank"], args.repeats)
        print(f"  start-up and imports alone  median {statistics.median(imports):.2f} s")


if __name__ == "__main__":
    main()
