"""What keeps a data source (a parquet file or folder, an image folder with metadata.jsonl) from being
read, found from its footer or first row alone: checked before anything is submitted."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trainer.data.rows import DataError

META = "metadata.jsonl"  # a folder dataset's index: one JSON line per image, naming it in file_name


@dataclass(frozen=True)
class FileProblem:
    """Why a data source cannot be read, found from its metadata alone before anything is submitted, and
    the config key at fault. `unseen`: the path's top folder is not on this machine (a file system
    mounted only on the compute nodes), so it was not checked."""

    problem: str
    key: tuple[str, ...]
    expected: str = ""
    unseen: bool = False


RELATIVE = "(relative paths are from the folder you submit from)"


def source_problem(
    kind: str,
    path: Path,
    what: str,
    at: tuple[str, ...],
    expected: str,
    needed: list[tuple[str, tuple[str, ...], str]],
) -> FileProblem | None:
    """What keeps a parquet file or an image folder (its metadata.jsonl) from being read: a missing or
    unreadable path (key `at`), a column of `needed` (column, the key naming it, what would be right) it
    lacks, or a folder's first image missing. From a parquet footer or metadata.jsonl's first row."""
    if not path.exists():
        return _missing(path, what, at, expected)
    try:
        have, image = (_parquet_columns(path), None) if kind == "parquet" else _first_row(path)
    except (DataError, OSError) as e:
        return FileProblem(_read_error(e, path), at, expected)
    where = path / META if kind == "folder" else path
    for column, key, column_expected in needed:
        if column not in have:
            named = "file_name" if key == at else ".".join(key)
            return FileProblem(f"column '{column}' ({named}) is not in {where} (columns: {_listed(have)})", key,
                               column_expected)  # fmt: skip
    if image is not None and not image.exists():
        return FileProblem(f"image {image} (first row of {path / META}) does not exist", at, expected)
    return None


def _missing(path: Path, what: str, key: tuple[str, ...], expected: str) -> FileProblem:
    """A path that does not exist, or one on a file system this machine does not mount (unseen)."""
    parts = path.absolute().parts
    unseen = len(parts) > 1 and not Path(parts[0], parts[1]).exists()
    return FileProblem(f"{what} {path} does not exist", key, expected, unseen=unseen)


def _read_error(e: BaseException, path: Path) -> str:
    if isinstance(e, OSError):
        return f"cannot read {e.filename or path}: {e.strerror or type(e).__name__}"
    return str(e)


def _listed(columns: set[str]) -> str:
    return ", ".join(sorted(columns)[:12]) + (" ..." if len(columns) > 12 else "")


def _parquet_columns(path: Path) -> set[str]:
    """Column names from the parquet footer(s) only; a folder is read as a parquet dataset."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    try:
        schema = ds.dataset(str(path), format="parquet").schema if path.is_dir() else pq.read_schema(path)
    except (pa.ArrowException, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path} is not a readable parquet file ({first[:160]})") from None
    return set(schema.names)


def _first_row(path: Path) -> tuple[set[str], Path | None]:
    """The keys of metadata.jsonl's first row, and that row's image file."""
    if not path.is_dir():
        raise DataError(f"{path} is not a folder (kind: folder needs one holding images and {META})")
    meta = path / META
    if not meta.is_file():
        raise DataError(f"{meta} does not exist (a folder dataset needs one JSON line per image)")
    with meta.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError:
                raise DataError(f"{meta}:{number}: not a JSON line") from None
            if not isinstance(row, dict):
                raise DataError(f"{meta}:{number}: not a JSON object")
            image = row.get("file_name")
            return set(row), (path / image) if isinstance(image, str) else None
    raise DataError(f"{meta} has no rows")
