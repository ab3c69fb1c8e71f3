"""What the train step's per-sample draws (trainer/draws.py) cost against one batched draw, at the study's shapes.

    python bench/draws.py                   # CPU, one thread
    python bench/draws.py --device cuda     # on a GPU

Per step the trainer draws, for each of its `b` samples: t (a normal and two uniforms), caption
dropout (a uniform), the flow noise and, for a Gaussian autoencoder, the posterior ε (each the
sample's latent shape), and for TREAD/SPRINT one uniform per token. Three ways are timed:

- `per_sample`: the trainer's way, one generator re-seeded per sample and stream (keyed by seed,
  step and global sample index), each process drawing only its own rows;
- `batched`: one generator per step, the process's rows drawn at once (the floor: the same numbers
  of values, but dependent on the process's share of the batch);
- `global_sliced`: the scheme it replaced, every process drawing the whole global batch of
  `b × world` rows from a (seed, step) generator and keeping its slice (`--world`, default 16).

Prints one JSON object per line: shape, b, milliseconds per step for each way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.draws import Draws  # noqa: E402

SHAPES = {  # name → (per-sample tensor shape of noise and posterior ε, tokens routed, whether a posterior)
    "latent-256px": ((16, 32, 32), 256, True),  # Flux VAE latents, patch 2: 16×16 tokens
    "pixel-1024px": ((3, 1024, 1024), 1024, False),  # pixels, patch 32: 32×32 tokens, no posterior
}


def per_sample(b: int, shape: tuple, tokens: int, posterior: bool, device: torch.device) -> None:
    draws = Draws.of_rank(0, 7, 3, b, device)
    draws.normal("t.logit", device="cpu"), draws.uniform("t.uniform", (2,), device="cpu")
    draws.uniform("caption_dropout", device="cpu")
    draws.normal("noise", shape)
    if posterior:
        draws.normal("posterior", shape)
    draws.uniform("route", (tokens,))


def batched(rows: int, shape: tuple, tokens: int, posterior: bool, device: torch.device) -> None:
    cpu, gen = torch.Generator().manual_seed(7), torch.Generator(device).manual_seed(7)
    torch.randn(rows, generator=cpu), torch.rand(rows, 2, generator=cpu), torch.rand(rows, generator=cpu)
    torch.randn(rows, *shape, generator=gen, device=device)
    if posterior:
        torch.randn(rows, *shape, generator=gen, device=device)
    torch.rand(rows, tokens, generator=gen, device=device)


def timed(fn, args: tuple, device: torch.device, repeats: int) -> float:
    """Median milliseconds of `fn(*args)` over `repeats` runs after one warm-up."""
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1000 * (time.perf_counter() - t0))
    return sorted(times[1:])[repeats // 2]


def measure(name: str, b: int, world: int, device: torch.device, repeats: int, limit_gb: float) -> dict:
    shape, tokens, posterior = SHAPES[name]
    row = {"shape": name, "b": b, "world": world, "device": str(device)}
    row["per_sample_ms"] = timed(per_sample, (b, shape, tokens, posterior, device), device, repeats)
    row["batched_ms"] = timed(batched, (b, shape, tokens, posterior, device), device, repeats)
    size_gb = 4 * b * world * torch.Size(shape).numel() / 2**30
    if size_gb <= limit_gb:
        row["global_sliced_ms"] = timed(
            batched, (b * world, shape, tokens, posterior, device), device, repeats
        )
    else:
        row["global_sliced_skipped"] = f"{size_gb:.1f} GB per tensor"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16, 32], help="rows per process")
    ap.add_argument("--world", type=int, default=16, help="processes of the replaced global-batch scheme")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--global-limit-gb", type=float, default=4.0, help="skip global_sliced where one tensor exceeds this"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in SHAPES:
        for b in args.batches:
            row = measure(name, b, args.world, torch.device(args.device), args.repeats, args.global_limit_gb)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
