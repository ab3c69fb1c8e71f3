"""Fixtures for the orchestrator's tests: sweep files in a temporary directory and an in-process CLI."""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from ablate.cli import main

# A complete sweep at test size (the demo's baseline, shrunk: seconds per arm on a CPU).
# Line numbers matter: the bad-input tests assert them.
SWEEP = """\
name: t
baseline:
  model: {preset: tiny}
  data: {kind: synthetic, resolution: 16, caption: long, num_train: 64, num_val: 8}
  text_encoder: {kind: tiny-t5, d_model: 32, max_length: 32}
  tokenizer: {kind: pixel}
  optimizer: {kind: adamw, lr: 1.0e-3}
  precision: {kind: fp32}
  train: {steps: 4, batch_size: 4, warmup_steps: 1, threads: 1}
  checkpoint: {every: 2}
  eval: {every: 2, batch_size: 8}
  log: {every: 1}
deltas:
  lr-high:
    optimizer.lr: 3e-3
seeds: [0]
launcher: {executor: debug}
"""


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh current directory: sweeps without output_dir write runs/<name> here."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def write_sweep(workdir: Path):
    """Write a sweep file (default: SWEEP) and return its path."""

    def write(text: str = SWEEP, name: str = "sweep.yaml") -> Path:
        path = workdir / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run `ablate ARGS...` in this process; returns exit code, stdout, stderr."""

    def invoke(*args: str | Path) -> Result:
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return invoke


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
