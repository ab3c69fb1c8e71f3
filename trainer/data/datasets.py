"""Training data: the data registry, image-caption datasets on disk, the eval reference set, the step sampler.

Every dataset yields `{"image": (3, H, W) float in [0, 1], "caption": str, "attrs": (A,) long}`
(`attrs` is -1 for datasets without known attributes), and `prompts(indices)` gives what evaluation
needs of items — caption and attrs — without decoding an image. The caption column is chosen by
config: that is how the study's long- vs short-caption factor is expressed. The eval reference
set (`eval.reference`: photos with their own captions, the eval prompts and the real images the metrics
compare against) is read here too, with the same image preparation.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch.utils.data import Dataset

from trainer.data.rows import DataError, JsonlRows, ParquetRows
from trainer.data.sampling import bucket_sizes, nearest_bucket
from trainer.data.sources import META, RELATIVE, FileProblem, source_problem
from trainer.identity import EVALUATES, TRAINS, mark
from trainer.registry import Config, Registry

# `domain`: the name of the domain whose attributes are known (the demo metrics score only it), or None;
# `file_problem(val_caption)`: what keeps its files from being read, checked before submission.
DATA = Registry("data", facts=("domain", "file_problem"))


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
    buckets: Literal["square", "prx"] = Field(
        "square",
        description="square: every training image centre-cropped to resolution²; prx: aspect-ratio buckets "
        "as PRX trains (prx/dataset/transforms.py ArAwareResize): each training image resized, not cropped, "
        "to the bucket of the nearest aspect ratio, every bucket about resolution² px, one bucket per batch "
        "(held-out rows and evaluation stay square)",
        json_schema_extra=mark(TRAINS, neutral="square"),  # added after hashes existed: square before
    )
    bucket_px: int = Field(
        32,
        ge=1,
        description="buckets: prx: bucket sides are multiples of this (PRX: patch_size_pixels 32, at 256 and "
        "1024 px alike)",
        json_schema_extra=mark(TRAINS, neutral=32),  # added after hashes existed; only read with buckets: prx
    )

    @model_validator(mode="after")
    def _folder_has_no_image_column(self):
        if self.kind == "folder" and self.image_column != "image":
            raise ValueError("image_column applies to parquet data; a folder names files in metadata.jsonl")
        return self

    @model_validator(mode="after")
    def _buckets_fit(self):
        if self.buckets == "square":
            if self.bucket_px != 32:
                raise ValueError("bucket_px applies to buckets: prx; remove it or set buckets: prx")
            return self
        if len(bucket_sizes(self.resolution, self.bucket_px)) < 2:
            raise ValueError(
                f"buckets: prx at resolution {self.resolution} with bucket_px {self.bucket_px} gives a single "
                "square bucket; use a resolution of at least 3 × bucket_px (PRX: 256 or 1024 with 32)"
            )
        return self

    def train_buckets(self) -> list[tuple[int, int]] | None:
        """The (H, W) buckets training images are resized into, or None (square centre crops)."""
        return None if self.buckets == "square" else bucket_sizes(self.resolution, self.bucket_px)

    def file_problem(self, val_caption: str | None) -> FileProblem | None:
        """What keeps this data from being read (its path, its image column or file names, its caption
        columns; `val_caption` is the eval column), from a parquet footer or metadata.jsonl's first row."""
        what = "parquet file or folder" if self.kind == "parquet" else "data folder"  # parquet: either
        return source_problem(self.kind, Path(self.path), what, ("data", "path"),
                               "a data path that exists " + RELATIVE, self._needed(val_caption))  # fmt: skip

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


