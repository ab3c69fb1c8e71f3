"""Shared test data for the orchestrator's tests.

A module with a unique name: `from conftest import ...` would resolve to whichever of the
project's conftest.py files pytest imported first.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def trained_sweep(text: str):
    """The fixtures of a module whose tests share one trained sweep: `trained` (module-scoped: `ablate run`
    on `text`, once, with the sweep's executor) and `sweep_path` (a fresh copy of it in the test's own
    working folder; returns its sweep file). Assign both at module level: `trained, sweep_path = …`."""
    import shutil

    import pytest

    from ablate.cli import main

    @pytest.fixture(scope="module")
    def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
        root = tmp_path_factory.mktemp("trained")
        (root / "sweep.yaml").write_text(text)
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(root)
            with pytest.raises(SystemExit) as exit_:
                main(["run", "sweep.yaml"])
        assert exit_.value.code in (0, None)
        return root

    @pytest.fixture
    def sweep_path(trained: Path, workdir: Path) -> Path:
        shutil.copytree(trained, workdir, dirs_exist_ok=True, symlinks=True)
        return workdir / "sweep.yaml"

    return trained, sweep_path
