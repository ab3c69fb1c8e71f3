"""W&B as clusters need it, through the real wandb library (offline) and read back from what it wrote."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from trainer_testing import final_metrics
from wandb_records import read_run

from core.records import EvalRecord, Spec
from core.rundir import RunDir
from trainer import job, tracking
from trainer.recorder import WandbConfig
from trainer.runtime import checkpoint

SPEC = {
    "name": "muon-s0",
    "sweep": "demo",
    "delta": "muon",
    "seed": 0,
    "hash": "abc123",
    "overrides": {"optimizer": {"kind": "muon"}, "optimizer.lr": 1e-3},
}


def offline_runs(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def keep_apart(run_dir):
    """wandb names an offline folder by the second it started: a resume within the same second would
    reuse the first one's. Requeues are minutes apart; here the first folder is renamed out of the way."""
    (first,) = offline_runs(run_dir)
    first.rename(first.with_name(first.name.replace("offline-run-", "offline-run-0-")))


def test_an_arm_logs_one_run_and_a_resumed_arm_continues_it(make_run):
    d = make_run(log={"every": 2, "wandb": {"mode": "offline", "project": "ablate-test"}})
    (d / "spec.json").write_text(json.dumps(SPEC))
    job.run(d)
    (d / "result.json").unlink()
    shutil.rmtree(checkpoint.latest(d))  # as if the job had been requeued after step 4
    keep_apart(d)
    job.run(d)
    first, second = (read_run(r) for r in offline_runs(d))
    assert first.id == second.id == tracking.run_id(d, "abc123")
    assert (first.name, first.group, first.job_type, first.tags) == (
        "muon-s0",
        "demo",
        "train",
        ["optimizer"],
    )
    assert first.config["optimizer"]["kind"] == "adamw"  # the resolved config (this folder's), plus …
    assert first.config["ablate"]["overrides"] == SPEC["overrides"]  # … what the delta changed
    logged = {k for row in first.history for k in row}
    assert {"train/loss", "train/lr", "train/grad_norm", "train/batches_per_s", "train/data_s",
            "train/compute_s", "eval/val_loss"} <= logged  # fmt: skip
    assert [row["_step"] for row in second.history if "train/loss" in row] == [6, 8]  # resumed after step 4
    assert second.summary["eval/val_loss"] == final_metrics(d)["val_loss"]


def test_a_sample_grid_is_logged_as_an_image(tmp_path):
    grid = RunDir(tmp_path).eval_grid(4)  # the recorder's run folder saved it just before
    grid.parent.mkdir()
    Image.fromarray(np.full((10, 12, 3), 200, np.uint8)).save(grid)
    tracker = tracking.start(
        WandbConfig(mode="offline"), tmp_path, Spec(**SPEC), {"seed": 0}, job="eval", step=4
    )
    tracker.eval(EvalRecord(step=4, metrics={"val_loss": 0.5}), np.zeros((0, 1, 1, 3), np.uint8))
    tracker.close()
    (run_folder,) = offline_runs(tmp_path)
    run = read_run(run_folder)
    assert run.job_type == "eval" and run.id == tracking.run_id(tmp_path, "abc123", "eval-step4")
    image = next(row for row in run.history if "eval/samples/path" in row)
    assert (image["eval/samples/width"], image["eval/samples/height"]) == (12, 10)
    assert (run_folder / "files" / image["eval/samples/path"]).exists()


def test_auto_mode_follows_wandb_mode_then_credentials(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert tracking.resolve_mode("auto") == "offline"  # a compute node without credentials
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert tracking.resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_mode("auto") == "disabled" and tracking.resolve_mode("offline") == "offline"


def test_wandb_failing_to_start_is_one_warning_and_training_goes_on(make_run, monkeypatch, capfd):
    secret = "sk-" + "7" * 37
    monkeypatch.setenv("WANDB_API_KEY", secret)  # credentials: auto means online …
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # … and the server cannot be reached
    d = make_run(log={"every": 4, "wandb": {"mode": "auto", "init_timeout_s": 15}})
    result = job.run(d)
    assert result.step == 8 and json.loads((d / "status.json").read_text())["state"] == "done"
    err = capfd.readouterr().err
    assert err.count("warning: W&B could not start") == 1 and "training goes on without W&B" in err
    leaked = [p for p in d.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaked == []  # credentials never land in the run folder


@pytest.mark.parametrize(("overrides", "delta", "expected"), [
    ({}, "baseline", ["baseline"]),
    ({"routing": {"kind": "tread"}, "repa.block": 3}, "tread-repa", ["repa", "routing"]),
])  # fmt: skip
def test_tags_are_the_sections_a_delta_changes(overrides, delta, expected):
    assert tracking.tags(overrides, delta) == expected
