"""Training data: the data registry, image-caption datasets on disk, the eval reference set, the step sampler.

Every dataset yields `{"image": (3, H, W) float in [0, 1], "caption": str, "attrs": (A,) long}`
(`attrs` is -1 for datasets without known attributes), and `prompts(indices)` gives what evaluation
needs of items — caption and attrs — without decoding an image. The caption column is chosen by
config: that is how the study's long- vs short-caption factor is expressed. The eval reference
set (`eval.reference`, real images the metrics compare against) is read here too, with the same
image preparation.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch.utils.data import Dataset

from trainer.data.rows import DataError, JsonlRows, ParquetRows
from trainer.registry import Config, Registry

# `domain`: the name of the domain whose attributes are known (the demo metrics score only it), or None;
# `file_problem(val_caption)`: what keeps its files from being read, checked before submission.
DATA = Registry("data", facts=("domain", "file_problem"))
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


# ---------------------------------------------------------------------------------------------
# Real image-caption data: a parquet file or an image folder with metadata.jsonl.
# ---------------------------------------------------------------------------------------------
class ImageTextConfig(Config):
    domain: ClassVar[str | None] = None  # real images: no known attributes
    kind: Literal["parquet", "folder"]
    path: str = Field(description="parquet file, or folder holding images and metadata.jsonl")
    caption: str = Field(description="caption column used for training, e.g. caption_llm_s")
    image_column: str = Field("image", description="parquet: column of encoded image bytes")
    resolution: int = Field(256, ge=8, description="centre-crop and resize to this side")
    num_val: int = Field(256, ge=1, description="the last rows are held out for validation")

    @model_validator(mode="after")
    def _folder_has_no_image_column(self):
        if self.kind == "folder" and self.image_column != "image":
            raise ValueError("image_column applies to parquet data; a folder names files in metadata.jsonl")
        return self

    def file_problem(self, val_caption: str | None) -> FileProblem | None:
        """What keeps this data from being read (its path, its image column or file names, its caption
        columns; `val_caption` is the eval column), from a parquet footer or metadata.jsonl's first row."""
        path = Path(self.path)
        if not path.exists():
            what = "data file" if self.kind == "parquet" else "data folder"
            return _missing(path, what, ("data", "path"), "a data path that exists " + _RELATIVE)
        try:
            have, image = self._columns(path)
        except (DataError, OSError) as e:
            return FileProblem(_read_error(e, path), ("data", "path"), "a data path that exists " + _RELATIVE)
        where = path / META if self.kind == "folder" else path
        for column, key, expected in self._needed(val_caption):
            if column not in have:
                named = ".".join(key) if key != ("data", "path") else "file_name"
                problem = f"column '{column}' ({named}) is not in {where} (columns: {_listed(have)})"
                return FileProblem(problem, key, expected)
        if image is not None and not image.exists():
            return FileProblem(f"image {image} (first row of {path / META}) does not exist", ("data", "path"),
                               "a data path that exists " + _RELATIVE)  # fmt: skip
        return None

    def _columns(self, path: Path) -> tuple[set[str], Path | None]:
        """(the data's columns, the first row's image file for a folder)."""
        if self.kind == "parquet":
            return _parquet_columns(path), None
        return _first_row(path)

    def _needed(self, val_caption: str | None) -> list[tuple[str, tuple[str, ...], str]]:
        """(column, the key that names it, what would be right), in the order they are checked."""
        image = ((self.image_column, ("data", "image_column"), "data.image_column set to the column of encoded images")
                 if self.kind == "parquet" else
                 ("file_name", ("data", "path"), f"a {META} whose rows name their image in file_name"))  # fmt: skip
        captions = {
            val_caption: (("eval", "caption"), "eval.caption set to one of the data's columns (or left out)")
        }
        captions[self.caption] = (("data", "caption"), "data.caption set to one of the data's columns")
        return [image, *((c, k, e) for c, (k, e) in captions.items() if c)]


class ParquetConfig(ImageTextConfig):
    kind: Literal["parquet"] = "parquet"


class FolderConfig(ImageTextConfig):
    kind: Literal["folder"] = "folder"


