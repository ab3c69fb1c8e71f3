"""log.jsonl, the train log: one JSON line (`core.records.LogRow`) per log step, appended by the
trainer, read by everyone, cut back when a run resumes. `core.rundir.RunDir` reads and writes it
through these functions; a symlink planted in its place is never followed.

A kill mid-write can leave a torn last line: readers skip a line that is not a whole row, and the
next resume drops it. The rows are in step order, since every resume cuts the log after the step it
resumes from: so cutting reads only the tail of the file, however long the log.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from core.records import LogRow

TAIL = 8192  # bytes `last_row` reads: many rows of the trainer's


def append(path: Path, row: LogRow) -> None:
    """One line more."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(json.dumps(row.to_json()) + "\n")


def rows(path: Path) -> list[LogRow]:
    """Every complete line; a torn or garbled line (a kill mid-write) is skipped."""
    with contextlib.suppress(FileNotFoundError):
        return [row for line in path.read_bytes().splitlines() if (row := _row(line))]
    return []


def last_row(path: Path) -> LogRow | None:
    """The last complete row, reading only the file's tail."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - TAIL))
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    return next((row for line in reversed(lines) if (row := _row(line))), None)


def truncate(path: Path, step: int) -> int:
    """Keep only the rows up to `step`, and drop a torn or garbled line after the last row kept; returns
    how many such lines were dropped.

    Read from the end back to the last row to keep, and cut there with one ftruncate: memory is
    bounded by a line and time by what is dropped (the issue's 477 MB log peaked at 4.8 GB when it
    was parsed whole: bench/log_truncate.py). A kill leaves the file whole or cut."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    with os.fdopen(fd, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        cut, torn, unterminated = end, 0, False
        for offset, line in _lines_from_the_end(f):
            if not line.strip():
                cut = offset
                continue
            row = _row(line)
            if row is not None and row.step <= step:
                unterminated = offset + len(line) == end  # whole, but its newline was not written
                break
            torn += row is None
            cut = offset
        if cut < end:
            f.truncate(cut)
        if unterminated:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
        f.flush()
        os.fsync(f.fileno())
    return torn


def _lines_from_the_end(f: BinaryIO, block: int = 1 << 16) -> Iterator[tuple[int, bytes]]:
    """(offset, line without its newline) of each line of the binary file `f`, the last one first."""
    pos = f.seek(0, os.SEEK_END)
    rest = b""  # the bytes from `pos` up to the first newline after it: a line not yet whole
    while pos > 0:
        size = min(block, pos)
        pos -= size
        f.seek(pos)
        chunk = f.read(size) + rest
        parts = chunk.split(b"\n")
        offset = pos + len(chunk)  # where the last part ends
        for part in reversed(parts[1:]):
            offset -= len(part)
            yield offset, part
            offset -= 1
        rest = parts[0]
    yield 0, rest


def _row(line: bytes) -> LogRow | None:
    with contextlib.suppress(ValueError):  # a torn line, or one of another shape (ValidationError)
        if isinstance(data := json.loads(line), dict):
            return LogRow.model_validate(data)
    return None
