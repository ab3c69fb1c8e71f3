"""The SLURM path under a real scheduler: arrays, preemption, time limits, failures, cancel, two tasks, snapshots.

The real trainer at the tiny preset, `launcher.executor: slurm`, against the single-node cluster of
`scripts/local-slurm.sh` (the `slurm_cluster` fixture). Every scenario's sweep is submitted at the start
(`launched`), so the arms run side by side and the module takes as long as its longest scenario.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from wandb_records import read_run

from ablate.cli import main
from ablate.running.store import ArmView, observe
from ablate.sweep.schema import Sweep, load_sweep
from core.records import Status
from core.rundir import CANCELLED, DONE, FAILED, STALE, RunDir
from trainer import tracking
from trainer.data.rows import DataError
from trainer.runtime import checkpoint

UNMOUNTED = "/ablate-test-not-mounted/train.parquet"
BASELINE = {
    "model": {"preset": "tiny"},
    "data": {"kind": "synthetic", "resolution": 16, "caption": "long", "num_train": 256, "num_val": 8},
    "text_encoder": {"kind": "tiny-t5", "d_model": 32, "max_length": 32},
    "tokenizer": {"kind": "pixel"},
    "optimizer": {"kind": "adamw", "lr": 1.0e-3},
    "precision": {"kind": "fp32"},
    "train": {"steps": 150, "batch_size": 4, "warmup_steps": 1, "threads": 1},
    "checkpoint": {"every": 10000},
    "eval": {"every": 10000, "batch_size": 8},
    "log": {"every": 10, "wandb": {"mode": "disabled"}},
}
TERMINAL = (DONE, FAILED, CANCELLED)


def scenario(root: Path, name: str, *, deltas=None, launcher=None, **baseline) -> Path:
    """A sweep file `name.yaml` under `root`: BASELINE with `baseline` sections merged in."""
    base = {k: {**v, **baseline.get(k, {})} for k, v in BASELINE.items()}
    text = {
        "name": name,
        "output_dir": str(root / "runs" / name),
        "baseline": base,
        "deltas": deltas or {},
        "seeds": [0],
        "launcher": {"executor": "slurm", "time_limit_min": 10, **(launcher or {})},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(text, sort_keys=False))
    return path


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def ablate(*args, cwd: Path | None = None) -> Result:
    """`ablate ARGS` as a user types it on the login node (in this process: the sweeps hold absolute paths)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0
    return Result(code, out.getvalue(), err.getvalue())


@dataclass
class Launched:
    path: Path
    sweep: Sweep
    run: Result
    seconds: float
    status_at_once: Result

    def arm(self, name: str = "baseline-s0") -> RunDir:
        return RunDir(self.sweep.root / name)


@pytest.fixture(scope="module")
def launched(slurm_cluster, tmp_path_factory) -> dict[str, Launched]:
    root = tmp_path_factory.mktemp("slurm")
    long = {"train": {"steps": 3000}}
    paths = {
        "array": scenario(
            root, "array", deltas={"lr-high": {"optimizer.lr": 3e-3}, "lr-low": {"optimizer.lr": 3e-4}},
            launcher={"array_parallelism": 2},
        ),
        "preempt": scenario(
            root, "preempt", train={"steps": 600}, log={"every": 5, "wandb": {"mode": "offline", "project": "t"}}
        ),
        # A 2-minute limit whose stop signal is due 15 s after the start: Slurm sends it at its next
        # 30-s tick, so every job of the arm is stopped 15-45 s in, with 75 s left to reach the next
        # log point (every 200 steps), save and be requeued; the arm needs at most 4 jobs for its 800
        # steps. (A requeued job that waited in the queue can get it the moment it starts: see
        # `wait_to_end`.)
        "timelimit": scenario(
            root, "timelimit", train={"steps": 800}, log={"every": 200},
            launcher={"time_limit_min": 2, "signal_delay_s": 105, "max_requeues": 6},
        ),
        "bound": scenario(
            root, "bound", **long, launcher={"time_limit_min": 2, "signal_delay_s": 105, "max_requeues": 0}
        ),
        "failures": scenario(
            root, "failures", deltas={
                "nan": {"optimizer.lr": 1.0e30, "train.grad_clip": None},
                # a mount only compute nodes would have: `ablate run` warns and submits; the job fails
                "bad-data": {"data": {"kind": "parquet", "path": UNMOUNTED, "caption": "text"}},
            },
        ),
        "cancel": scenario(root, "cancel", **long, deltas={"lr-high": {"optimizer.lr": 3e-3}}),
        "ddp": scenario(
            root, "ddp", train={"steps": 20, "batch_size": 8}, log={"every": 2}, launcher={"tasks_per_node": 2}
        ),
    }  # fmt: skip
    launched = {}
    for name, path in paths.items():
        t0 = time.monotonic()
        run = ablate("run", path)
        seconds = time.monotonic() - t0
        assert run.returncode == 0, f"{name}: {run.stdout}{run.stderr}"
        launched[name] = Launched(path, load_sweep(path), run, seconds, ablate("status", path))
    yield launched
    for item in launched.values():  # nothing of this module keeps running
        ablate("cancel", item.path)


