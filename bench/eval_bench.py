"""Evaluation speed: feature extraction per extractor (Inception against clean-fid's own feature
pass on the same images) and the Fréchet / MMD math on 10k and 50k x 2048 features.

    python bench/eval_bench.py                      # CPU: small image counts, 50k MMD estimated
    python bench/eval_bench.py --device cuda        # GPU: larger counts, everything measured

Prints one JSON object per line. Where the real weights are absent (`--weights-dir`, HF cache,
clean-fid's folder) each network is a random-init model of the same architecture, and the line
says so: throughput depends on the architecture, not on the weight values.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import numpy as np
import scipy
import scipy.linalg
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.distances import GaussianStats, frechet_distance, mmd  # noqa: E402
from eval.extractors import (
    ClipExtractor,
    DinoV2Extractor,
    Extractor,
    InceptionExtractor,
    load_extractor,
    weights_for,
)
from eval.images import read_image_folder  # noqa: E402


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _RandomInceptionV3W(torch.nn.Module):
    """torchvision's Inception-v3 (the FID network's architecture), random init, behind
    `InceptionV3W`'s contract: (N, 3, 299, 299) in [0, 255] → (N, 2048) pool features."""

    def __init__(self):
        super().__init__()
        from torchvision.models import inception_v3

        self.net = inception_v3(weights=None, aux_logits=False, init_weights=False)
        self.net.fc = torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - 128.0) / 128.0)


def _random_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(  # openai/clip-vit-large-patch14-336
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
    )  # fmt: skip
    return CLIPVisionModelWithProjection(cfg)


def _random_dino():
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = Dinov2WithRegistersConfig(  # facebook/dinov2-with-registers-large
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
        image_size=518, patch_size=14, num_register_tokens=4,
    )  # fmt: skip
    return Dinov2WithRegistersModel(cfg)


def build(name: str, weights_dir, device) -> tuple[Extractor, str]:
    if weights_for(name).missing(weights_dir) is None:
        return load_extractor(name, weights_dir, device), "real weights"
    random_init = {
        "inception": lambda: InceptionExtractor(_RandomInceptionV3W(), device),
        "clip-vit-l14-336": lambda: ClipExtractor(_random_clip(), device),
        "dinov2-vitl14-reg": lambda: DinoV2Extractor(_random_dino(), device),
    }[name]
    return random_init(), "random-init, same architecture (weights absent)"


def time_features(ext: Extractor, images, batch_size: int, device) -> float:
    ext.features(images[:batch_size], batch_size=batch_size)  # warm-up (allocations, cuDNN autotune)
    _sync(device)
    t0 = time.perf_counter()
    ext.features(images, batch_size=batch_size)
    _sync(device)
    return time.perf_counter() - t0


def _cpu_agreement(ext: Extractor, images: np.ndarray, device) -> dict:
    """On a GPU: the largest difference between this device's features and the same model's on CPU."""
    if device.type == "cpu":
        return {}
    on_device = ext.features(images)
    ext.model.cpu()
    on_cpu = type(ext)(ext.model, "cpu").features(images)
    ext.model.to(device)
    return {"max_abs_diff_vs_cpu": float(np.abs(on_device - on_cpu).max())}


def bench_extractors(args, device) -> None:
    rng = np.random.default_rng(0)
    res = args.resolution
    # smooth random images (a coarse grid upsampled, plus noise): closer to photos than white noise
    coarse = rng.integers(0, 256, (args.images, 8, 8, 3), dtype=np.uint8)
    images = np.stack([np.asarray(Image.fromarray(c).resize((res, res), Image.BICUBIC)) for c in coarse])
    images = np.clip(images + rng.normal(0, 8, images.shape), 0, 255).astype(np.uint8)  # (N, res, res, 3)

    if "inception" not in args.extractors:
        return _bench_vits(args, images, device)
    ext, weights = build("inception", args.weights_dir, device)
    with tempfile.TemporaryDirectory() as folder:
        for i, im in enumerate(images):
            Image.fromarray(im).save(Path(folder) / f"{i:05d}.png")
        t_ours = time_features(ext, images, args.batch_size, device)
        t0 = time.perf_counter()
        ext.features(read_image_folder(folder, batch_size=args.batch_size), batch_size=args.batch_size)
        _sync(device)
        t_ours_folder = time.perf_counter() - t0

        from cleanfid.fid import get_folder_features

        workers = min(12, os.cpu_count() or 1)  # clean-fid's compute_fid default is 12 workers
        kwargs = dict(
            num_workers=workers, batch_size=args.batch_size, device=device, mode="clean", verbose=False
        )
        get_folder_features(folder, ext.model, num=args.batch_size, **kwargs)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        get_folder_features(folder, ext.model, **kwargs)
        _sync(device)
        t_clean = time.perf_counter() - t0
    n = len(images)
    emit(
        bench="extract", extractor="inception", weights=weights, device=str(device), images=n,
        resolution=res, ours_img_s=round(n / t_ours, 2), ours_from_png_folder_img_s=round(n / t_ours_folder, 2),
        cleanfid_folder_img_s=round(n / t_clean, 2), speedup_vs_cleanfid=round(t_clean / t_ours, 2),
        cleanfid_workers=workers, **_cpu_agreement(ext, images[:4], device),
    )  # fmt: skip
    del ext
    _bench_vits(args, images, device)


