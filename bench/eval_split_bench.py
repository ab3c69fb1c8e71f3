"""Evaluation split across processes: the eval time of one arm at 1 and at 2 processes.

    python bench/eval_split_bench.py [--samples 192] [--sample-steps 8]

Each process samples its share of the eval prompts and extracts their features; the features are
gathered and the metrics computed on the first process. A tiny demo-domain arm (the trainer's real
code: sampler, feature extractor, metrics) trains 2 steps and evaluates once, through submitit's
local executor as `ablate run` launches it; the number is result.json's `timings.eval_s`. A first
run at 1 process fills the eval cache (the attribute net, the reference features) and is not
counted. The processes share this machine's cores: 1 process uses 2 threads, 2 processes 1 each.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import submitit
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer import job  # noqa: E402

CONFIG = {
    "seed": 0,
    "model": {"preset": "tiny"},
    "data": {"kind": "synthetic", "resolution": 16, "caption": "long", "num_train": 512, "num_val": 256},
    "text_encoder": {"kind": "tiny-t5", "d_model": 32, "max_length": 32},
    "tokenizer": {"kind": "pixel"},
    "optimizer": {"kind": "adamw", "lr": 1e-3},
    "precision": {"kind": "fp32"},
    "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1},
    "checkpoint": {"every": 1000},
    "log": {"every": 1},
}


def eval_seconds(folder: Path, name: str, processes: int, ev: dict) -> float:
    run = folder / name
    run.mkdir()
    cfg = {**CONFIG, "eval": ev, "train": {**CONFIG["train"], "threads": 2 // processes}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    executor = submitit.LocalExecutor(folder=folder / "submitit")
    executor.update_parameters(tasks_per_node=processes, timeout_min=30)
    executor.submit(job.run, str(run)).results()
    return json.loads((run / "result.json").read_text())["timings"]["eval_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=192)
    parser.add_argument("--sample-steps", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ev = {"every": 2, "caption": "long", "batch_size": 32, "samples": args.samples,
              "sample_steps": args.sample_steps, "metrics": ["domain_fd", "prompt_adherence"],
              "cache_dir": str(folder / "eval-cache"), "resamples": 0}  # fmt: skip
        eval_seconds(folder, "warm-up", 1, ev)
        one = eval_seconds(folder, "one", 1, ev)
        two = eval_seconds(folder, "two", 2, ev)
    print(json.dumps({"bench": "eval split", "samples": args.samples, "sample_steps": args.sample_steps,
                      "eval_s_1_process": round(one, 2), "eval_s_2_processes": round(two, 2),
                      "ratio": round(one / two, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
