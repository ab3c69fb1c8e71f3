"""bench/gpu.py's logic on the CPU at test size: a sweep's arms through the trainer's step on random inputs,
arms with the same step measured once, Muon's parts, the JSON and the README table."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from trainer_testing import TINY

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def gpu_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # its sibling fsdp_memory, as when run as a script
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench/gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def sweep_file(tmp_path) -> Path:
    deltas = {
        "short-captions": {"data.caption": "short"},
        "muon": {"optimizer": {"kind": "muon", "lr": 1e-3}},
        "tread": {"routing": {"kind": "tread", "start": 1, "end": 3}},
    }
    baseline = {k: v for k, v in TINY.items() if k != "seed"}  # a sweep sets seeds per arm
    sweep = {
        "name": "bench-test",
        "output_dir": str(tmp_path / "runs"),
        "baseline": baseline,
        "deltas": deltas,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def test_sweep_arms_are_timed_through_the_trainer_step(gpu_bench, sweep_file, tmp_path):
    args = ["--sweep", str(sweep_file), "--device", "cpu", "--compile", "off", "--batch", "4"]
    gpu_bench.main([*args, "--steps", "1", "--warmup", "1", "--no-anchor", "--out-dir", str(tmp_path)])

    report = json.loads((tmp_path / "cpu-bench-test.json").read_text())
    rows = {r["arm"]: r for r in report["rows"]}
    assert list(rows) == ["baseline", "short-captions", "muon", "tread"]  # the sweep's order
    assert not [r for r in rows.values() if "error" in r]
    # captions are random inputs here: the same step as the baseline's, measured once
    assert rows["short-captions"]["same_step_as"] == "baseline"
    assert rows["short-captions"]["step_s"] == rows["baseline"]["step_s"]
    assert rows["tread"]["tflop_per_step"] < rows["baseline"]["tflop_per_step"]  # routed blocks see half
    muon = rows["muon"]["muon"]
    assert muon["matrices"] == 4 * 7  # tiny PRX: 4 blocks of 7 weight matrices
    assert muon["ns_s"] > 0 and set(muon["projected"]) == {"2", "4", "8", "16"}
    assert rows["baseline"]["memory"]["param_gib"] > 0

    md = (tmp_path / "cpu-bench-test.md").read_text()
    assert md.startswith("| arm | compile | batches/s | step time vs baseline |")
    assert "| baseline | off |" in md and "| short-captions (= baseline) | off |" in md
    assert "muon: Muon's step at world 1" in md


def test_an_arm_not_in_the_sweep_is_named_with_the_valid_ones(gpu_bench, sweep_file, tmp_path):
    with pytest.raises(
        SystemExit, match="--arms sprint: not in .*sweep.yaml; its arms: baseline, short-captions"
    ):
        gpu_bench.main(["--sweep", str(sweep_file), "--arms", "sprint", "--out-dir", str(tmp_path)])
