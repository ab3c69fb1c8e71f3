"""Rows read on demand, a block at a time: parquet row groups and metadata.jsonl blocks.

Each process (and each DataLoader worker) reads only the rows its sampler asks for. It keeps at most
`HELD` decoded blocks in a least-recently-used cache of its own, so its host memory for the data is
bounded by `HELD` blocks whatever the dataset's size. Only the index grows with the dataset: 24
bytes per row group, or 16 per `JSONL_BLOCK` lines of metadata.jsonl, plus the parsed footers of the
`OPEN_FILES` parquet files kept open (a few hundred bytes per row group).

Parquet: one file or a folder of them, in pyarrow.dataset's file order (the order pandas reads it in).
A global row index is mapped to (file, row group, offset) with the cumulative row counts of the
footers. A read decodes only that row group's needed columns (`ParquetFile.read_row_group`).

Row-group sizing: random access decodes a whole row group, and the sampler draws each step's rows from
anywhere in the dataset. Once the dataset holds many more groups than `HELD`, each process decodes
about one row group per sample, and it keeps up to `HELD` of them. So write training parquet with:
- small row groups: about 64 rows, or 1-8 MB of image bytes per group
  (`pq.write_table(table, path, row_group_size=64, ...)`);
- the image column uncompressed (`compression={"image": "none", ...}`): JPEG and PNG bytes do not
  compress;
- no statistics on the image column (`write_statistics=[caption columns]`): otherwise min/max put up
  to two images per row group into the footer, which every process parses.
`python -m trainer.data.rows regroup IN OUT --rows 64` rewrites a file that way, streaming one group
at a time. pandas' `to_parquet` writes up to a million rows per group, and a process would then hold
that whole image column. A row group whose needed columns exceed `LARGE_GROUP_BYTES` gets a warning
at set-up naming the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

HELD = 8  # decoded row groups (or metadata.jsonl blocks) one process keeps at most
JSONL_BLOCK = 256  # metadata.jsonl rows parsed together: the folder kind's "row group"
OPEN_FILES = 4  # parquet files one process keeps open (their footers parsed)
LARGE_GROUP_BYTES = 256 << 20  # a row group whose needed columns decode to more than this is warned about


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file (and row)."""


class Held:
    """Decoded blocks by key, least recently used dropped first, never more than `cap` at once.

    Instrumentation for tests and benchmarks: `decoded` counts the decodes, `peak` is the most held at
    once (both a few bytes: nothing grows with the dataset). An unpickled copy starts empty. A forked loader worker starts with its parent's
    blocks, which stay shared pages, and decodes at most `cap` of its own.
    """

    def __init__(self, load: Callable[[int], object], cap: int = HELD):
        if cap < 1:
            raise ValueError(f"cap={cap}: at least one decoded block must be held")
        self.load, self.cap = load, cap
        self._reset()

    def _reset(self) -> None:
        self._blocks: OrderedDict[int, object] = OrderedDict()
        self.decoded = self.peak = 0

    def __getstate__(self):
        return {"load": self.load, "cap": self.cap}

    def __setstate__(self, state) -> None:
        self.load, self.cap = state["load"], state["cap"]
        self._reset()

    def __len__(self) -> int:
        return len(self._blocks)

    def get(self, key: int):
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return self._blocks[key]
        while len(self._blocks) >= self.cap:  # make room first: at most `cap` while decoding too
            self._blocks.popitem(last=False)
        block = self._blocks[key] = self.load(key)
        self.decoded += 1
        self.peak = max(self.peak, len(self._blocks))
        return block


class BlockRows(ABC):
    """Rows as dicts from blocks of consecutive rows; `starts[k]` is block k's first row, and
    `starts[-1]` the row count. `take` reads each block its indices need once."""

    starts: np.ndarray
    held: Held

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """(block, row within it) of row `i`."""
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        block = int(np.searchsorted(self.starts, i, side="right")) - 1
        return block, i - int(self.starts[block])

    def __getitem__(self, i: int) -> dict:
        return self.take([i])[0]

    def take(self, indices: Sequence[int]) -> list[dict]:
        """Rows `indices`, in that order, each block decoded (or found held) once."""
        by_block: dict[int, list[tuple[int, int]]] = {}
        for n, i in enumerate(indices):
            block, offset = self.locate(int(i))
            by_block.setdefault(block, []).append((n, offset))
        out: list = [None] * len(indices)
        for block, wanted in by_block.items():
            decoded = self.held.get(block)
            for n, offset in wanted:
                out[n] = self._row(decoded, offset)
        return out

    @abstractmethod
    def _row(self, decoded, offset: int) -> dict:
        """Row `offset` of a decoded block."""


