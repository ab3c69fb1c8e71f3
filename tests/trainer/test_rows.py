"""Data read per process (trainer/data/rows.py): the same samples in the same order as reading the whole
file, at any world size; each rank decodes only the row groups holding its rows; never more than the
cap held."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from trainer.data import rows as rows_module
from trainer.data.datasets import (
    DataError,
    FolderConfig,
    ImageTextDataset,
    ParquetConfig,
    build_folder,
    build_parquet,
    open_encoded,
)
from trainer.data.rows import Held, JsonlRows, ParquetRows
from trainer.data.sampling import StepBatchSampler

N, VAL, GROUP = 60, 6, 7  # rows, held-out rows, rows per row group: 9 groups, the last one short


def png(i: int) -> bytes:
    pixels = np.random.default_rng(i).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def table(lo: int = 0, hi: int = N) -> pa.Table:
    return pa.table(
        {
            "image": [png(i) for i in range(lo, hi)],
            "caption": [f"caption {i}" for i in range(lo, hi)],
            "short": [f"c{i}" for i in range(lo, hi)],
            "unused": [i for i in range(lo, hi)],
        }
    )


@pytest.fixture
def parquet(tmp_path) -> Path:
    path = tmp_path / "data.parquet"
    pq.write_table(table(), path, row_group_size=GROUP)
    return path


def whole_file(path: Path, caption: str = "caption") -> ImageTextDataset:
    """The training rows as the trainer read them before: the whole file as Python dicts."""
    records = pd.read_parquet(path).to_dict("records")
    return ImageTextDataset(records[:-VAL], lambda row: open_encoded(row["image"]), 16, caption, None)


def steps(dataset, batch: int, total: int, rank: int = 0, world: int = 1, workers: int = 0, start: int = 0):
    """Per step: this rank's items, read as the trainer reads them (a DataLoader over the step sampler)."""
    sampler = StepBatchSampler(len(dataset), batch, 5, start, total, rank, world)
    return list(DataLoader(dataset, batch_sampler=sampler, num_workers=workers))


def config(path: Path) -> ParquetConfig:
    return ParquetConfig(path=str(path), caption="caption", resolution=16, num_val=VAL)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_world_size_reads_the_global_batches_of_the_whole_file_read(parquet, world):
    expected = steps(whole_file(parquet), batch=6, total=14)  # 84 samples: more than an epoch
    ranks = [steps(build_parquet(config(parquet))[0], 6, 14, rank, world) for rank in range(world)]
    for step, want in enumerate(expected):
        got = [r[step] for r in ranks]
        assert torch.equal(torch.cat([g["image"] for g in got]), want["image"])  # the same bytes, decoded
        assert [c for g in got for c in g["caption"]] == want["caption"]
    resumed = steps(build_parquet(config(parquet))[0], 6, 14, start=9)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, expected[9:], strict=True))


def test_loader_workers_read_the_same_batches(parquet):
    train, _ = build_parquet(config(parquet))
    two = steps(train, 6, 4, workers=2)
    assert len(train.rows.held) == 0  # the workers decoded, each into its own cache; this process held none
    one = steps(train, 6, 4)
    three = steps(train, 6, 4, workers=2)  # forked after this process opened the file and held groups
    for a, b, c in zip(one, two, three, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["image"], c["image"])
    copy = pickle.loads(pickle.dumps(build_parquet(config(parquet))[0].rows))
    assert len(copy.held) == 0 and copy[3]["caption"] == "caption 3"


