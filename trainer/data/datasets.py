"""Training data: a synthetic shapes domain (tests, demo) and image-caption datasets on disk.

Every dataset yields `{"image": (3, H, W) float in [0, 1], "caption": str, "attrs": (A,) long}`
(`attrs` is -1 for datasets without known attributes). The caption column is chosen by
config: that is how the study's long- vs short-caption factor is expressed. The eval reference
set (`eval.reference`, real images the metrics compare against) is read here too, with the same
image preparation.
"""

from __future__ import annotations

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

from eval.metrics import SYNTHETIC_SHAPES
from trainer.registry import Config, Registry

# `domain`: the name of the domain whose attributes are known (the demo metrics score only it), or None.
DATA = Registry("data", facts=("domain",))

# ---------------------------------------------------------------------------------------------
# The synthetic domain: one shape per image, every attribute known, two captions per image.
# ---------------------------------------------------------------------------------------------
ATTRIBUTES: dict[str, list[str]] = {
    "shape": ["circle", "square", "triangle", "diamond"],
    "colour": ["red", "green", "blue", "yellow", "purple", "orange"],
    "size": ["small", "medium", "large"],
    "position": ["top left", "top right", "bottom left", "bottom right", "centre"],
    "background": ["black", "white", "grey", "beige"],
}
_RGB = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.15, 0.7, 0.2),
    "blue": (0.15, 0.3, 0.9),
    "yellow": (0.95, 0.85, 0.1),
    "purple": (0.55, 0.2, 0.75),
    "orange": (0.98, 0.55, 0.1),
    "black": (0.0, 0.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "grey": (0.5, 0.5, 0.5),
    "beige": (0.9, 0.85, 0.7),
}
_RADIUS = {"small": 0.12, "medium": 0.19, "large": 0.27}
_CENTRE = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "centre": (0.5, 0.5),
}


def sample_attributes(seed: int, index: int) -> dict[str, int]:
    """The attributes of image `index` of the domain drawn with `seed` (pure function)."""
    rng = np.random.default_rng([seed, index])
    return {name: int(rng.integers(len(values))) for name, values in ATTRIBUTES.items()}