def wait_to_end(item: Launched, timeout: float) -> int:
    """Wait until the arm `baseline-s0` has ended. Slurm can send a requeued job that waited in the
    queue its stop signal the moment it starts, before submitit has installed its handler; the job then
    dies at once and the arm shows `stale` (its job is gone, its last checkpoint kept). `ablate run`
    resubmits it, as a user would, and it resumes from that checkpoint. Returns how many times it did."""
    for resubmitted in range(3):
        seen = wait_for(item, lambda v: v["baseline-s0"].state in (*TERMINAL, STALE), timeout, "ended")
        if seen["baseline-s0"].state != STALE:
            return resubmitted
        ablate("run", item.path)
    pytest.fail(f"{item.sweep.name}: stale three times: {seen['baseline-s0'].note}")


def views(item: Launched) -> dict[str, ArmView]:
    return {name: observe(item.sweep.root / name) for name in item.sweep.arm_names()}


def wait_for(item: Launched, done, timeout: float = 300, what: str = "") -> dict[str, ArmView]:
    """Poll the run store until `done(views)` holds; on time-out fail with what every arm says."""
    deadline = time.monotonic() + timeout
    while True:
        seen = views(item)
        if done(seen):
            return seen
        if time.monotonic() > deadline:
            queue = subprocess.run(["squeue", "-a"], capture_output=True, text=True).stdout
            report = "\n".join(f"{n}: {v.state} {v.note} {v.status}" for n, v in seen.items())
            logs = "\n".join(_tail(v) for v in seen.values())
            pytest.fail(
                f"{item.sweep.name}: not {what or 'there'} after {timeout:.0f} s\n{report}\n{queue}\n{logs}"
            )
        time.sleep(1)


def all_ended(seen: dict[str, ArmView]) -> bool:
    return all(v.state in TERMINAL for v in seen.values())


def _tail(view: ArmView) -> str:
    log = Path(view.job.stderr) if view.job and view.job.stderr else None
    return (
        ""
        if log is None or not log.exists()
        else f"--- {log}\n" + "\n".join(log.read_text().splitlines()[-15:])
    )


def job_id(run: RunDir) -> str:
    return str(run.read_job().job_id)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = checkpoint.latest(run_dir)
    return {**load_file(ckpt / "transformer" / "diffusion_pytorch_model.safetensors"),
            **{f"factors.{k}": v for k, v in load_file(ckpt / "factors.safetensors").items()}}  # fmt: skip


def straight_run(run: RunDir, tmp_path: Path) -> Path:
    """The same arm trained here in one go, with no scheduler in between."""
    from trainer import job

    straight = tmp_path / "straight"
    straight.mkdir()
    shutil.copy(run.config, straight / "config.yaml")
    job.run(straight)
    return straight


