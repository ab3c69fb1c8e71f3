"""Image containers in and out of `eval/`: one canonical form, uint8 NHWC RGB.

Generated images arrive as uint8 NHWC (numpy or torch) or float NCHW in [0, 1]. Float images are
quantised exactly as writing a PNG would (clamp, ×255, round), so a metric computed on images in
memory equals the same metric computed on those images saved to a folder and read back. An extractor
may ask for PRX's quantisation instead (`quantise: floor`, `fid_prx`'s): ×255, clamp to [0, 255] and
`.to(torch.uint8)`, which truncates; images that arrive as uint8 are taken as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.atomic import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


QUANTISE = ("round", "floor")


def to_uint8_nhwc(images, quantise: str = "round") -> np.ndarray:
    """uint8 NHWC (numpy/torch) passes through; float NCHW in [0, 1] is quantised like a PNG (`round`),
    or as PRX's eval callback does (`floor`: `torch.clamp(x * 255, 0, 255).to(torch.uint8)` truncates)."""
    if quantise not in QUANTISE:
        raise ValueError(f"quantise {quantise!r}; one of {', '.join(QUANTISE)}")
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            images = images.cpu().numpy()
        else:
            _check_nchw(tuple(images.shape))
            x = images.detach().float().mul(255.0).clamp(0.0, 255.0)  # (N, 3, H, W)
            q = (x.round() if quantise == "round" else x.floor()).to(torch.uint8)
            return q.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # (N, H, W, 3)
    images = np.asarray(images)
    if images.dtype == np.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be NHWC with 3 channels, got shape {images.shape}")
        return images
    if np.issubdtype(images.dtype, np.floating):
        _check_nchw(images.shape)
        x = np.clip(images * 255.0, 0.0, 255.0)  # (N, 3, H, W)
        q = (np.rint(x) if quantise == "round" else np.floor(x)).astype(np.uint8)
        return np.ascontiguousarray(q.transpose(0, 2, 3, 1))
    raise ValueError(f"images must be uint8 NHWC or float NCHW in [0, 1], got dtype {images.dtype}")


def _check_nchw(shape: tuple) -> None:
    if len(shape) != 4 or shape[1] != 3:
        raise ValueError(f"float images must be NCHW with 3 channels in [0, 1], got shape {shape}")


def iter_batches(images, batch_size: int, quantise: str | None = "round") -> Iterator:
    """Yields uint8 NHWC batches from one array/tensor or from an iterable of batches; with `quantise`
    None, batches as they come (float NCHW stays float: each extractor quantises its own way)."""

    def prepared(batch):
        return batch if quantise is None else to_uint8_nhwc(batch, quantise)

    if isinstance(images, (np.ndarray, torch.Tensor)):
        for lo in range(0, len(images), batch_size):
            yield prepared(images[lo : lo + batch_size])
        return
    for batch in images:
        batch = prepared(batch)
        for lo in range(0, len(batch), batch_size):
            yield batch[lo : lo + batch_size]


def map_images(fn: Callable, images: Iterable) -> list[np.ndarray]:
    """Per-image CPU work (decode, resize) on a few threads: PIL releases the GIL while it works."""
    images = list(images)
    workers = min(len(images), max(1, torch.get_num_threads()))
    if workers <= 1:
        return [fn(im) for im in images]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, images))


def take(batches: Iterable[np.ndarray], num: int) -> Iterator[np.ndarray]:
    """The first `num` images of a batch stream; raises when the stream has fewer."""
    seen = 0
    for batch in batches:
        if seen >= num:
            break
        batch = batch[: num - seen]
        seen += len(batch)
        yield batch
    if seen < num:
        raise ValueError(f"expected {num} images, the source produced only {seen}")


def image_files(folder: str | Path) -> list[Path]:
    """The image files under `folder` (recursive, by suffix), sorted by path: the order a folder is read in."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_image_folder(
    folder: str | Path, batch_size: int = 64, num: int | None = None
) -> Iterator[np.ndarray]:
    """uint8 NHWC batches of the images in `folder` (recursive, sorted by path, converted to RGB)."""
    files = image_files(folder)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    files = files[:num] if num is not None else files
    for lo in range(0, len(files), batch_size):
        yield np.stack(map_images(_read_rgb, files[lo : lo + batch_size]))


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def make_grid(images, nrow: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tiles N images into one uint8 HWC image, `nrow` images per row, `pad` pixels between."""
    imgs = to_uint8_nhwc(images)  # (N, H, W, 3)
    n, h, w, _ = imgs.shape
    if n == 0 or nrow < 1:
        raise ValueError(f"a grid needs at least one image and nrow >= 1, got {n} images, nrow={nrow}")
    cols = min(nrow, n)
    rows = -(-n // cols)
    grid = np.full((pad + rows * (h + pad), pad + cols * (w + pad), 3), pad_value, np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top : top + h, left : left + w] = imgs[k]
    return grid


def save_grid(images, path: str | Path, nrow: int = 8, pad: int = 2, min_tile: int = 0) -> Path:
    """Writes `images` as one PNG grid, atomically (a reader never sees a half-written file). Images
    smaller than `min_tile` pixels are enlarged by a whole factor, nearest neighbour, so small
    samples stay visible and every pixel stays a true sample pixel."""
    imgs = to_uint8_nhwc(images)
    factor = max(1, -(-min_tile // max(1, min(imgs.shape[1:3])))) if len(imgs) else 1
    if factor > 1:
        imgs = imgs.repeat(factor, axis=1).repeat(factor, axis=2)
    grid = Image.fromarray(make_grid(imgs, nrow=nrow, pad=pad))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return Path(path)