_RELATIVE = "(relative paths are from the folder you submit from)"


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


class ImageTextDataset(Dataset):
    """Rows `first .. first + size` of `rows` as (image, captions); images are decoded, centre-cropped and
    resized on access.

    `rows`: a list of row dicts, or a row source read on demand (`trainer.data.rows`: its `take` reads
    each block a batch needs once). `where(row, index)` names a row's source for errors (the file, and
    the row of a parquet file). `caption` None: images only (the eval reference set), every caption
    is "".

    Images are resized with PIL (bicubic on uint8), unless `resized_with("torch")`: PRX's eval set's
    resize, for the metric that reproduces PRX's FID (`torch_resize`)."""

    resize: str = "pil"

    def __init__(
        self, rows, load_image, resolution: int, caption: str | None, where, first: int = 0, size=None
    ):
        self.rows, self.load_image, self.resolution, self.caption = rows, load_image, resolution, caption
        self.where, self.first = where, first
        self.size = len(rows) - first if size is None else size

    def resized_with(self, resize: Literal["pil", "torch"]) -> ImageTextDataset:
        """The same items, their images resized by `resize`: pil (the training images') or torch."""
        view = copy.copy(self)
        view.resize = resize
        return view

    def __len__(self) -> int:
        return self.size

    def _index(self, i: int) -> int:
        j = i + self.size if i < 0 else i
        if not 0 <= j < self.size:
            raise IndexError(f"item {i} of {self.size}")
        return self.first + j

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """The items of a batch (DataLoader calls this with a batch's indices): rows read block by block."""
        at = [self._index(i) for i in indices]
        rows = self.rows.take(at) if hasattr(self.rows, "take") else [self.rows[j] for j in at]
        return [self._item(row, j) for row, j in zip(rows, at, strict=True)]

    def prompts(self, indices: list[int]) -> list[dict]:
        """What evaluation asks of the items `indices` — their caption and attributes — without decoding
        their images."""
        at = [self._index(i) for i in indices]
        rows = self.rows.take(at) if hasattr(self.rows, "take") else [self.rows[j] for j in at]
        unknown = np.full(len(synthetic.ATTRIBUTES), -1, dtype=np.int64)
        return [{"caption": "" if self.caption is None else str(row[self.caption]), "attrs": unknown}
                for row in rows]  # fmt: skip

    def _item(self, row: dict, index: int) -> dict:
        from PIL import Image

        try:
            img = self.load_image(row).convert("RGB")  # convert() decodes: a truncated file fails here
        except (OSError, ValueError, SyntaxError, KeyError, TypeError) as e:
            raise DataError(f"{self.where(row, index)}: cannot read the image ({e})") from None
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
        if self.resize == "torch":
            image = torch_resize(img, self.resolution)
        else:
            img = img.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC)
            image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        return {
            "image": image,
            "caption": "" if self.caption is None else str(row[self.caption]),
            "attrs": torch.full((len(synthetic.ATTRIBUTES),), -1, dtype=torch.long),  # unknown attributes
        }