# ---------------------------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    return (str(e).splitlines()[0] if str(e) else type(e).__name__)[:160]


def parquet_files(path: str, what: str) -> list[str]:
    """The parquet file, or a folder's parquet files in pyarrow.dataset's order; `what` names the key."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    if not Path(path).exists():
        raise DataError(f"{path}: no such parquet file or folder ({what})")
    if not Path(path).is_dir():
        return [path]
    try:
        files = ds.dataset(path, format="parquet").files
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable parquet file ({_first_line(e)})") from None
    if not files:
        raise DataError(f"{path}: a folder with no parquet files in it ({what})")
    return files


class ParquetRows(BlockRows):
    """The rows of a parquet file (or folder of them) as {column: value} dicts, one row group decoded at a
    time. The footers are read at construction: every file must hold every column in `columns`
    (`hints` adds the config key naming a column to the error)."""

    def __init__(
        self,
        path: str,
        columns: Sequence[str],
        what: str = "data.path",
        hints: dict | None = None,
        cap: int = HELD,
    ):
        self.path, self.columns = path, list(dict.fromkeys(columns))
        self.files = parquet_files(path, what)
        groups, counts, sizes, per_file = [], [0], [], [0]
        for f, name in enumerate(self.files):
            rows, nbytes = self._footer(name, hints or {})
            groups += [(f, g) for g in range(len(rows))]
            counts += rows
            sizes += nbytes
            per_file.append(sum(rows))
        self.groups = np.array(groups, dtype=np.int64).reshape(-1, 2)  # (G, 2): file, row group in it
        self.starts = np.cumsum(counts, dtype=np.int64)  # (G + 1,): each group's first global row
        self.file_starts = np.cumsum(per_file, dtype=np.int64)  # (F + 1,): each file's first global row
        self.largest = max(sizes, default=0)  # bytes of the needed columns in the largest row group
        self.held = Held(self._decode, cap)
        self.opened = Held(self._open, OPEN_FILES)  # parsed footers: a file's is read once, not per group
        if self.largest > LARGE_GROUP_BYTES and os.environ.get("RANK", "0") == "0":
            self._warn_large(sizes)

    def _footer(self, name: str, hints: dict) -> tuple[list[int], list[int]]:
        """(rows, bytes of the needed columns) per row group of one file, from its footer."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            meta = pq.read_metadata(name)
            have = meta.schema.to_arrow_schema().names
        except FileNotFoundError:
            raise DataError(f"{name}: no such parquet file") from None
        except (pa.ArrowException, OSError, ValueError) as e:
            raise DataError(f"{name}: not a readable parquet file ({_first_line(e)})") from None
        for column in self.columns:
            if column not in have:
                hint = f" ({hints[column]})" if column in hints else ""
                raise DataError(f"{name}: no column {column!r}{hint}; columns: {', '.join(sorted(have))}")
        rows, sizes = [], []
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            rows.append(group.num_rows)
            sizes.append(sum(group.column(c).total_uncompressed_size for c in range(group.num_columns)
                             if group.column(c).path_in_schema.split(".")[0] in self.columns))  # fmt: skip
        return rows, sizes

    def _warn_large(self, sizes: list[int]) -> None:
        f, g = self.groups[int(np.argmax(sizes))]
        print(f"warning: {self.files[f]}: row group {g} holds {self.largest / 2**20:.0f} MiB of "
              f"{', '.join(self.columns)}; every random read decodes a whole group and each process keeps "
              f"up to {self.held.cap}: rewrite it with `python -m trainer.data.rows regroup IN OUT --rows 64`",
              file=sys.stderr, flush=True)  # fmt: skip

    def name(self, i: int) -> str:
        """Row `i` as its file and row number in that file, for errors."""
        f = int(self.groups[self.locate(i)[0], 0])
        return f"{self.files[f]} row {i - int(self.file_starts[f])}"

    def _open(self, f: int):
        import pyarrow.parquet as pq

        return pq.ParquetFile(self.files[f])

    def _decode(self, block: int):
        import pyarrow as pa

        f, g = (int(x) for x in self.groups[block])
        try:
            return self.opened.get(f).read_row_group(g, columns=self.columns, use_threads=False)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise DataError(f"{self.files[f]} row group {g}: cannot be read ({_first_line(e)})") from None

    def _row(self, decoded, offset: int) -> dict:
        return {c: decoded.column(c)[offset].as_py() for c in self.columns}


