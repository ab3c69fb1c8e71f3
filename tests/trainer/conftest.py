import copy
from pathlib import Path

import pytest
import torch
import yaml
from trainer_testing import merge

# The demo's baseline at test size: real code paths, seconds per run.
TINY = {
    "seed": 0,
    "model": {"preset": "tiny"},
    "data": {"kind": "synthetic", "resolution": 16, "caption": "long", "num_train": 512, "num_val": 16},
    "text_encoder": {"kind": "tiny-t5", "d_model": 32, "max_length": 32},
    "tokenizer": {"kind": "pixel"},
    "optimizer": {"kind": "adamw", "lr": 1e-3},
    "precision": {"kind": "fp32"},
    "train": {"steps": 8, "batch_size": 4, "warmup_steps": 2, "threads": 1},
    "checkpoint": {"every": 4},
    "eval": {"every": 4, "caption": "long", "batch_size": 8},
    "log": {"every": 2},
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest and does not fight other processes for the two cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_cfg():
    return copy.deepcopy(TINY)


@pytest.fixture
def make_run(tmp_path):
    """A run directory holding config.yaml = TINY with `overrides` merged in."""

    def make(name: str = "run", **overrides) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "config.yaml").write_text(yaml.safe_dump(merge(TINY, overrides)))
        return d

    return make
