"""Fault injection on the trainer: each fault really made (kill -9 of a real trainer process, zeroed
or truncated files on disk, a full tmpfs), and what the user relies on afterwards: nothing finished
is lost, a resumed run ends bitwise equal to an uninterrupted one, and the failure is one clear line.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from trainer_testing import TINY, crash_at, final_metrics, merge

from core.lock import Busy, WriterLock, live_writer
from core.rundir import RunDir
from trainer import job
from trainer.data.datasets import DataError
from trainer.runtime import checkpoint

REPO = Path(__file__).resolve().parents[2]
LONG = {
    "train": {"steps": 12},
    "checkpoint": {"every": 4, "keep": 5},
    "eval": {"every": 12},
    "log": {"every": 1},
}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint.latest(run_dir) / "transformer" / "diffusion_pytorch_model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def log_steps(run_dir: Path) -> list[int]:
    return [r.step for r in RunDir(run_dir).log_rows()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run every resumed one must equal."""
    d = tmp_path_factory.mktemp("straight") / "run"
    d.mkdir()
    (d / "config.yaml").write_text(yaml.safe_dump(merge(TINY, LONG)))
    torch.set_num_threads(1)
    job.run(d)
    return d


def finished_copy(straight: Path, tmp_path: Path) -> Path:
    d = tmp_path / "run"
    shutil.copytree(straight, d, symlinks=True)
    return d


@pytest.mark.parametrize(
    "damage",
    ["zeroed state", "garbled weights", "truncated factors", "manifest removed"],
)
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
    damage, straight, tmp_path, capsys
):
    d = finished_copy(straight, tmp_path)
    newest = checkpoint.latest(d)
    assert newest.name == "step_00000012"
    if damage == "zeroed state":  # zeroed bytes in the middle of state.pt: once resumed silently
        f = newest / "state.pt"
        data = bytearray(f.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)
        f.write_bytes(bytes(data))
    elif damage == "garbled weights":
        f = newest / "transformer" / "diffusion_pytorch_model.safetensors"
        data = bytearray(f.read_bytes())
        for i in range(len(data) - 512, len(data) - 256):
            data[i] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "truncated factors":
        f = newest / "factors.safetensors"
        f.write_bytes(f.read_bytes()[:-7])
    else:
        (newest / checkpoint.MANIFEST).unlink()
    (d / "result.json").unlink()  # the arm must train its last steps again
    assert checkpoint.verify(newest) is not None

    job.run(d)

    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "step_00000012: fails verification" in warnings[0]
    kept = list((d / "checkpoints" / ".set-aside").iterdir())  # moved aside, never deleted
    assert [p.name.split("-")[0] for p in kept] == ["step_00000012"]
    assert checkpoint.verify(checkpoint.latest(d)) is None
    assert_same_weights(straight, d)
    assert final_metrics(d) == final_metrics(straight)
    assert log_steps(d) == list(range(1, 13))


def test_resume_verifies_the_newest_checkpoint_only_and_an_older_one_only_past_a_bad_one(
    straight, tmp_path, monkeypatch
):
    d = finished_copy(straight, tmp_path)
    read, real = [], checkpoint.matches
    monkeypatch.setattr(
        checkpoint, "matches", lambda path, want: read.append(path.parent) or real(path, want)
    )
    assert checkpoint.newest_verified(d).name == "step_00000012"
    assert {p.relative_to(d / "checkpoints").parts[0] for p in read} == {"step_00000012"}
    read.clear()
    (checkpoint.latest(d) / "state.pt").write_bytes(b"rot")
    assert checkpoint.newest_verified(d).name == "step_00000008"
    assert {p.relative_to(d / "checkpoints").parts[0] for p in read} == {"step_00000012", "step_00000008"}


def test_rescoring_never_uses_a_checkpoint_that_fails_verification(straight, tmp_path):
    d = finished_copy(straight, tmp_path)
    f = checkpoint.latest(d) / "state.pt"
    f.write_bytes(bytes(len(f.read_bytes())))
    with pytest.raises(checkpoint.CorruptCheckpoint, match="step_00000012: fails verification"):
        job.rescore(d, step=12)


def rot(checkpoint_dir: Path) -> None:
    """Zero 4 KiB in the middle of state.pt, as a bad disk does: the size stays, the checksum fails."""
    f = checkpoint_dir / "state.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)
    f.write_bytes(bytes(data))