def torch_resize(img, side: int) -> torch.Tensor:
    """An RGB PIL image → (3, side, side) float in [0, 1], as PRX prepares its eval images
    (prx/dataset/transforms.py): uint8 / 255 in float32 (`image_to_tensor`), torchvision's
    `resize(..., antialias=True)` on that float tensor (bilinear, antialiased, align_corners False:
    `F.interpolate`), clamped to [0, 1]. Not quantised: PRX's eval callback truncates it to uint8."""
    import torch.nn.functional as F

    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255.0)  # (3, H, W)
    x = F.interpolate(x[None], size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return x[0].clamp(0.0, 1.0)


def _split(rows, cfg: ImageTextConfig, val_caption: str | None, loader, where, columns: list[str]):
    """Train and held-out rows (the last num_val) of a row source; `columns` must be in its `columns`."""
    for col in dict.fromkeys([*columns, cfg.caption, val_caption or cfg.caption]):
        if len(rows) and col not in rows.columns:
            raise DataError(
                f"{cfg.path}: no column {col!r}; columns: {', '.join(map(str, sorted(rows.columns)))}"
            )
    if len(rows) <= cfg.num_val:
        raise DataError(f"{cfg.path}: {len(rows)} rows, need more than data.num_val={cfg.num_val}")
    n = len(rows) - cfg.num_val
    return (
        ImageTextDataset(rows, loader, cfg.resolution, cfg.caption, where, 0, n),
        ImageTextDataset(rows, loader, cfg.resolution, val_caption or cfg.caption, where, n, cfg.num_val),
    )


@DATA.register(ParquetConfig)
def build_parquet(cfg: ParquetConfig, val_caption: str | None = None) -> tuple[Dataset, Dataset]:
    """Row groups read on demand by each process (`trainer.data.rows.ParquetRows`), only the image and
    caption columns; never the whole file."""
    rows = ParquetRows(cfg.path, [cfg.image_column, cfg.caption, val_caption or cfg.caption])
    return _split(rows, cfg, val_caption, lambda row: open_encoded(row[cfg.image_column]),
                  lambda row, i: rows.name(i), [cfg.image_column])  # fmt: skip


def open_encoded(value):
    """A parquet cell of encoded image bytes as a (lazy) PIL image."""
    from PIL import Image

    data = value["bytes"] if isinstance(value, dict) else value  # HF datasets store {"bytes", "path"}
    return Image.open(io.BytesIO(data))


@DATA.register(FolderConfig)
def build_folder(cfg: FolderConfig, val_caption: str | None = None) -> tuple[Dataset, Dataset]:
    """metadata.jsonl read in blocks on demand (`trainer.data.rows.JsonlRows`), images opened on access."""
    from PIL import Image

    root = Path(cfg.path)
    meta = root / META
    if not meta.exists():
        raise FileNotFoundError(
            f"{meta}: missing; a folder dataset needs one JSON line per image with file_name"
        )
    return _split(JsonlRows(meta), cfg, val_caption, lambda row: Image.open(root / row["file_name"]),
                  lambda row, i: f"{root / str(row.get('file_name', '?'))} ({meta.name} row {i})",
                  ["file_name"])  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The eval reference set: real images the metrics compare against (PRX scores on Unsplash photos).
# ---------------------------------------------------------------------------------------------
class ReferenceConfig(Config):
    """`eval.reference`: a separate set of real images, instead of the held-out rows' images."""

    kind: Literal["parquet", "folder"] = Field(
        description="parquet: a file (or folder of parquet files) with a column of encoded images; "
        "folder: image files (png, jpg, webp, ...), recursive, read in path order"
    )
    path: str = Field(description="the parquet file or the image folder")
    image_column: str = Field("image", description="parquet: column of encoded image bytes")

    @model_validator(mode="after")
    def _folder_has_no_image_column(self):
        if self.kind == "folder" and self.image_column != "image":
            raise ValueError(
                "image_column applies to a parquet reference set; a folder's images are its files"
            )
        return self

    def file_problem(self) -> FileProblem | None:
        """What keeps the reference set from being read, from its footer or its folder listing, or None."""
        path, at = Path(self.path), ("eval", "reference", "path")
        expected = "eval.reference.path naming a parquet file or a folder of images that exists " + _RELATIVE
        if not path.exists():
            return _missing(path, f"reference {'file' if self.kind == 'parquet' else 'folder'}", at, expected)
        try:
            if self.kind == "parquet" and self.image_column not in (have := _parquet_columns(path)):
                problem = f"column '{self.image_column}' (eval.reference.image_column) is not in {path} (columns: {_listed(have)})"
                return FileProblem(problem, ("eval", "reference", "image_column"),
                                   "eval.reference.image_column set to the column of encoded images")  # fmt: skip
            if self.kind == "folder" and not path.is_dir():
                return FileProblem(f"{path} is not a folder (eval.reference kind: folder needs one holding images)",
                                   at, expected)  # fmt: skip
            if self.kind == "folder":
                from eval.images import IMAGE_SUFFIXES, image_files

                if not image_files(path):
                    return FileProblem(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}", at, expected)
        except (DataError, OSError) as e:
            return FileProblem(_read_error(e, path), at, expected)
        return None


class ReferenceSet:
    """The images of `eval.reference`, prepared exactly like training images (centre crop, bicubic
    resize to the data resolution), in order: parquet rows, or files sorted by path.

    Listed at construction, so a missing, empty or unreadable set fails at set-up, before training;
    decoded only when the metrics' reference features are not cached yet."""

    def __init__(self, cfg: ReferenceConfig, resolution: int):
        self.cfg, self.resolution, self.root = cfg, resolution, Path(cfg.path)
        if cfg.kind == "parquet":  # footers only; rows are read a row group at a time
            hint = {cfg.image_column: "eval.reference.image_column"}
            self._parquet = ParquetRows(cfg.path, [cfg.image_column], "eval.reference.path", hint)
            self.files = [Path(f) for f in self._parquet.files]
            self.size = len(self._parquet)
        else:
            from eval.images import IMAGE_SUFFIXES, image_files

            if not self.root.is_dir():
                raise DataError(f"{cfg.path}: no such image folder (eval.reference.path)")
            self.files = image_files(self.root)
            self.size = len(self.files)
            if not self.files:
                raise DataError(
                    f"{cfg.path}: no images ({', '.join(IMAGE_SUFFIXES)}) under it (eval.reference.path)"
                )

    def __len__(self) -> int:
        return self.size

    def identity(self) -> str:
        """The set's name in the reference-feature cache key: kind, path, image column, resolution and
        a digest of each file's name, size and modification time. Every arm reading the same files
        shares one entry; a changed, added or removed file makes a new one (never a stale reuse)."""
        stats = [(os.path.relpath(f, self.root), (s := f.stat()).st_size, s.st_mtime_ns) for f in self.files]
        digest = hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:12]
        column = f"[{self.cfg.image_column}]" if self.cfg.kind == "parquet" else ""
        return f"reference:{self.cfg.kind}:{self.root.resolve()}{column}@{self.resolution}px#{digest}"

    def images(self, n: int) -> ImageTextDataset:
        """The first `n` images as a dataset of training-style items (decoded on access)."""
        if self.cfg.kind == "parquet":
            rows, column = self._parquet, self.cfg.image_column
            return ImageTextDataset(rows, lambda row: open_encoded(row[column]), self.resolution, None,
                                    lambda row, i: rows.name(i), 0, min(n, len(rows)))  # fmt: skip
        from PIL import Image

        return ImageTextDataset([{"file": f} for f in self.files[:n]], lambda row: Image.open(row["file"]),
                                self.resolution, None, lambda row, i: str(row["file"]))  # fmt: skip


