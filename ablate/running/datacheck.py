"""Data checks before submission: every arm's data files (and eval reference set) exist and hold the
columns it names.

`ablate run` (and `--dry-run`) calls `check_data` after the arms validate and before anything is
created, so a wrong path or column costs a second on the login node instead of a queued job. The
checks read only what is cheap: a parquet file's schema (its footer), a folder's metadata.jsonl
first row and that row's image. A path whose top folder this machine does not have (a file system
mounted only on the compute nodes) is not checked: a warning says so.

The data kinds are the trainer's (`trainer.data`: `parquet`, `folder`; `synthetic` has no files);
so are `eval.reference`'s (`trainer.data.ReferenceSet`: a parquet file or a folder of images).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ablate.errors import UserError
from ablate.sweep.expand import RunSpec
from ablate.sweep.loader import KeyPath, format_path
from ablate.sweep.schema import BASELINE, Sweep, delta_tree

if TYPE_CHECKING:
    from rich.console import Console

META = "metadata.jsonl"  # trainer.data.build_folder's index of a folder dataset


def check_data(sweep: Sweep, specs: list[RunSpec], console: Console | None = None) -> None:
    """Raise a UserError for the first arm whose data is missing or lacks a column it names; it names the
    arm, the file and the sweep file's line of the data key. Each distinct data source is read once."""
    seen: dict[str, tuple[str, str | None] | None] = {}
    unseen: set[str] = set()
    for spec in specs:
        ref = (spec.config.get("eval") or {}).get("reference")
        if ref:
            column = ref.get("image_column", "image")
            key = json.dumps(["eval.reference", ref["kind"], ref["path"], column])
            if key not in seen:
                seen[key] = _reference_problem(ref["kind"], Path(ref["path"]), column)
            if (found := seen[key]) is not None and found[0] == "unseen":
                unseen.add(str(ref["path"]))
            elif found is not None:
                file, line, shown = _locate(sweep, spec, ("eval", "reference", found[1]))
                raise UserError(
                    f"arm {spec.name}: {found[0]}; nothing submitted",
                    _EXPECTED_REFERENCE[found[1]],
                    file=file,
                    line=line,
                    path=shown,
                )
        data = spec.config.get("data") or {}
        if data.get("kind") not in ("parquet", "folder"):
            continue
        columns = _columns(spec)
        key = json.dumps([data.get("kind"), data.get("path"), sorted(columns)])
        if key not in seen:
            seen[key] = _problem(data["kind"], Path(data["path"]), columns)
        found = seen[key]
        if found is None:
            continue
        problem, field = found
        if problem == "unseen":
            unseen.add(str(data["path"]))
            continue
        config_path = ("eval", "caption") if field == "eval.caption" else ("data", field or "path")
        if field == "file_name":
            config_path = ("data", "path")
        file, line, shown = _locate(sweep, spec, config_path)
        raise UserError(
            f"arm {spec.name}: {problem}; nothing submitted",
            _EXPECTED[field],
            file=file,
            line=line,
            path=shown,
        )
    for path in sorted(unseen):
        if console is not None:
            console.print(
                f"warning: data {path} is not visible from this machine (its top folder is not here); not checked",
                style="yellow",
                markup=False,
            )


_EXPECTED = {
    None: "a data path that exists (relative paths are from the folder you submit from)",
    "caption": "data.caption set to one of the data's columns",
    "eval.caption": "eval.caption set to one of the data's columns (or left out)",
    "image_column": "data.image_column set to the column of encoded images",
    "file_name": f"a {META} whose rows name their image in file_name",
}
_EXPECTED_REFERENCE = {
    "path": "eval.reference.path naming a parquet file or a folder of images that exists "
    "(relative paths are from the folder you submit from)",
    "image_column": "eval.reference.image_column set to the column of encoded images",
}


def _columns(spec: RunSpec) -> dict[str, str]:
    """{column: the config field that names it} the arm reads."""
    data, ev = spec.config["data"], spec.config.get("eval") or {}
    columns = {}
    if data["kind"] == "parquet":
        columns[data.get("image_column", "image")] = "image_column"
    else:
        columns["file_name"] = "file_name"
    if ev.get("caption"):
        columns[ev["caption"]] = "eval.caption"
    columns[data["caption"]] = "caption"
    return columns