# ---------------------------------------------------------------------------------------------
# metadata.jsonl (the folder kind)
# ---------------------------------------------------------------------------------------------
def _json_row(raw: bytes, meta: Path, number: int) -> dict:
    try:
        row = json.loads(raw.decode("utf-8", errors="replace"))
    except ValueError:
        raise DataError(f"{meta}:{number}: not a JSON line") from None
    if not isinstance(row, dict):
        raise DataError(f"{meta}:{number}: not a JSON object")
    return row


class JsonlRows(BlockRows):
    """The JSON lines of a metadata.jsonl (blank lines skipped) as dicts, parsed `JSONL_BLOCK` at a time.

    Every line is parsed once at construction, so a bad line fails at set-up, and only the byte offset
    of each block's first line is kept. `columns` are the first row's keys."""

    def __init__(self, meta: Path, cap: int = HELD):
        self.meta, starts, count, self.columns = meta, [], 0, []
        with meta.open("rb") as f:
            offset = 0
            for number, raw in enumerate(f, 1):
                if raw.strip():
                    row = _json_row(raw, meta, number)
                    if count % JSONL_BLOCK == 0:
                        starts.append((offset, number))
                    self.columns = self.columns or list(row)
                    count += 1
                offset += len(raw)
        # each block's first line: (byte offset, line number)
        self.offsets = np.array(starts, dtype=np.int64).reshape(-1, 2)
        self.starts = np.minimum(np.arange(len(starts) + 1, dtype=np.int64) * JSONL_BLOCK, count)
        self.held = Held(self._decode, cap)

    def _decode(self, block: int) -> list[dict]:
        offset, first = (int(x) for x in self.offsets[block])
        rows = []
        with self.meta.open("rb") as f:
            f.seek(offset)
            for number, raw in enumerate(f, first):
                if raw.strip():
                    rows.append(_json_row(raw, self.meta, number))
                    if len(rows) == JSONL_BLOCK:
                        break
        return rows

    def _row(self, decoded, offset: int) -> dict:
        return decoded[offset]


# ---------------------------------------------------------------------------------------------
# CLI: rewrite a parquet file with small row groups
# ---------------------------------------------------------------------------------------------
def regroup(src: str, dst: str, rows: int) -> int:
    """Copy `src` to `dst` with `rows` rows per row group, one group in memory at a time, its raw byte
    columns (encoded images) uncompressed and without statistics; returns the number of groups."""
    import pyarrow.parquet as pq

    groups = 0
    # no pre-buffering: a source row group larger than memory streams too
    with pq.ParquetFile(src, pre_buffer=False, buffer_size=1 << 20) as f:
        leaves = [f.schema.column(i) for i in range(len(f.schema))]
        raw = {c.path for c in leaves if c.physical_type == "BYTE_ARRAY" and str(c.logical_type) == "None"}
        options = {"compression": {c.path: "none" if c.path in raw else "snappy" for c in leaves},
                   "write_statistics": [c.path for c in leaves if c.path not in raw]}  # fmt: skip
        with pq.ParquetWriter(dst, f.schema_arrow, **options) as out:
            for batch in f.iter_batches(batch_size=rows):
                out.write_batch(batch, row_group_size=rows)
                groups += 1
    return groups


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.data.rows")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("regroup", help="rewrite a parquet file with small row groups")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--rows", type=int, default=64, help="rows per row group (default 64)")
    args = parser.parse_args(argv)
    if Path(args.dst).exists() or args.rows < 1:
        sys.exit(
            f"error: {args.dst} exists; name a new file" if args.rows >= 1 else "error: --rows must be >= 1"
        )
    import pyarrow as pa

    try:
        groups = regroup(args.src, args.dst, args.rows)
    except (pa.ArrowException, OSError, ValueError) as e:
        Path(args.dst).unlink(missing_ok=True)
        sys.exit(f"error: {args.src}: not a readable parquet file ({_first_line(e)})")
    print(f"{args.dst}: {groups} row groups of up to {args.rows} rows")


if __name__ == "__main__":
    main()