def render(attrs: dict[str, int], resolution: int, jitter: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Draw one shape, anti-aliased by 4x supersampling. Returns (H, W, 3) float32 in [0, 1]."""
    a = {k: ATTRIBUTES[k][v] for k, v in attrs.items()}
    ss = 4
    n = resolution * ss
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) / n + 0.5 / n  # (n, n) pixel centres in [0, 1)
    cx, cy = _CENTRE[a["position"]]
    cx, cy, r = cx + jitter[0], cy + jitter[1], _RADIUS[a["size"]]
    dx, dy = x - cx, y - cy
    if a["shape"] == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif a["shape"] == "square":
        inside = np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    elif a["shape"] == "diamond":
        inside = np.abs(dx) + np.abs(dy) <= 1.2 * r
    elif a["shape"] == "triangle":  # apex up, base at cy + r
        inside = (dy <= r) & (dy >= -r) & (np.abs(dx) <= 0.6 * (dy + r))
    else:
        raise ValueError(f"unknown shape {a['shape']!r}")
    cover = inside.reshape(resolution, ss, resolution, ss).mean(axis=(1, 3))[..., None]  # (H, W, 1)
    fg, bg = np.array(_RGB[a["colour"]], np.float32), np.array(_RGB[a["background"]], np.float32)
    return (cover * fg + (1 - cover) * bg).astype(np.float32)


def long_caption(attrs: dict[str, int]) -> str:
    """Every attribute, tersely: at most 54 bytes, so a 56-token byte-level encoder sees all of it."""
    a = {k: ATTRIBUTES[k][v] for k, v in attrs.items()}
    return f"{a['size']} {a['colour']} {a['shape']}, {a['position']}, {a['background']} background"


def short_caption(attrs: dict[str, int]) -> str:
    return f"a {ATTRIBUTES['shape'][attrs['shape']]}"


CAPTIONS = {"long": long_caption, "short": short_caption}


class SyntheticConfig(Config):
    domain: ClassVar[str | None] = SYNTHETIC_SHAPES
    kind: Literal["synthetic"] = "synthetic"
    resolution: int = Field(32, ge=8, description="image side in pixels")
    caption: Literal["long", "short"] = Field("long", description="caption column used for training")
    domain_seed: int = Field(0, description="seed of the domain itself; keep it equal across arms")
    num_train: int = Field(50_000, ge=1, description="training images (rendered on the fly)")
    num_val: int = Field(256, ge=1, description="held-out images, disjoint from training")
    jitter: float = Field(0.04, ge=0, le=0.1, description="random shift of the shape centre, in image units")


class SyntheticShapes(Dataset):
    """Images `offset .. offset + length` of the synthetic domain."""

    def __init__(self, cfg: SyntheticConfig, offset: int, length: int, caption: str | None = None):
        self.cfg, self.offset, self.length = cfg, offset, length
        self.caption_fn = CAPTIONS[caption or cfg.caption]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        index = self.offset + i
        attrs = sample_attributes(self.cfg.domain_seed, index)
        rng = np.random.default_rng([self.cfg.domain_seed, index, 1])
        jitter = tuple(rng.uniform(-self.cfg.jitter, self.cfg.jitter, size=2))
        img = render(attrs, self.cfg.resolution, jitter)  # (H, W, 3)
        return {
            "image": torch.from_numpy(img).permute(2, 0, 1).contiguous(),  # (3, H, W)
            "caption": self.caption_fn(attrs),
            "attrs": torch.tensor([attrs[k] for k in ATTRIBUTES], dtype=torch.long),
        }


ATTR_NET_TRAIN_IMAGES = 6000  # renders the domain's attribute net trains on


def attribute_net(cfg: SyntheticConfig, cache_dir: str | Path):
    """The synthetic domain's attribute net (eval.domain): trained once per domain on renders that
    training and held-out data never use, cached in `cache_dir`. The demo metrics score with it; the
    `domain` REPA teacher aligns with its features."""
    from eval.domain import DomainData, get_or_train_attribute_net

    def make_data() -> DomainData:
        ds = SyntheticShapes(cfg, offset=10**9, length=ATTR_NET_TRAIN_IMAGES)
        items = [ds[i] for i in range(len(ds))]
        images = np.stack(
            [(it["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for it in items]
        )
        attrs = np.stack([it["attrs"].numpy() for it in items])
        return DomainData(
            images,
            {a: attrs[:, i] for i, a in enumerate(ATTRIBUTES)},
            {a: len(v) for a, v in ATTRIBUTES.items()},
        )

    key = {"domain": SYNTHETIC_SHAPES, "resolution": cfg.resolution, "domain_seed": cfg.domain_seed,
           "jitter": cfg.jitter, "images": ATTR_NET_TRAIN_IMAGES, "attributes": ATTRIBUTES}  # fmt: skip
    return get_or_train_attribute_net(cache_dir, key, make_data)


@DATA.register(SyntheticConfig)
def build_synthetic(cfg: SyntheticConfig, val_caption: str | None = None) -> tuple[Dataset, Dataset]:
    train = SyntheticShapes(cfg, 0, cfg.num_train)
    val = SyntheticShapes(cfg, cfg.num_train, cfg.num_val, caption=val_caption)
    return train, val


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


class ParquetConfig(ImageTextConfig):
    kind: Literal["parquet"] = "parquet"


class FolderConfig(ImageTextConfig):
    kind: Literal["folder"] = "folder"


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file (and row)."""


class ImageTextDataset(Dataset):
    """Rows of (image, captions); images are decoded, centre-cropped and resized on access.

    `where(row, index)` names a row's source for errors (the file, and the row of a parquet file);
    `first` is the index of rows[0] in that source. `caption` None: images only (the eval reference
    set), every caption is ""."""

    def __init__(
        self, rows: list[dict], load_image, resolution: int, caption: str | None, where, first: int = 0
    ):
        self.rows, self.load_image, self.resolution, self.caption = rows, load_image, resolution, caption
        self.where, self.first = where, first

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        row = self.rows[i]
        try:
            img = self.load_image(row).convert("RGB")  # convert() decodes: a truncated file fails here
        except (OSError, ValueError, SyntaxError, KeyError, TypeError) as e:
            raise DataError(f"{self.where(row, self.first + i)}: cannot read the image ({e})") from None
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize(
            (self.resolution, self.resolution), Image.Resampling.BICUBIC
        )
        arr = np.asarray(img, dtype=np.float32) / 255.0
        return {
            "image": torch.from_numpy(arr).permute(2, 0, 1).contiguous(),
            "caption": "" if self.caption is None else str(row[self.caption]),
            "attrs": torch.full((len(ATTRIBUTES),), -1, dtype=torch.long),
        }


def _split(
    rows: list[dict], cfg: ImageTextConfig, val_caption: str | None, loader, where, columns: list[str]
) -> tuple[Dataset, Dataset]:
    """Train and held-out rows (the last num_val); `columns` must be present in every row."""
    for col in dict.fromkeys([*columns, cfg.caption, val_caption or cfg.caption]):
        if rows and col not in rows[0]:
            raise DataError(f"{cfg.path}: no column {col!r}; columns: {', '.join(map(str, sorted(rows[0])))}")
    if len(rows) <= cfg.num_val:
        raise DataError(f"{cfg.path}: {len(rows)} rows, need more than data.num_val={cfg.num_val}")
    train, val = rows[: -cfg.num_val], rows[-cfg.num_val :]
    return (
        ImageTextDataset(train, loader, cfg.resolution, cfg.caption, where),
        ImageTextDataset(val, loader, cfg.resolution, val_caption or cfg.caption, where, len(train)),
    )


@DATA.register(ParquetConfig)
def build_parquet(cfg: ParquetConfig, val_caption: str | None = None) -> tuple[Dataset, Dataset]:
    import pandas as pd

    try:
        rows = pd.read_parquet(cfg.path).to_dict("records")
    except FileNotFoundError:
        raise DataError(f"{cfg.path}: no such parquet file (data.path)") from None
    except (OSError, ValueError) as e:  # pyarrow's errors derive from these
        raise DataError(f"{cfg.path}: not a readable parquet file ({e})") from None

    return _split(rows, cfg, val_caption, lambda row: open_encoded(row[cfg.image_column]),
                  lambda row, i: f"{cfg.path} row {i}", [cfg.image_column])  # fmt: skip


def open_encoded(value):
    """A parquet cell of encoded image bytes as a (lazy) PIL image."""
    from PIL import Image

    data = value["bytes"] if isinstance(value, dict) else value  # HF datasets store {"bytes", "path"}
    return Image.open(io.BytesIO(data))


@DATA.register(FolderConfig)
def build_folder(cfg: FolderConfig, val_caption: str | None = None) -> tuple[Dataset, Dataset]:
    from PIL import Image

    root = Path(cfg.path)
    meta = root / "metadata.jsonl"
    if not meta.exists():
        raise FileNotFoundError(
            f"{meta}: missing; a folder dataset needs one JSON line per image with file_name"
        )
    rows = []
    for n, line in enumerate(meta.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise DataError(f"{meta}:{n}: not a JSON line") from None
    return _split(rows, cfg, val_caption, lambda row: Image.open(root / row["file_name"]),
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


class ReferenceSet:
    """The images of `eval.reference`, prepared exactly like training images (centre crop, bicubic
    resize to the data resolution), in order: parquet rows, or files sorted by path.

    Listed at construction, so a missing, empty or unreadable set fails at set-up, before training;
    decoded only when the metrics' reference features are not cached yet."""

    def __init__(self, cfg: ReferenceConfig, resolution: int):
        self.cfg, self.resolution, self.root = cfg, resolution, Path(cfg.path)
        if cfg.kind == "parquet":
            self._parquet = _reference_parquet(cfg)
            self.files = [Path(f) for f in self._parquet.files]
            self.size = self._parquet.count_rows()
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
            cells = self._parquet.head(n, columns=[self.cfg.image_column]).column(0).to_pylist()
            return ImageTextDataset([{"image": c} for c in cells], lambda row: open_encoded(row["image"]),
                                    self.resolution, None, lambda row, i: f"{self.cfg.path} row {i}")  # fmt: skip
        from PIL import Image

        return ImageTextDataset([{"file": f} for f in self.files[:n]], lambda row: Image.open(row["file"]),
                                self.resolution, None, lambda row, i: str(row["file"]))  # fmt: skip


def _reference_parquet(cfg: ReferenceConfig):
    """The reference parquet file(s) as a pyarrow dataset (footers read, no rows), with the image column."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    try:
        dataset = ds.dataset(cfg.path, format="parquet")
        names = dataset.schema.names
    except FileNotFoundError:
        raise DataError(f"{cfg.path}: no such parquet file (eval.reference.path)") from None
    except (pa.ArrowException, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{cfg.path}: not a readable parquet file ({first[:160]})") from None
    if cfg.image_column not in names:
        raise DataError(
            f"{cfg.path}: no column {cfg.image_column!r} (eval.reference.image_column); "
            f"columns: {', '.join(sorted(names))}"
        )
    return dataset


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