def keep_checkpoints(run_dir: Path, keep: int) -> None:
    """Set checkpoint.keep in the run's config.yaml (how it runs: the arm trains the same)."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["checkpoint"]["keep"] = keep
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))


def test_when_no_checkpoint_verifies_the_set_asides_and_the_restart_from_zero_are_recorded_and_pruned(
    straight, tmp_path, capsys
):
    """Every checkpoint of a finished arm rotted: the job sets each aside, trains again from step 0 (the
    same weights) and says so in status.json; `.set-aside/` is pruned with the checkpoints."""
    d = finished_copy(straight, tmp_path)
    keep_checkpoints(d, 2)
    for step in (4, 8, 12):
        rot(RunDir(d).checkpoint(step))

    job.run(d)

    status = json.loads((d / "status.json").read_text())
    assert status["state"] == "done" and status["restarted_from_zero"] is True
    entries = status["set_aside"]
    assert [(e["checkpoint"], e["step"], e["reason"]) for e in entries] == [
        (f"step_{step:08d}", step, "state.pt does not match its checksum") for step in (12, 8, 4)
    ]
    assert "no checkpoint verifies; training starts again from step 0" in capsys.readouterr().err
    assert RunDir(d).checkpoint_steps() == [8, 12]
    # the set-aside step 4 is older than the oldest checkpoint kept: pruned; 12 and 8 are kept
    assert sorted(
        p.relative_to(d).as_posix() for p in (d / "checkpoints" / ".set-aside").iterdir()
    ) == sorted(e["moved_to"] for e in entries[:2])
    assert_same_weights(straight, d)
    assert log_steps(d) == list(range(1, 13))


# Installed as sitecustomize in a real trainer process: SIGKILL to itself at the second file the
# deletion of a checkpoint folder removes (shutil.rmtree's removals are relative to a folder's fd).
KILL_WHILE_PRUNING = """
import os, re, signal, sys

removed = []

def hook(event, args):
    if event == "shutil.rmtree" and re.fullmatch(r"(\\.pruning-)?step_\\d+", os.path.basename(os.fspath(args[0]))):
        removed.append(0)
    elif event == "os.remove" and removed and args[1] not in (None, -1):
        removed.append(args[0])
        if len(removed) == 3:
            os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(hook)