def test_each_rank_decodes_only_the_row_groups_holding_its_rows(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(table(0, 100), path, row_group_size=5)  # 20 row groups
    per_rank = []
    for rank in range(2):
        train, _ = build_parquet(config(path))
        read, decode = [], train.rows.held.load
        train.rows.held.load = lambda group, decode=decode, read=read: read.append(group) or decode(group)
        sampler = StepBatchSampler(len(train), 8, 5, 0, 2, rank, 2)
        mine = [i for batch in sampler for i in batch]
        for _ in DataLoader(train, batch_sampler=sampler):
            pass
        needed = {train.rows.locate(i)[0] for i in mine}  # the groups holding this rank's 8 rows
        assert sorted(read) == sorted(needed) and len(needed) < 20  # each needed group decoded once
        assert train.rows.held.decoded == len(needed)
        per_rank.append(needed)
    assert per_rank[0] != per_rank[1]


def test_decoded_row_groups_held_never_exceed_the_cap(parquet, monkeypatch):
    rows = ParquetRows(str(parquet), ["image", "caption"], cap=2)
    held = []
    decode = rows.held.load

    def watched(block):
        held.append(len(rows.held._blocks))  # blocks held while this one decodes
        return decode(block)

    monkeypatch.setattr(rows.held, "load", watched)
    order = np.random.default_rng(0).permutation(N)
    for lo in range(0, N, 5):
        got = rows.take(order[lo : lo + 5].tolist())
        assert [r["caption"] for r in got] == [f"caption {i}" for i in order[lo : lo + 5]]
        assert len(rows.held) <= 2
    assert rows.held.peak == 2 and max(held) <= 1  # room made before decoding
    assert rows.held.decoded == len(held) > 9  # groups were dropped and decoded again
    assert rows.largest > 0 and list(rows.columns) == ["image", "caption"]


def test_a_folder_of_parquet_files_is_read_in_file_order_naming_file_and_row(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    for k, (lo, hi) in enumerate([(0, 25), (25, 40), (40, N)]):
        pq.write_table(table(lo, hi), folder / f"part-{k}.parquet", row_group_size=GROUP)
    train, val = build_parquet(config(folder).model_copy(update={"path": str(folder)}), "short")
    expected = whole_file(folder)
    for i in (0, 24, 25, 39, 40, len(train) - 1):
        assert torch.equal(train[i]["image"], expected[i]["image"])
        assert train[i]["caption"] == expected[i]["caption"]
    assert [val[i]["caption"] for i in range(VAL)] == [f"c{i}" for i in range(N - VAL, N)]
    assert train.rows.name(30) == f"{folder / 'part-1.parquet'} row 5"


@pytest.mark.parametrize("fault", ["missing", "corrupt", "column", "corrupt group"])
def test_bad_parquet_is_one_line_naming_the_file_and_what_was_expected(tmp_path, fault):
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(table(0, 30), folder / "a.parquet", row_group_size=GROUP)
    second = folder / "b.parquet"
    pq.write_table(table(30, N).drop(["short"]) if fault == "column" else table(30, N), second)
    if fault == "corrupt":
        second.write_bytes(b"not parquet at all" * 10)
    if fault == "corrupt group":  # the footer reads; the data pages do not
        data = bytearray(second.read_bytes())
        data[4:400] = bytes(396)
        second.write_bytes(bytes(data))
    path = tmp_path / "none" if fault == "missing" else folder
    with pytest.raises(DataError) as e:
        train, _ = build_parquet(config(path), "short")
        train.__getitems__(list(range(len(train))))
    expected = {
        "missing": f"{path}: no such parquet file or folder (data.path)",
        "corrupt": f"{second}: not a readable parquet file (",
        "column": f"{second}: no column 'short'; columns: caption, image, unused",
        "corrupt group": f"{second} row group 0: cannot be read (",
    }[fault]
    assert str(e.value).startswith(expected) and "\n" not in str(e.value)


def test_folder_metadata_is_read_in_blocks_with_the_same_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(rows_module, "JSONL_BLOCK", 4)
    for i in range(N):
        Image.open(io.BytesIO(png(i))).save(tmp_path / f"{i}.png")
    lines = [json.dumps({"file_name": f"{i}.png", "caption": f"caption {i}"}) for i in range(N)]
    lines[10:10] = ["", "   "]  # blank lines are skipped, as before
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    train, val = build_folder(FolderConfig(path=str(tmp_path), caption="caption", resolution=16, num_val=VAL))
    assert len(train) == N - VAL and val[0]["caption"] == f"caption {N - VAL}"
    meta = JsonlRows(tmp_path / "metadata.jsonl", cap=3)
    order = np.random.default_rng(1).permutation(N).tolist()
    assert [r["caption"] for r in meta.take(order)] == [f"caption {i}" for i in order]
    assert meta.held.peak == 3 and len(meta.starts) == N // 4 + 1
    assert torch.equal(train[7]["image"], whole_file_folder(tmp_path)[7]["image"])
    (tmp_path / "metadata.jsonl").write_text("\n".join([*lines[:20], "{oops", *lines[20:]]) + "\n")
    with pytest.raises(DataError, match=r"metadata.jsonl:21: not a JSON line$"):
        JsonlRows(tmp_path / "metadata.jsonl")


def whole_file_folder(root: Path) -> ImageTextDataset:
    records = [json.loads(x) for x in (root / "metadata.jsonl").read_text().splitlines() if x.strip()]
    return ImageTextDataset(records, lambda row: Image.open(root / row["file_name"]), 16, "caption", None)


def test_held_blocks_are_least_recently_used_and_per_process():
    read = []
    held = Held(lambda key: read.append(key) or str(key), cap=2)
    for key in (1, 2, 1, 3, 1, 2):
        assert held.get(key) == str(key)
    assert read == [1, 2, 3, 2] and held.decoded == 4  # 2 was least recently used when 3 came
    held = Held(str, cap=2)
    held.get(1)
    fresh = pickle.loads(pickle.dumps(held))
    assert len(fresh) == 0 and not fresh.decoded
    with pytest.raises(ValueError, match="cap=0"):
        Held(lambda k: k, cap=0)


def test_regroup_streams_small_row_groups_and_big_groups_are_warned(tmp_path, monkeypatch, capsys):
    big, small = tmp_path / "big.parquet", tmp_path / "small.parquet"
    pq.write_table(table(), big)  # pandas-style: one row group
    monkeypatch.setattr(rows_module, "LARGE_GROUP_BYTES", 1000)
    ParquetRows(str(big), ["image"])
    assert f"warning: {big}: row group 0 holds" in capsys.readouterr().err
    rows_module.main(["regroup", str(big), str(small), "--rows", "16"])
    meta = pq.ParquetFile(small).metadata
    assert meta.num_row_groups == 4
    image = meta.row_group(0).column(0)  # encoded images: neither compressed nor given min/max
    assert image.path_in_schema == "image" and image.compression == "UNCOMPRESSED" and not image.is_stats_set
    assert pq.read_table(small).equals(pq.read_table(big))
    with pytest.raises(SystemExit, match="exists"):
        rows_module.main(["regroup", str(big), str(small)])
    (tmp_path / "bad.parquet").write_bytes(b"nope")
    with pytest.raises(SystemExit, match=r"bad.parquet: not a readable parquet file \("):
        rows_module.main(["regroup", str(tmp_path / "bad.parquet"), str(tmp_path / "out.parquet")])
    assert not (tmp_path / "out.parquet").exists()
