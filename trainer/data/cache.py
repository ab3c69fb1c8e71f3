"""Latent and caption-embedding cache: run the frozen tokenizer and text encoder once per dataset.

    python -m trainer.data.cache precompute CONFIG.yaml --out DIR   (the orchestrator: `ablate cache SWEEP`)

A cache is the folder `DIR/<key>`, where key hashes only what produces its content: the data
config, the caption columns (training and eval), the tokenizer and the text encoder configs. Arms
that differ in anything else (optimizer, precision, routing, REPA, seed, ...) share one cache; a
config with `cache: {dir: DIR}` reads `DIR/<its key>` and refuses a manifest with another hash.

Contents, per split (`train` with the training caption column, `val` with the eval column):
- `{split}-{i:05d}.safetensors`, N samples each: `latent_mean` (N, C, h, w) float32 and, for a
  Gaussian autoencoder with `posterior: sample`, `latent_std` (N, C, h, w) — both already in the
  denoiser's normalised units; `mask` (N, L) bool; `text` (T, D), the embeddings of the unmasked
  tokens of the N captions, concatenated, in the encoder's own dtype (lossless). A tokenizer whose
  latents cost nothing (pixels: its config's `caches_latents` is False) stores no latents: they are
  computed from the image each step, and the cache holds the caption embeddings only.
- `empty.safetensors`: the encoded empty string (caption dropout, unconditional sampling).
- `manifest.json`, written last: its presence marks a complete cache.

Latent noise: the cache stores the posterior (mean, std), not a sample. Training draws
z = mean + std · ε per step from the step's generator, exactly as it does without the cache, so a
cached run sees fresh posterior noise every epoch and equals the uncached run up to rounding that
depends on the batch size the frozen encoders ran at (GPU matmul kernels vary with it): with the
pixel tokenizer the loss curve is bit-identical on CPU, and on a GPU (H200) too when precompute's
batch size equals the per-process training batch. `posterior: mean` and deterministic tokenizers
store no std.

Text padding: padded positions are not stored; they are read back as zeros. The denoiser masks
padded text keys out of attention, so their values never reach the output or the gradients (the
test checks the loss curve is bit-identical with and without the cache).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch.utils.data import DataLoader, Dataset, Subset

from core.atomic import atomic_path, atomic_write_json, read_json
from trainer.data.datasets import DATA, FileProblem
from trainer.factors.text import TEXT
from trainer.factors.tokenizer import Latents, build_tokenizer
from trainer.registry import Config

FORMAT = 2  # bump when the layout or what is stored changes: old caches then get new keys
# 2: a tokenizer whose latents cost nothing (pixels: caches_latents False) stores no latents
MANIFEST = "manifest.json"  # written last: its presence marks a complete cache
SPLITS = ("train", "val")
UNCACHED = {"buckets", "bucket_px"}  # data fields a cache's content does not depend on (cache_source)


class CacheConfig(Config):
    dir: str = Field(
        description="root of the caches; this config's is DIR/<key>, filled by "
        "`python -m trainer.data.cache precompute` (or `ablate cache`)"
    )

    def file_problem(self, enc: Encoded) -> FileProblem | None:
        """What keeps the arm made of `enc` from reading its cache (missing, interrupted, another config's),
        or None; `unseen` when the cache root's top folder is not on this machine."""
        root, key, at = cache_path(enc, self.dir).absolute(), cache_key(enc), ("cache", "dir")
        parts = root.absolute().parts
        if len(parts) > 1 and not Path(parts[0], parts[1]).exists():
            return FileProblem(f"cache {root} is not visible from this machine", at, unseen=True)
        try:
            state = cache_state(root, key)
        except ValueError as e:
            return FileProblem(str(e), at, "the folder moved aside, so the cache is computed afresh")
        if state == "complete":
            return None
        return FileProblem(f"cache {root} is {state}", at, "a computed cache")


@dataclass(frozen=True)
class Encoded:
    """What a cache is made from, and keyed by: the data, its caption columns, the tokenizer and the text
    encoder (`TrainConfig.encoded()`); nothing else of an arm's config reaches the cache."""

    data: Any
    val_caption: str | None
    """the eval caption column (None: the training one)"""
    tokenizer: Any
    text_encoder: Any
    tokenizer_cache: str | Path | None = None
    """where a tokenizer trained on the data domain keeps itself (the eval cache)"""


# ---------------------------------------------------------------------------------------------
# The key
# ---------------------------------------------------------------------------------------------
def cache_source(enc: Encoded) -> dict:
    """Everything that determines the cache's content, and nothing else. Aspect-ratio buckets
    (`data.buckets`) are not in it: a cache stores no bucketed content (it is made from the square rows;
    latents are not cached per bucket, so TrainConfig refuses buckets with a cache of latents), so arms
    with and without buckets share one cache of caption embeddings."""
    return {
        "format": FORMAT,
        "data": enc.data.model_dump(mode="json", exclude=UNCACHED),
        "captions": {"train": enc.data.caption, "val": enc.val_caption or enc.data.caption},
        "tokenizer": enc.tokenizer.model_dump(mode="json"),
        "text_encoder": enc.text_encoder.model_dump(mode="json"),
    }


def cache_key(enc: Encoded) -> str:
    blob = json.dumps(cache_source(enc), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path(enc: Encoded, root: str | Path) -> Path:
    """The folder of `enc`'s cache under the cache root `root` (a config's cache.dir)."""
    return Path(root) / cache_key(enc)


def build_encoders(enc: Encoded, device: torch.device, weights_dir: str | None) -> tuple[Any, Any]:
    """(tokenizer, text encoder)."""
    tokenizer = build_tokenizer(enc.tokenizer, enc.data, device, weights_dir, enc.tokenizer_cache)
    return tokenizer, TEXT.build(enc.text_encoder, device, weights_dir=weights_dir)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A shard, readable like any file the job writes (safetensors' own writer makes it 0600, so a
    teammate's arms could not read the cache)."""
    from trainer.runtime.checksum import write_safetensors

    with atomic_path(path) as tmp:
        write_safetensors(tmp, tensors)


def _encode_text(text, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions → (valid-token embeddings (T, D) in the encoder's dtype, mask (B, L))."""
    emb, mask = text(captions)  # (B, L, D) float, (B, L) bool
    return emb[mask].to(text.dtype).cpu(), mask.cpu()


def _encode_rows(
    rows: Dataset, tokenizer, text, device, batch_size: int, num_workers: int
) -> dict[str, torch.Tensor]:
    """One shard: the rows' latent moments (normalised; none from a tokenizer that costs nothing) and
    caption embeddings (unpadded tokens only)."""
    parts: dict[str, list[torch.Tensor]] = {"latent_mean": [], "latent_std": [], "text": [], "mask": []}
    for batch in DataLoader(rows, batch_size=batch_size, num_workers=num_workers):
        emb, mask = _encode_text(text, batch["caption"])
        if tokenizer is not None:
            lat = tokenizer.moments(batch["image"].to(device))  # (B, C, h, w) normalised
            parts["latent_mean"].append(lat.mean.float().cpu())
            if lat.std is not None:
                parts["latent_std"].append(lat.std.float().cpu())
        parts["text"].append(emb)
        parts["mask"].append(mask)
    return {k: torch.cat(v) for k, v in parts.items() if v}


def _write_manifest(root: Path, enc: Encoded, splits: dict, text, length: int, seconds: float) -> None:
    """manifest.json, written last: its presence marks a complete cache."""
    from safetensors import safe_open

    with safe_open(str(root / splits["train"]["shards"][0]), framework="pt") as f:
        latent = (
            {"shape": f.get_slice("latent_mean").get_shape()[1:], "std": "latent_std" in f.keys()}
            if "latent_mean" in f.keys()
            else None  # computed per step from the image (caches_latents False)
        )
    manifest = {
        "hash": cache_key(enc),
        "source": cache_source(enc),
        "splits": splits,
        "latent": latent,
        "text": {"length": length, "dim": text.dim, "dtype": str(text.dtype).removeprefix("torch.")},
        "latent_noise": "posterior mean and std stored; z = mean + std * eps drawn per train step",
        "seconds": seconds,
    }
    atomic_write_json(root / MANIFEST, manifest)


@torch.no_grad()
def precompute(
    enc: Encoded,
    out_dir: str | Path,
    weights_dir: str | None = None,
    batch_size: int = 64,
    shard_size: int = 1024,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    log=print,
) -> Path:
    """Fill `out_dir/<key>` for `enc`; returns that folder. Resumes after an interruption (shards are
    written atomically and skipped when present); a complete cache is left untouched."""
    root = cache_path(enc, out_dir)
    if (root / MANIFEST).exists():
        check_manifest(root, cache_key(enc))
        log(f"cache {root}: complete, nothing to do")
        return root
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if enc.tokenizer_cache is None:
        enc = dataclasses.replace(enc, tokenizer_cache=Path(out_dir) / ".tokenizers")
    tokenizer, text = build_encoders(enc, device, weights_dir)
    square = {"buckets": "square", "bucket_px": 32} if "buckets" in type(enc.data).model_fields else {}
    datasets = dict(
        zip(SPLITS, DATA.build(enc.data.model_copy(update=square), val_caption=enc.val_caption), strict=True)
    )
    root.mkdir(parents=True, exist_ok=True)
    t0, splits = time.perf_counter(), {}
    for split, ds in datasets.items():
        shards = []
        for start in range(0, len(ds), shard_size):
            path = root / f"{split}-{len(shards):05d}.safetensors"
            shards.append(path.name)
            if path.exists():
                continue
            rows = Subset(ds, range(start, min(start + shard_size, len(ds))))
            latents = tokenizer if enc.tokenizer.caches_latents else None
            _save_atomic(_encode_rows(rows, latents, text, device, batch_size, num_workers), path)
            log(f"cache {root.name}: {split} {min(start + shard_size, len(ds))}/{len(ds)} "
                f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
        splits[split] = {"size": len(ds), "shard_size": shard_size, "shards": shards}
    emb, mask = _encode_text(text, [""])
    _save_atomic({"text": emb, "mask": mask}, root / "empty.safetensors")
    _write_manifest(root, enc, splits, text, mask.shape[1], time.perf_counter() - t0)
    log(f"cache {root}: done")
    return root


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def check_manifest(root: Path, key: str) -> dict:
    manifest = read_json(root / MANIFEST)
    if manifest.get("hash") != key:
        raise ValueError(
            f"cache {root}: its manifest hash {manifest.get('hash')} does not match this config's "
            f"cache key {key}; the folder holds another config's latents/embeddings — "
            f"recompute it with `python -m trainer.data.cache precompute CONFIG --out {root.parent}`"
        )
    return manifest


def open_cache(enc: Encoded, cache_root: str | Path) -> tuple[Path, dict]:
    root, key = cache_path(enc, cache_root), cache_key(enc)
    if not (root / MANIFEST).exists():
        raise FileNotFoundError(
            f"cache {root} for this config (key {key}) is {cache_state(root, key)}; fill it with "
            f"`python -m trainer.data.cache precompute CONFIG --out {cache_root}` "
            f"(or `ablate cache SWEEP`)"
        )
    return root, check_manifest(root, key)


def cache_state(root: Path, key: str) -> str:
    """complete | missing | incomplete (precompute was interrupted); a folder holding another config's
    cache raises ValueError (check_manifest)."""
    if (root / MANIFEST).exists():
        check_manifest(root, key)
        return "complete"
    return "incomplete (precompute was interrupted)" if root.exists() else "missing"


class CachedSplit(Dataset):
    """A dataset's items plus their cached latents and caption embeddings.

    The raw item (image, caption, attrs) is still read: factors such as REPA need the image.
    """

    def __init__(self, base: Dataset, root: Path, split: dict, length: int):
        if len(base) != split["size"]:
            raise ValueError(
                f"cache {root}: {split['size']} samples cached but the dataset has {len(base)}; "
                "the data changed since the cache was made — recompute it"
            )
        self.base, self.root, self.split, self.length = base, root, split, length
        self._open: dict[int, tuple] = {}  # shard → (handle, mask (N, L), offsets (N + 1,)); per process

    def __getstate__(self):  # file handles stay in the process that opened them
        return {**self.__dict__, "_open": {}}

    def __len__(self) -> int:
        return len(self.base)

    def _shard(self, index: int) -> tuple:
        if index not in self._open:
            from safetensors import safe_open

            f = safe_open(str(self.root / self.split["shards"][index]), framework="pt")
            mask = f.get_tensor("mask")  # (N, L)
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)])  # (N + 1,)
            self._open[index] = (f, mask, offsets)
        return self._open[index]

    def prompts(self, indices: list[int]) -> list[dict]:
        return self.base.prompts(indices)

    def bucket_index(self) -> Any:
        return self.base.bucket_index()  # the items' aspect-ratio buckets (the cache holds none)

    def resized_with(self, resize: str) -> CachedSplit:
        """The same items, their images resized by `resize` (`ImageTextDataset.resized_with`)."""
        view = copy.copy(self)
        view.base, view._open = self.base.resized_with(resize), {}
        return view

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A batch's items: the raw items fetched together (a parquet row group is read once per batch)."""
        many = getattr(self.base, "__getitems__", None)
        raw = many(list(indices)) if many else [self.base[i] for i in indices]
        return [self._with_cached(i, item) for i, item in zip(indices, raw, strict=True)]

    def _with_cached(self, i: int, raw: dict) -> dict:
        shard, row = divmod(i, self.split["shard_size"])
        f, masks, offsets = self._shard(shard)
        mask = masks[row]  # (L,)
        valid = f.get_slice("text")[int(offsets[row]) : int(offsets[row + 1])]  # (n_valid, D)
        txt = valid.new_zeros(self.length, valid.shape[1])  # (L, D): padded positions read back as zeros
        txt[mask] = valid
        item = {**raw, "text": txt, "mask": mask}
        for key in ("latent_mean", "latent_std"):  # none where the tokenizer's latents are not cached
            if key in f.keys():
                item[key] = f.get_slice(key)[row : row + 1][0]
        return item


# ---------------------------------------------------------------------------------------------
# What the trainer calls: the source of a batch's latents and caption embeddings
# ---------------------------------------------------------------------------------------------
class LiveInputs:
    """Encodes every batch with the tokenizer and the text encoder."""

    def __init__(self, tokenizer, text):
        self.tokenizer, self.text = tokenizer, text

    def __call__(self, batch: dict, device: torch.device) -> tuple[Latents, torch.Tensor, torch.Tensor]:
        lat = self.tokenizer.moments(batch["image"].to(device, non_blocking=True))  # (b, C, h, w)
        return (lat, *self.text(batch["caption"]))  # Latents, (b, L, D), (b, L)

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text.empty()  # (1, L, D), (1, L)


class CachedInputs:
    """Reads them from the batch (a `CachedSplit`'s fields). The tokenizer and text encoder are only
    built when something asks for them (decoding samples, encoding new prompts)."""

    def __init__(self, enc: Encoded, root: Path, device: torch.device, weights_dir: str | None = None):
        from safetensors.torch import load_file

        self.enc, self.device, self.weights_dir = enc, device, weights_dir
        empty = load_file(str(root / "empty.safetensors"))
        txt = empty["text"].new_zeros(*empty["mask"].shape, empty["text"].shape[-1])  # (1, L, D)
        txt[empty["mask"]] = empty["text"]
        self._empty = txt.float().to(device), empty["mask"].to(device)
        self._tokenizer = self._text = None

    def __call__(self, batch: dict, device: torch.device) -> tuple[Latents, torch.Tensor, torch.Tensor]:
        std = batch.get("latent_std")
        if "latent_mean" not in batch:  # a tokenizer that costs nothing (pixels): its latents are not cached
            lat = self.tokenizer.moments(batch["image"].to(device, non_blocking=True))
        else:
            lat = Latents(
                batch["latent_mean"].to(device, non_blocking=True),
                None if std is None else std.to(device, non_blocking=True),
            )  # (b, C, h, w)
        return lat, batch["text"].to(device, non_blocking=True).float(), batch["mask"].to(device)

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._empty  # (1, L, D), (1, L)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(
                self.enc.tokenizer, self.enc.data, self.device, self.weights_dir, self.enc.tokenizer_cache
            )
        return self._tokenizer

    @property
    def text(self):
        if self._text is None:
            self._text = TEXT.build(self.enc.text_encoder, self.device, weights_dir=self.weights_dir)
        return self._text


def build_inputs(
    enc: Encoded, cache: CacheConfig | None, device: torch.device, weights_dir: str | None = None
):
    """(inputs, train set, val set): live encoders over the datasets, or the cache under `cache.dir`.

    Building leaves the caller's RNG untouched, so the denoiser's initial weights do not depend on
    which tokenizer or text encoder was loaded.
    """
    train, val = DATA.build(enc.data, val_caption=enc.val_caption)
    with torch.random.fork_rng(devices=[]):
        if cache is None:
            return LiveInputs(*build_encoders(enc, device, weights_dir)), train, val
        root, manifest = open_cache(enc, cache.dir)
        length = manifest["text"]["length"]
        return (
            CachedInputs(enc, root, device, weights_dir),
            CachedSplit(train, root, manifest["splits"]["train"], length),
            CachedSplit(val, root, manifest["splits"]["val"], length),
        )


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.data.cache")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("precompute", help="encode a config's dataset once into DIR/<key>")
    p.add_argument("config", help="a trainer config YAML (a run directory's config.yaml)")
    p.add_argument("--out", help="cache root (default: the config's cache.dir)")
    p.add_argument("--weights-dir", help="weights folder (an HF cache); default: the HF cache")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=1024, help="samples per shard file")
    p.add_argument("--workers", type=int, default=4, help="data loader processes decoding images")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)

    from trainer.config import load

    cfg = load(args.config)
    out = args.out or (cfg.cache.dir if cfg.cache is not None else None)
    if out is None:
        sys.exit(f"error: {args.config} has no cache.dir; pass --out DIR")
    sizes = {"batch_size": args.batch_size, "shard_size": args.shard_size, "num_workers": args.workers}
    print(precompute(cfg.encoded(), out, weights_dir=args.weights_dir, device=args.device, **sizes))


if __name__ == "__main__":
    main()