"""


def test_a_kill_9_while_pruning_leaves_no_partial_checkpoint_to_resume_from(straight, tmp_path, capsys):
    """keep 1: the save of step 8 deletes step 4; the trainer is killed half-way through deleting it.
    Resume sees only complete checkpoints, never more than `keep`, and ends bitwise equal."""
    d = tmp_path / "run"
    d.mkdir()
    shutil.copy(straight / "config.yaml", d / "config.yaml")
    keep_checkpoints(d, 1)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_WHILE_PRUNING)
    proc = run_in_process(d, pythonpath=[hook])
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, err
    run = RunDir(d)
    assert run.checkpoint_steps() == [8] and checkpoint.verify(run.checkpoint(8)) is None
    assert [p.name for p in run.partial_checkpoints()] == [".pruning-step_00000004"]  # killed mid-deletion

    job.run(d)

    assert "removed .pruning-step_00000004, left by a killed save or deletion" in capsys.readouterr().out
    assert run.partial_checkpoints() == [] and run.checkpoint_steps() == [12]
    assert json.loads((d / "status.json").read_text())["set_aside"] == []  # nothing was mistaken for rot
    assert_same_weights(straight, d)
    assert log_steps(d) == list(range(1, 13))


def run_in_process(run_dir: Path, pythonpath: list[Path] = ()) -> subprocess.Popen:
    path = os.pathsep.join(map(str, [*pythonpath, REPO]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.Popen(
        [sys.executable, "-m", "trainer.job", str(run_dir)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_kill_9_of_a_real_trainer_then_a_hand_run_resumes_bitwise(straight, tmp_path, capsys):
    """kill -9 mid-training with a half-written checkpoint folder and a torn log line left behind;
    while it ran, a second trainer on the same folder was refused; the hand-started resume ends
    bitwise equal to the uninterrupted run, with every step logged once and its throughput kept."""
    d = tmp_path / "run"
    d.mkdir()
    shutil.copy(straight / "config.yaml", d / "config.yaml")
    proc = run_in_process(d)
    try:
        deadline = time.monotonic() + 120
        while not (d / "checkpoints" / "step_00000004").exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert live_writer(RunDir(d)).pid == proc.pid
        with pytest.raises(Busy, match=f"process {proc.pid} on .* is writing this run folder"):
            job.run(d)  # a second trainer, started by hand
        if proc.poll() is None:  # the usual case; if it already finished, the damage below is still resumed
            proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert live_writer(RunDir(d)) is None  # the kernel dropped the dead trainer's lock
    # what a kill -9 during a save and during a log write leaves behind
    partial = RunDir(d).checkpoint_tmp(8)
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "state.pt").write_bytes(b"\x80\x02half a pickle")
    with (d / "log.jsonl").open("a") as f:
        f.write('{"step": 99, "loss": 0.1')

    job.run(d)

    assert not partial.exists()
    assert "dropped 1 torn line" in capsys.readouterr().err
    assert_same_weights(straight, d)
    assert log_steps(d) == list(range(1, 13))
    result = json.loads((d / "result.json").read_text())
    assert result["throughput"]["steps_measured"] > 0


def test_a_trainer_started_by_hand_on_a_folder_in_use_stops_before_writing(straight, tmp_path):
    d = finished_copy(straight, tmp_path)
    with WriterLock(RunDir(d)):  # this process is the live writer
        before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
        second = subprocess.run(
            [sys.executable, "-m", "trainer.job", str(d)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
        )
        after = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    assert second.returncode == 1
    assert second.stderr.strip() == (
        f"error: {d}: process {os.getpid()} on {os.uname().nodename} "
        f"(since {json.loads((d / 'writer.json').read_text())['started_at']}) is writing this run folder"
    )
    assert after == before


def test_a_restart_before_the_first_checkpoint_logs_each_step_once(tmp_path, make_run):
    d = make_run(train={"steps": 6}, checkpoint={"every": 100}, log={"every": 1})
    with crash_at(4), pytest.raises(KeyboardInterrupt):
        job.run(d)
    assert log_steps(d) == [1, 2, 3, 4]  # killed in step 5, no checkpoint yet
    job.run(d)
    assert log_steps(d) == [1, 2, 3, 4, 5, 6]


def test_a_kill_between_the_final_checkpoint_and_result_json_keeps_the_throughput(straight, tmp_path):
    d = finished_copy(straight, tmp_path)
    before = json.loads((d / "result.json").read_text())["throughput"]
    (d / "result.json").unlink()  # the folder as a kill right after the last save leaves it
    after = job.run(d).throughput.to_json()
    assert after == before  # measured over the same steps, kept in the checkpoint


def test_a_symlink_planted_in_a_run_folder_is_not_written_through(straight, tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    shutil.copy(straight / "config.yaml", d / "config.yaml")
    outside, elsewhere = tmp_path / "precious.txt", tmp_path / "elsewhere"
    outside.write_text("the user's file\n")
    elsewhere.mkdir()
    (d / "log.jsonl").symlink_to(outside)
    (d / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(Exception, match="symbolic link"):
        job.run(d)
    assert outside.read_text() == "the user's file\n" and list(elsewhere.iterdir()) == []
    error = json.loads((d / "status.json").read_text())["error"]
    assert error == (
        f"PlantedLink: {d}: checkpoints, log.jsonl are symbolic links; "
        "ablate writes nothing through a link in a run folder (remove them)"
    )


def test_a_link_planted_as_the_sweeps_eval_cache_is_not_written_through(tmp_path):
    """Planted after `ablate run` checked the sweep folder, before the job started: the job refuses it."""
    d = tmp_path / "sweep" / "run"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(merge(TINY, LONG)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (d.parent / ".eval-cache").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(Exception, match="symbolic link"):
        job.run(d)
    assert list(elsewhere.iterdir()) == [] and not (d / "checkpoints").exists()
    error = json.loads((d / "status.json").read_text())["error"]
    assert error.startswith(
        f"PlantedLink: {d.parent}: .eval-cache is a symbolic link; ablate writes nothing through a link in a "
        "sweep folder (remove it; to share reference features between sweeps, set eval.cache_dir)"
    )


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs: room for a run's records, not for a checkpoint of the tiny model."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_fails_the_arm_with_disk_full_and_frees_the_partial_checkpoint(straight, small_disk):
    d = small_disk / "run"
    d.mkdir()
    shutil.copy(straight / "config.yaml", d / "config.yaml")
    with pytest.raises((OSError, RuntimeError)):
        job.run(d)
    status = json.loads((d / "status.json").read_text())
    assert status["state"] == "failed"
    assert status["error"].startswith("disk full: ") and str(d) in status["error"]
    assert RunDir(d).partial_checkpoints() == []  # the space is free again
    assert log_steps(d) == [1, 2, 3, 4]  # what was logged is kept


def parquet(tmp_path: Path, rows: int = 12, image_column: str = "image") -> Path:
    def png(i):
        buf = io.BytesIO()
        Image.new("RGB", (20, 20), (i * 20 % 255, 0, 0)).save(buf, format="PNG")
        return buf.getvalue()

    path = tmp_path / "data.parquet"
    pd.DataFrame({image_column: [png(i) for i in range(rows)], "caption": ["red"] * rows}).to_parquet(path)
    return path


def data_run(tmp_path: Path, path: Path, **data) -> Path:
    d = tmp_path / "run"
    d.mkdir(exist_ok=True)
    cfg = merge(
        TINY,
        {
            "data": {
                "kind": "parquet",
                "path": str(path),
                "caption": "caption",
                "num_val": 4,
                "resolution": 16,
                **data,
            }
        },
    )
    cfg["eval"]["caption"] = "caption"
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    return d


@pytest.mark.parametrize("fault", ["missing file", "missing image column", "truncated image"])
def test_data_faults_name_the_file_and_row(fault, tmp_path):
    path = parquet(tmp_path, image_column="img" if fault == "missing image column" else "image")
    if fault == "missing file":
        path.unlink()
    if fault == "truncated image":
        df = pd.read_parquet(path)
        df.loc[5, "image"] = df.loc[5, "image"][:40]
        df.to_parquet(path)
    d = data_run(tmp_path, path)
    with pytest.raises(DataError):
        job.run(d)
    error = json.loads((d / "status.json").read_text())["error"]
    expected = {
        "missing file": f"DataError: {path}: no such parquet file or folder (data.path)",
        "missing image column": f"DataError: {path}: no column 'image'; columns: caption, img",
        "truncated image": f"DataError: {path} row 5: cannot read the image (",
    }[fault]
    assert error.startswith(expected) and "\n" not in error