def _bench_vits(args, images: np.ndarray, device) -> None:
    res = args.resolution
    for name in [n for n in ("clip-vit-l14-336", "dinov2-vitl14-reg") if n in args.extractors]:
        ext, weights = build(name, args.weights_dir, device)
        sub = images[: args.vit_images]
        t = time_features(ext, sub, min(args.batch_size, len(sub)), device)
        emit(
            bench="extract", extractor=name, weights=weights, device=str(device), images=len(sub),
            resolution=res, ours_img_s=round(len(sub) / t, 2), cleanfid="no clean-fid equivalent",
            **_cpu_agreement(ext, sub[:2], device),
        )  # fmt: skip
        del ext


def bench_math(args, device) -> None:
    rng = np.random.default_rng(0)
    d = 2048
    # Fréchet against clean-fid at the realistic size (D=2048, n=3000), value and time
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    a = np.maximum(rng.standard_normal((3000, d), dtype=np.float32) * 0.5 + 0.3, 0)
    b = np.maximum(rng.standard_normal((3000, d), dtype=np.float32) * 0.5 + 0.32, 0)
    sa, sb = GaussianStats.from_features(a), GaussianStats.from_features(b)
    t0 = time.perf_counter()
    ours = frechet_distance(sa, sb)
    t_ours = time.perf_counter() - t0
    note = {}
    if "disp" not in inspect.signature(scipy.linalg.sqrtm).parameters:
        # clean-fid 0.1.35 passes sqrtm(disp=False), which scipy 1.18 removed: its frechet_distance raises
        # TypeError there. Give its module the old call signature so the comparison can still run.
        import cleanfid.fid

        new_sqrtm = scipy.linalg.sqrtm
        cleanfid.fid.linalg = types.SimpleNamespace(sqrtm=lambda a, disp=True: (new_sqrtm(a), None))
        note = {
            "cleanfid_note": f"scipy {scipy.__version__}: clean-fid's frechet_distance needs a sqrtm shim"
        }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        theirs = cleanfid_frechet(sa.mu, sa.sigma, sb.mu, sb.sigma)
        t_theirs = time.perf_counter() - t0
    emit(
        bench="frechet_vs_cleanfid", n=3000, dim=d, ours=ours, cleanfid=theirs,
        rel_diff=abs(ours - theirs) / abs(theirs), ours_s=round(t_ours, 2), cleanfid_s=round(t_theirs, 2), **note,
    )  # fmt: skip

    t_mmd = None  # the last measured MMD time, for the O(n²) estimate of a skipped size
    for n in (10_000, 50_000):
        x = rng.standard_normal((n, d), dtype=np.float32)
        y = rng.standard_normal((n, d), dtype=np.float32) + 0.01
        t0 = time.perf_counter()
        stats = GaussianStats.from_features(x), GaussianStats.from_features(y)
        t_stats = time.perf_counter() - t0
        t0 = time.perf_counter()
        frechet_distance(*stats)
        t_fd = time.perf_counter() - t0
        emit(bench="frechet", n=n, dim=d, stats_s=round(t_stats, 2), distance_s=round(t_fd, 2))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        y /= np.linalg.norm(y, axis=1, keepdims=True)
        if n > args.max_mmd_n:  # O(n²): 25x the 10k time; not worth minutes on a laptop CPU
            estimate = round(t_mmd * (n / 10_000) ** 2, 1) if t_mmd is not None else None
            emit(bench="mmd", n=n, dim=d, device=str(device), skipped=True,
                 estimate_s=estimate, note="estimated from 10k, O(n^2)")  # fmt: skip
            continue
        _sync(device)
        t0 = time.perf_counter()
        mmd(x, y, device=device)
        _sync(device)
        t_mmd = time.perf_counter() - t0
        agreement = {}
        if device.type == "cuda" and n == 10_000:
            agreement = {"rel_diff_vs_cpu": abs(mmd(x, y) - (v := mmd(x, y, device=device))) / abs(v)}
        emit(
            bench="mmd", n=n, dim=d, device=str(device), dtype="float64", seconds=round(t_mmd, 2), **agreement
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--weights-dir", default=None, help="weights folder (default: HF cache / clean-fid's folder)"
    )
    p.add_argument("--images", type=int, default=None, help="images for Inception (CPU 48, GPU 512)")
    p.add_argument("--vit-images", type=int, default=None, help="images for CLIP / DINOv2 (CPU 2, GPU 256)")
    p.add_argument("--batch-size", type=int, default=None, help="CPU 8, GPU 64")
    p.add_argument("--resolution", type=int, default=256, help="side of the generated test images")
    p.add_argument("--max-mmd-n", type=int, default=None, help="largest n to time MMD at (CPU 10k, GPU 50k)")
    p.add_argument("--skip-extract", action="store_true")
    p.add_argument("--skip-math", action="store_true")
    p.add_argument(
        "--extractors", default="inception,clip-vit-l14-336,dinov2-vitl14-reg", help="comma-separated"
    )
    args = p.parse_args()
    args.extractors = args.extractors.split(",")
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.images = args.images or (512 if gpu else 48)
    args.vit_images = args.vit_images or (256 if gpu else 2)
    args.batch_size = args.batch_size or (64 if gpu else 8)
    args.max_mmd_n = args.max_mmd_n or (50_000 if gpu else 10_000)
    emit(bench="setup", device=str(device), torch=torch.__version__, threads=torch.get_num_threads(),
         gpu=torch.cuda.get_device_name(device) if gpu else None)  # fmt: skip
    t0 = time.perf_counter()
    if not args.skip_extract:
        bench_extractors(args, device)
    if not args.skip_math:
        bench_math(args, device)
    emit(bench="total", seconds=round(time.perf_counter() - t0, 1))


if __name__ == "__main__":
    main()