class ImageTextDataset(Dataset):
    """Rows `first .. first + size` of `rows` as (image, captions); images are decoded, centre-cropped and
    resized on access (with `buckets`: resized into the bucket of their aspect ratio, uncropped).

    `rows`: a list of row dicts, or a row source read on demand (`trainer.data.rows`: its `take` reads
    each block a batch needs once). `where(row, index)` names a row's source for errors (the file, and
    the row of a parquet file). `caption`: the column read as each item's caption.

    Images are resized with PIL (bicubic on uint8), unless `resized_with("torch")`: PRX's eval set's
    resize, for the metric that reproduces PRX's FID (`torch_resize`).

    `buckets`: (H, W) aspect-ratio buckets (`bucket_sizes`). Each image is then resized — stretched, not
    cropped — to the bucket nearest its aspect ratio, with torch's antialiased bilinear resize on the
    float image, as PRX's `ArAwareResize` does; `bucket_index()` tells the sampler every item's bucket."""

    resize: str = "pil"

    def __init__(self, rows, load_image, resolution: int, caption: str, where, first: int = 0, size=None,
                 buckets: list[tuple[int, int]] | None = None):  # fmt: skip
        self.rows, self.load_image, self.resolution, self.caption = rows, load_image, resolution, caption
        self.where, self.first, self.buckets = where, first, buckets
        self.size = len(rows) - first if size is None else size
        self._bucket_index: np.ndarray | None = None

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

    def bucket_index(self, block: int = 256) -> np.ndarray:
        """Every item's bucket (an index into `buckets`), (len,) int64, read once and kept: from each image's
        header (its size; the pixels are not decoded), a block of rows at a time."""
        if self.buckets is None:
            raise ValueError("bucket_index: this dataset has no buckets (data.buckets: square)")
        if self._bucket_index is None:
            out = np.empty(self.size, dtype=np.int64)
            for start in range(0, self.size, block):
                at = list(range(self.first + start, self.first + min(start + block, self.size)))
                rows = self.rows.take(at) if hasattr(self.rows, "take") else [self.rows[j] for j in at]
                for k, (row, j) in enumerate(zip(rows, at, strict=True)):
                    out[start + k] = nearest_bucket(*self._open(row, j).size, self.buckets)
            self._bucket_index = out
        return self._bucket_index

    def _open(self, row: dict, index: int):
        try:
            return self.load_image(row)  # lazy: PIL reads the header, not the pixels
        except (OSError, ValueError, SyntaxError, KeyError, TypeError) as e:
            raise DataError(f"{self.where(row, index)}: cannot read the image ({e})") from None

    def prompts(self, indices: list[int]) -> list[dict]:
        """What evaluation asks of the items `indices` — their caption and attributes — without decoding
        their images."""
        at = [self._index(i) for i in indices]
        rows = self.rows.take(at) if hasattr(self.rows, "take") else [self.rows[j] for j in at]
        unknown = np.full(len(synthetic.ATTRIBUTES), -1, dtype=np.int64)
        return [{"caption": str(row[self.caption]), "attrs": unknown} for row in rows]

    def _item(self, row: dict, index: int) -> dict:
        from PIL import Image

        try:
            img = self.load_image(row).convert("RGB")  # convert() decodes: a truncated file fails here
        except (OSError, ValueError, SyntaxError, KeyError, TypeError) as e:
            raise DataError(f"{self.where(row, index)}: cannot read the image ({e})") from None
        if self.buckets is not None:  # PRX's ArAwareResize: the whole image into its bucket's (H, W)
            image = torch_resize(img, self.buckets[nearest_bucket(*img.size, self.buckets)])
            return self._as_item(image, row)
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
        if self.resize == "torch":
            image = torch_resize(img, self.resolution)
        else:
            img = img.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC)
            image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        return self._as_item(image, row)

    def _as_item(self, image: torch.Tensor, row: dict) -> dict:
        return {
            "image": image,
            "caption": str(row[self.caption]),
            "attrs": torch.full((len(synthetic.ATTRIBUTES),), -1, dtype=torch.long),  # unknown attributes
        }


