"""The one atomic write: every file another process may read goes through here.

A file is written to a temporary file in its own folder, flushed to disk, renamed over the
target, and the folder is flushed so the rename survives a crash. A reader sees the old content
or the new one, never a torn file. The file gets the mode any normal file would get from this
process's umask (mkstemp alone would leave 0600: unreadable to colleagues on a shared cluster
file system). Folders (checkpoints) are committed the same way with `commit_dir`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Read once: os.umask can only be read by setting it, which is not thread-safe later on.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


@contextlib.contextmanager
def exclusive(lock: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive flock on the file `lock` (created, never through a link) around a read-modify-write
    several processes make (the trainer, `ablate run`, `ablate cancel`): none loses another's write. The
    kernel drops it when its holder dies, however it dies."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename into it) to disk."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_beside(path: Path) -> tuple[int, Path]:
    """A new temporary file beside `path` (same folder, so a rename or link is atomic) with the mode every
    file ablate writes gets, open: (its descriptor, its path)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        os.unlink(name)
        raise
    return fd, Path(name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary path beside `path` for a writer that wants a file name (PIL, numpy,
    safetensors, torch.save); on success it becomes `path` atomically, on error it is removed."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        os.close(fd)
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Replace `path` with `data` (text is written as UTF-8) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def atomic_create(path: str | os.PathLike[str], data: str | bytes) -> bool:
    """Create `path` holding `data` atomically, only if it does not exist: a file another process made
    meanwhile is kept, never replaced (the written temporary file is hard-linked into place, which fails
    on an existing name). Returns whether this call created it."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Replace `path` with `obj` as indented JSON atomically."""
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def commit_dir(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Make the fully written folder `tmp` appear as `final` in one rename, after flushing every
    file and folder in it; `final` must not exist. The parent folder is flushed last."""
    tmp, final = Path(tmp), Path(final)
    for folder, _, files in os.walk(tmp):
        for name in files:
            fsync_file(Path(folder) / name)
        fsync_dir(folder)
    os.rename(tmp, final)
    fsync_dir(final.parent)


def read_json(path: str | os.PathLike[str], default: Any = None) -> Any:
    """The JSON content of `path`, or `default` when the file does not exist.

    A file that exists but does not parse raises `Unreadable` naming the file: writers are
    atomic, so a torn file means something else went wrong and must not pass for "absent".
    """
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return default
    except OSError as e:
        raise Unreadable(path, e.strerror or type(e).__name__) from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise Unreadable(path, f"not JSON: {e}"[:200]) from None


class Unreadable(ValueError):
    """A record exists but cannot be read; the message names the file."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: unreadable ({reason})")
