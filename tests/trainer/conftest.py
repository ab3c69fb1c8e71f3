import copy
from pathlib import Path

import pytest
import torch
import yaml
from trainer_testing import TINY, merge


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


@pytest.fixture(scope="session")
def domain_cache(tmp_path_factory) -> Path:
    """One eval cache for every test that needs the synthetic domain's attribute net (16 px): it is
    trained once (~45 s on two cores) and loaded by the others."""
    return tmp_path_factory.mktemp("domain-cache")
