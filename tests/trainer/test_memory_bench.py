"""bench/fsdp_memory.py's activation measure on its probe PRX (real forward and backward on the CPU):
what autograd keeps grows linearly in the batch, the trainer's checkpointing keeps only each block's
input, and the projection to a target scales linearly in batch and blocks."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def memory_bench():
    spec = importlib.util.spec_from_file_location("fsdp_memory", ROOT / "bench/fsdp_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def total(saved: dict) -> int:
    return saved["outside"] + sum(saved["blocks"])


def test_checkpointing_keeps_each_block_input_only_and_bytes_grow_linearly_in_batch(memory_bench):
    grid, width = 8, memory_bench.PROBE["hidden_size"]
    full = [memory_bench.saved_bytes(batch, grid, checkpointed=False) for batch in (1, 2, 3)]
    # every sample adds the same bytes, to every block and to the rest
    assert total(full[2]) - total(full[1]) == total(full[1]) - total(full[0]) > 0
    assert [c - b for b, c in zip(full[1]["blocks"], full[2]["blocks"], strict=True)] == [
        b - a for a, b in zip(full[0]["blocks"], full[1]["blocks"], strict=True)
    ]
    ckpt = memory_bench.saved_bytes(2, grid, checkpointed=True)
    assert total(ckpt) < total(full[1])
    assert all(c < f for c, f in zip(ckpt["blocks"], full[1]["blocks"], strict=True))
    # past the first block (which also keeps the text, timestep and RoPE inputs every block shares),
    # a checkpointed block keeps exactly its input tokens: (B, grid², width) in bf16 under autocast
    assert ckpt["blocks"][-1] == 2 * grid * grid * width * 2
    assert ckpt["outside"] == full[1]["outside"]  # checkpointing changes nothing outside the blocks


def test_projection_is_linear_in_batch_and_blocks_and_adds_one_recomputed_block(memory_bench):
    ratios = {  # bytes per sample per channel: (constant, per image token)
        "full": {"block": (100.0, 10.0), "shared": (50.0, 1.0)},
        "checkpointed": {"block": (0.0, 2.0), "shared": (50.0, 1.0)},
    }
    project = memory_bench.activation_bytes
    for ac in (False, True):
        assert project(ratios, 64, 4, 256, 8, ac) == 2 * project(ratios, 64, 4, 256, 4, ac)
        assert project(ratios, 128, 4, 256, 4, ac) == 2 * project(ratios, 64, 4, 256, 4, ac)
    full_block = (100 + 10 * 256) * 64
    kept_block = 2 * 256 * 64
    shared = (50 + 256) * 64
    assert project(ratios, 64, 4, 256, 1, False) == shared + 4 * full_block
    assert project(ratios, 64, 4, 256, 1, True) == shared + 4 * kept_block + full_block
    assert project(ratios, 64, 8, 256, 1, True) - project(ratios, 64, 4, 256, 1, True) == 4 * kept_block