def test_slurm_requeued_arm_saves_at_the_next_log_point_and_ends_bitwise_like_a_straight_run(
    launched, tmp_path
):
    item = launched["preempt"]
    run = item.arm()
    at_40 = wait_for(
        item, lambda v: ((v["baseline-s0"].status or Status()).step or 0) >= 40, what="at step 40"
    )
    assert at_40["baseline-s0"].state == "running", "the arm ended before it could be preempted"
    subprocess.run(["scontrol", "requeue", job_id(run)], check=True)  # what a preemption does to a job
    wait_for(item, lambda v: v["baseline-s0"].state == DONE, what="done after its requeue")
    status = run.read_status()
    saved = status.last_requeue.step
    assert status.requeues == 1 and "SIGTERM" in status.last_requeue.reason and saved % 5 == 0
    log = Path(run.read_job().stdout).read_text()
    assert f"resumed from step_{saved:08d}" in log  # from the checkpoint written at the next log point
    assert [r.step for r in run.log_rows()] == list(range(5, 601, 5))  # no step logged twice or lost
    straight = final_weights(straight_run(run, tmp_path))
    resumed = final_weights(run.path)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    before, after = (read_run(f) for f in sorted((run.path / "wandb").glob("offline-run-*")))
    assert before.id == after.id == tracking.run_id(run.path, run.read_spec().hash)  # one W&B run per arm
    assert before.history and max(row["_step"] for row in before.history) <= saved  # flushed before the stop
    assert min(row["_step"] for row in after.history if "train/loss" in row) > saved


def test_slurm_cancel_goes_through_the_scheduler_and_run_resubmits_the_cancelled_arm(launched):
    item = launched["cancel"]
    wait_for(item, lambda v: all(((x.status or Status()).step or 0) > 0 for x in v.values()), what="running")
    victim = job_id(item.arm())
    cancelled = ablate("cancel", item.path, "--arm", "baseline-s0")
    assert cancelled.returncode == 0 and f"baseline-s0: job {victim} cancelled" in cancelled.stdout
    seen = views(item)
    assert seen["baseline-s0"].state == CANCELLED and seen["lr-high-s0"].state == "running"
    gone = subprocess.run(["squeue", "-h", "-j", victim], capture_output=True, text=True).stdout.strip()
    deadline = time.monotonic() + 30
    while gone and time.monotonic() < deadline:  # the scheduler lets the job go within KillWait
        time.sleep(1)
        gone = subprocess.run(["squeue", "-h", "-j", victim], capture_output=True, text=True).stdout.strip()
    assert not gone
    assert "cancelled" in ablate("status", item.path).stdout
    again = ablate("run", item.path)
    assert again.returncode == 0 and "submitted 1 arm(s)" in again.stdout
    assert job_id(item.arm()) != victim and job_id(item.arm("lr-high-s0")) == seen["lr-high-s0"].job.job_id
    everything = ablate("cancel", item.path)
    assert everything.returncode == 0 and everything.stdout.count("cancelled") >= 2


