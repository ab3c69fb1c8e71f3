"""Fixtures of the eval tests; the builders live in eval_testing.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from eval_testing import tiny_clip, tiny_dino, write_tiny_inception  # noqa: F401


@pytest.fixture(scope="session")
def tiny_inception_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inception")
    write_tiny_inception(folder)
    return folder


@pytest.fixture(scope="session")
def inception(tiny_inception_dir):
    from eval.extractors import InceptionExtractor

    return InceptionExtractor.load(tiny_inception_dir)


@pytest.fixture(scope="session")
def clip():
    from eval.extractors import ClipExtractor

    return ClipExtractor(tiny_clip())


@pytest.fixture(scope="session")
def dino():
    from eval.extractors import DinoV2Extractor

    return DinoV2Extractor(tiny_dino())


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