class StepBatchSampler(torch.utils.data.Sampler):
    """This rank's indices for steps `start_step .. total_steps`, a pure function of (seed, step).

    The global index stream is a fresh permutation per epoch; step s takes the global batch
    at positions [s·B, (s+1)·B) and each rank its contiguous slice. So a resumed run reads
    exactly the batches an uninterrupted one would, and N processes read together what one
    process reads alone.
    """

    def __init__(
        self,
        n: int,
        global_batch: int,
        seed: int,
        start_step: int,
        total_steps: int,
        rank: int = 0,
        world: int = 1,
    ):
        if global_batch % world:
            raise ValueError(f"train.batch_size={global_batch} is not divisible by {world} processes")
        self.n, self.b, self.seed = n, global_batch, seed
        self.start, self.total, self.rank, self.world = start_step, total_steps, rank, world
        self._perm: tuple[int, np.ndarray] | None = None

    def _position(self, pos: int) -> int:
        epoch, offset = divmod(pos, self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return int(self._perm[1][offset])

    def global_batch(self, step: int) -> list[int]:
        return [self._position(p) for p in range(step * self.b, (step + 1) * self.b)]

    def __iter__(self):
        per_rank = self.b // self.world
        for step in range(self.start, self.total):
            yield self.global_batch(step)[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __len__(self) -> int:
        return self.total - self.start


from trainer.data import synthetic  # noqa: E402, F401 - the synthetic kind registers itself in DATA