def test_slurm_sweep_is_one_throttled_array_run_returns_at_once_and_rank_ranks_it(launched):
    item = launched["array"]
    assert (
        item.seconds < 60 and "submitted 3 arm(s) (slurm)" in item.run.stdout
    )  # nothing stays on the login node
    assert "slurm: " in item.status_at_once.stdout  # status follows the arms from the scheduler too
    ids = [job_id(item.arm(name)) for name in item.sweep.arm_names()]
    array = ids[0].split("_")[0]
    assert sorted(ids) == [f"{array}_{i}" for i in range(3)]  # one job array
    submission = (item.sweep.root / ".submitit" / array / f"{array}_submission.sh").read_text()
    assert "#SBATCH --array=0-2%2" in submission
    seen = wait_for(item, lambda v: all(x.state == DONE for x in v.values()), what="done")
    assert set(seen) == {"baseline-s0", "lr-high-s0", "lr-low-s0"}
    spans = subprocess.run(["sacct", "-j", array, "-X", "-P", "-n", "--format=JobID,Start,End"],
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    events = sorted(
        (datetime.fromisoformat(t), change)
        for line in spans
        for t, change in zip(line.split("|")[1:], (1, -1), strict=True)
    )
    running = most = 0
    for _, change in events:  # ends before starts at the same second: sorted by (time, change)
        running += change
        most = max(most, running)
    assert most <= 2, spans  # array_parallelism: 2
    ranked = ablate("rank", item.path)
    assert ranked.returncode == 0 and "change vs baseline at step 150" in ranked.stdout
    assert "lr-high" in ranked.stdout and "lr-low" in ranked.stdout


def test_slurm_jobs_run_the_code_snapshot_taken_at_submission(launched):
    item = launched["array"]
    wait_for(item, lambda v: v["baseline-s0"].state == DONE, what="done")
    run = item.arm()
    code = json.loads((run.path / "code.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    assert code["commit"] == head and Path(code["snapshot"]).parent == item.sweep.root / ".code"
    assert (Path(code["snapshot"]) / "trainer" / "train.py").exists()
    assert (run.path / "code.diff").exists() == code["dirty"]
    assert run.read_result().versions["code"] == code["snapshot"]  # the job imported the snapshot


def test_slurm_time_limit_signals_saves_requeues_and_completes_and_requeues_are_bounded(launched):
    item, bound = launched["timelimit"], launched["bound"]
    resubmitted = wait_to_end(item, timeout=420)
    status = item.arm().read_status()
    assert status.state == DONE, status
    assert [r.step for r in item.arm().log_rows()] == [200, 400, 600, 800]  # each step trained once
    if not resubmitted:  # a resubmitted arm starts a fresh record: its requeues count from there
        assert 1 <= status.requeues <= 6 and "SIGUSR2" in status.last_requeue.reason
        assert f"requeued {status.requeues}×" in ablate("status", item.path).stdout
    wait_to_end(bound, timeout=240)
    failed = bound.arm().read_status()
    assert failed.state == FAILED and "timed-out too many times" in failed.error  # max_requeues: 0


def test_slurm_a_failing_arm_leaves_the_others_and_run_resubmits_only_it(launched):
    item = launched["failures"]
    seen = wait_for(item, all_ended, what="ended")
    assert {n: v.state for n, v in seen.items()} == {
        "baseline-s0": DONE,
        "nan-s0": FAILED,
        "bad-data-s0": FAILED,
    }
    assert "NonFiniteError: non-finite loss or gradient" in seen["nan-s0"].note
    shown = ablate("status", item.path).stdout
    assert "nan-s0 failed: NonFiniteError" in shown and "bad-data-s0 failed: " in shown
    assert "  │ trainer.train.NonFiniteError: non-finite loss" in shown  # the last lines of its log
    where = f"{DataError.__module__}.DataError"  # the traceback names the class by its module
    assert f"  │ {where}: {UNMOUNTED}: no such parquet file or folder (data.path)" in shown
    before = {n: job_id(item.arm(n)) for n in seen}
    again = ablate("run", item.path)
    assert again.returncode == 0 and "submitted 2 arm(s)" in again.stdout
    after = {n: job_id(item.arm(n)) for n in seen}
    assert after["baseline-s0"] == before["baseline-s0"]
    assert after["nan-s0"] != before["nan-s0"] and after["bad-data-s0"] != before["bad-data-s0"]
    wait_for(item, all_ended, what="ended again")


def test_slurm_two_task_arm_is_a_two_rank_job_matching_one_process(launched, tmp_path):
    item = launched["ddp"]
    wait_for(item, lambda v: v["baseline-s0"].state in TERMINAL, what="ended")
    run = item.arm()
    assert run.read_status().state == DONE and run.read_status().world_size == 2
    one = RunDir(straight_run(run, tmp_path))
    two_ranks, one_process = [r.loss for r in run.log_rows()], [r.loss for r in one.log_rows()]
    assert len(two_ranks) == len(one_process) == 10
    # Same data, noise and t per sample; only the order of the gradient all-reduce differs.
    assert two_ranks == pytest.approx(one_process, rel=1e-4)