def _problem(kind: str, path: Path, columns: dict[str, str]) -> tuple[str, str | None] | None:
    """(what is wrong, the field that names it; None: the path) or ("unseen", None), or None when fine."""
    if not path.exists():
        return _missing(path, "data file"), None
    try:
        if kind == "parquet":
            have = _parquet_columns(path)
            image_of = None
        else:
            have, image_of = _folder_columns(path)
    except UserError as e:
        return e.problem, None
    except OSError as e:
        return f"cannot read {e.filename or path}: {e.strerror or type(e).__name__}", None
    for column, field in columns.items():
        if column not in have:
            where = path / META if kind == "folder" else path
            return f"column '{column}' ({_name(field)}) is not in {where} (columns: {_listed(have)})", field
    if image_of is not None and not image_of.exists():
        return f"image {image_of} (first row of {path / META}) does not exist", None
    return None


def _reference_problem(kind: str, path: Path, image_column: str) -> tuple[str, str] | None:
    """(what is wrong with eval.reference, its field that names it) or ("unseen", "path"), or None when fine."""
    if not path.exists():
        return _missing(path, "reference file" if kind == "parquet" else "reference folder"), "path"
    try:
        if kind == "parquet":
            have = _parquet_columns(path)
            if image_column not in have:
                return (
                    f"column '{image_column}' (eval.reference.image_column) is not in {path} "
                    f"(columns: {_listed(have)})",
                    "image_column",
                )
        elif not path.is_dir():
            return f"{path} is not a folder (eval.reference kind: folder needs one holding images)", "path"
        else:
            from eval.images import IMAGE_SUFFIXES, image_files  # torch: already imported by expand

            if not image_files(path):
                return f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}", "path"
    except UserError as e:
        return e.problem, "path"
    except OSError as e:
        return f"cannot read {e.filename or path}: {e.strerror or type(e).__name__}", "path"
    return None


def _missing(path: Path, what: str) -> str:
    """The problem with a path that does not exist, or "unseen" when its top folder is not on this
    machine (a file system mounted only on the compute nodes)."""
    parts = path.absolute().parts
    if len(parts) > 1 and not Path(parts[0], parts[1]).exists():
        return "unseen"
    return f"{what} {path} does not exist"


def _listed(columns: set[str]) -> str:
    return ", ".join(sorted(columns)[:12]) + (" ..." if len(columns) > 12 else "")


def _name(field: str) -> str:
    return field if field in ("eval.caption", "file_name") else f"data.{field}"


def _parquet_columns(path: Path) -> set[str]:
    """Column names from the parquet footer(s) only; a folder is read as a parquet dataset."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    try:
        schema = ds.dataset(str(path), format="parquet").schema if path.is_dir() else pq.read_schema(path)
    except (pa.ArrowException, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path} is not a readable parquet file ({first[:160]})") from None
    return set(schema.names)


def _folder_columns(path: Path) -> tuple[set[str], Path | None]:
    """The keys of metadata.jsonl's first row, and that row's image file."""
    if not path.is_dir():
        raise UserError(f"{path} is not a folder (kind: folder needs one holding images and {META})")
    meta = path / META
    if not meta.is_file():
        raise UserError(f"{meta} does not exist (a folder dataset needs one JSON line per image)")
    with meta.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError:
                raise UserError(f"{meta}:{number}: not a JSON line") from None
            if not isinstance(row, dict):
                raise UserError(f"{meta}:{number}: not a JSON object")
            image = row.get("file_name")
            return set(row), (path / image) if isinstance(image, str) else None
    raise UserError(f"{meta} has no rows")


def _locate(sweep: Sweep, spec: RunSpec, config_path: KeyPath) -> tuple[str, int | None, str]:
    """Where the arm's `config_path` was set: the delta's key when the delta sets it (or its component),
    else the baseline's."""
    if spec.delta != BASELINE:
        _, sources = delta_tree(sweep, spec.delta, sweep.deltas[spec.delta])
        for end in range(len(config_path), 0, -1):
            if config_path[:end] in sources:
                file, line, _ = sweep.locate(sources[config_path[:end]])
                return file, line, format_path(("deltas", spec.delta, *config_path))
    return sweep.locate((BASELINE, *config_path))
