"""Fixtures for the orchestrator's tests: sweep files in a temporary directory and an in-process CLI."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from ablate_testing import SWEEP

from ablate.cli import main


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