def torch_resize(img, side: int | tuple[int, int]) -> torch.Tensor:
    """An RGB PIL image → (3, side, side) (or (3, H, W) for side = (H, W)) float in [0, 1], as PRX prepares
    its images (prx/dataset/transforms.py): uint8 / 255 in float32 (`image_to_tensor`), torchvision's
    `resize(..., antialias=True)` on that float tensor (bilinear, antialiased, align_corners False:
    `F.interpolate`), clamped to [0, 1]. Not quantised: PRX's eval callback truncates it to uint8."""
    import torch.nn.functional as F

    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255.0)  # (3, H, W)
    size = (side, side) if isinstance(side, int) else tuple(side)
    x = F.interpolate(x[None], size=size, mode="bilinear", antialias=True, align_corners=False)
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
    return (  # the held-out rows stay square: val_loss and evaluation are the same for every arm
        ImageTextDataset(rows, loader, cfg.resolution, cfg.caption, where, 0, n, cfg.train_buckets()),
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
# The eval reference set: real images with their own captions (PRX: Unsplash photos, prompted with them).
# ---------------------------------------------------------------------------------------------
class ReferenceConfig(Config):
    """`eval.reference`: a separate set of photos with their own captions, instead of the held-out rows.
    Its first `eval.samples` rows are the eval set: each row's caption is a prompt, sampled from that
    row's noise, and its image is a real image the metrics compare with."""

    kind: Literal["parquet", "folder"] = Field(
        description="parquet: a file (or folder of parquet files) with a column of encoded images and the "
        f"caption column; folder: images and a {META} naming each in file_name beside its captions "
        "(as data kind folder), read in row order"
    )
    path: str = Field(description="the parquet file or the image folder")
    image_column: str = Field("image", description="parquet: column of encoded image bytes")
    caption: str = Field(
        description="the column of the set's own captions: the eval prompts, each the caption of the image "
        "it is compared with (PRX's Unsplash set: caption_llm_s)",
        # never None: a reference recorded before this field no longer validates (it must name its
        # captions), so no recorded eval hash holds a reference without one
        json_schema_extra=mark(EVALUATES, neutral=None),
    )

    @model_validator(mode="before")
    @classmethod
    def _names_its_captions(cls, data):
        if isinstance(data, dict) and "caption" not in data:
            raise ValueError(
                "eval.reference needs caption: the column of its own captions, which are the eval prompts "
                "(a reference set brings its prompts: samples are compared with the photos they describe)"
            )
        return data

    @model_validator(mode="after")
    def _folder_has_no_image_column(self):
        if self.kind == "folder" and self.image_column != "image":
            raise ValueError(
                f"image_column applies to a parquet reference set; a folder names its images in {META}"
            )
        return self

    def file_problem(self) -> FileProblem | None:
        """What keeps the reference set from being read (its path, image column or file names, caption
        column), from its parquet footer or its metadata.jsonl's first row, or None."""
        at, kind = (
            ("eval", "reference", "path"),
            "parquet file or folder" if self.kind == "parquet" else "folder",
        )
        expected = (f"eval.reference.path naming photos with their own captions that exist: a parquet file, or a "
                    f"folder of images with {META} {RELATIVE}; or eval.reference: null to score on the held-out "
                    "rows")  # fmt: skip
        image = ((self.image_column, ("eval", "reference", "image_column"),
                  "eval.reference.image_column set to the column of encoded images")
                 if self.kind == "parquet" else
                 ("file_name", at, f"a {META} whose rows name their image in file_name"))  # fmt: skip
        caption = (self.caption, ("eval", "reference", "caption"),
                   "eval.reference.caption set to the column of the reference set's own captions")  # fmt: skip
        return source_problem(self.kind, Path(self.path), f"reference {kind}", at, expected, [image, caption])


class ReferenceSet:
    """The rows of `eval.reference` in order (parquet rows, or metadata.jsonl lines) as a dataset of
    training-style items: the caption, and the image prepared exactly like training images (centre
    crop, bicubic resize to the data resolution).

    Listed at construction, so a missing, empty or unreadable set fails at set-up, before training;
    images are decoded only when the metrics' reference features are not cached yet."""

    def __init__(self, cfg: ReferenceConfig, resolution: int):
        self.cfg, self.resolution, self.root = cfg, resolution, Path(cfg.path)
        if cfg.kind == "parquet":  # footers only; rows are read a row group at a time
            hints = {cfg.image_column: "eval.reference.image_column", cfg.caption: "eval.reference.caption"}
            rows = ParquetRows(cfg.path, [cfg.image_column, cfg.caption], "eval.reference.path", hints)
            self.files = [Path(f) for f in rows.files]
            load, where = lambda row: open_encoded(row[cfg.image_column]), lambda row, i: rows.name(i)
        else:
            rows = self._listed_folder()
            self.files = [rows.meta, *(self.root / str(r["file_name"]) for r in rows.take(range(len(rows))))]
            load = lambda row: _open_image(self.root / row["file_name"])  # noqa: E731
            where = lambda row, i: f"{self.root / str(row.get('file_name', '?'))} ({META} row {i})"  # noqa: E731
        if not len(rows):
            raise DataError(f"{cfg.path}: no rows (eval.reference.path)")
        self.items = ImageTextDataset(rows, load, resolution, cfg.caption, where)

    def _listed_folder(self) -> JsonlRows:
        meta = self.root / META
        if not self.root.is_dir():
            raise DataError(f"{self.cfg.path}: no such folder (eval.reference.path)")
        if not meta.is_file():
            raise DataError(f"{meta} does not exist (eval.reference.path: a reference folder needs one JSON "
                            "line per image, naming it in file_name beside its caption)")  # fmt: skip
        rows = JsonlRows(meta)
        for column, key in (
            ("file_name", "eval.reference.path"),
            (self.cfg.caption, "eval.reference.caption"),
        ):
            if len(rows) and column not in rows.columns:
                raise DataError(
                    f"{meta}: no column {column!r} ({key}); columns: {', '.join(sorted(rows.columns))}"
                )
        return rows

    def __len__(self) -> int:
        return len(self.items)

    def identity(self) -> str:
        """The set's name in the reference-feature cache key: kind, path, image column, resolution and
        a digest of each file's name, size and modification time (a folder's: metadata.jsonl and every
        image it names). Every arm reading the same files shares one entry; a changed, added or removed
        file makes a new one (never a stale reuse). The captions are not in it: the features are the
        images'."""
        stats = []
        for f in self.files:
            try:
                s = f.stat()
            except OSError as e:
                raise DataError(f"{f}: {e.strerror or type(e).__name__} (eval.reference.path)") from None
            stats.append((os.path.relpath(f, self.root), s.st_size, s.st_mtime_ns))
        digest = hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:12]
        column = f"[{self.cfg.image_column}]" if self.cfg.kind == "parquet" else ""
        return f"reference:{self.cfg.kind}:{self.root.resolve()}{column}@{self.resolution}px#{digest}"


def _open_image(path: Path):
    from PIL import Image

    return Image.open(path)


from trainer.data import synthetic  # noqa: E402, F401 - the synthetic kind registers itself in DATA
