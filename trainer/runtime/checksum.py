"""A checkpoint's files, checksummed while they are written: no file is read back to be hashed.

Every file goes through `Hashed`, a file object whose `write` feeds the bytes to the hasher on their
way to the disk, and each writer returns the file's manifest entry: {"size": bytes, ALGORITHM: hex}.
The algorithm is xxHash's XXH3-128 (about 25 GB/s on one core, against 1.75 GB/s for SHA-256): a
check against corruption, not a signature. An entry names its algorithm by its key, so a manifest
written with SHA-256 (before XXH3) still verifies (`matches`).

Files are opened with `open`, as any file is, so they get the umask's mode like the rest of the run
folder. The weights are streamed in the safetensors format here (a header, then each tensor's bytes)
rather than by safetensors' own writer, which leaves them 0600 (safetensors 0.8): unreadable to a
teammate evaluating them.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import xxhash

ALGORITHMS: dict[str, Callable[[], Any]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
ALGORITHM = "xxh3_128"  # what new manifests use
CHUNK = 16 << 20  # bytes handed to the hasher and the file at a time

# safetensors' dtype names (https://github.com/huggingface/safetensors, "Format")
_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip


class Hashed:
    """A binary file open for writing whose bytes are hashed as they pass (`entry()` once closed)."""

    def __init__(self, path: Path):
        self.file, self.hasher, self.size = open(path, "wb"), ALGORITHMS[ALGORITHM](), 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.hasher.update(view)
        self.size += self.file.write(view)
        return len(view)

    def flush(self) -> None:
        self.file.flush()

    def tell(self) -> int:  # a new file's position: what has been written (DCP records offsets)
        return self.size

    def fileno(self) -> int:
        return self.file.fileno()

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Hashed:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def entry(self) -> dict:
        return {"size": self.size, ALGORITHM: self.hasher.hexdigest()}


def write_bytes(path: Path, data: bytes) -> dict:
    with Hashed(path) as f:
        f.write(data)
    return f.entry()


def write_torch(path: Path, obj: Any) -> dict:
    """`torch.save(obj)`; the zip's own CRC-32 of each record is left out (it cost 1 s per 500 MB
    here, and the manifest's checksum covers every byte)."""
    from torch.utils.serialization import config

    with Hashed(path) as f, config.patch({"save.compute_crc32": False}):
        torch.save(obj, f)
    return f.entry()


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order; no copy for a contiguous host tensor (a staged one)."""
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> dict:
    """`tensors` as a safetensors file that `safetensors.torch.load_file` and diffusers read: widest
    elements first, so every tensor starts aligned to its element size."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: cannot write dtype {t.dtype} to safetensors")
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with Hashed(path) as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in order:
            data = _bytes_of(tensors[name])
            for start in range(0, len(data), CHUNK):
                f.write(data[start : start + CHUNK])
    return f.entry()


def matches(path: Path, want: dict) -> str | None:
    """Why the file at `path` does not match its manifest entry `want`, or None when it does."""
    algorithm = next((a for a in ALGORITHMS if a in want), None)
    if algorithm is None:
        return f"no checksum of a known algorithm ({', '.join(ALGORITHMS)})"
    if (size := path.stat().st_size) != int(want["size"]):
        return f"has {size} bytes, the manifest says {want['size']}"
    with path.open("rb") as f:
        if hashlib.file_digest(f, ALGORITHMS[algorithm]).hexdigest() != str(want[algorithm]):
            return "does not match its checksum"
    return None
