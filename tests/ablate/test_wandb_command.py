"""`ablate sync` uploads offline runs with the real `wandb sync`; `ablate rank --wandb` logs the impact table."""

from __future__ import annotations

import json

import pytest
from ablate_testing import SWEEP, write_json
from wandb_records import read_run

from core.sweepdir import SweepDir

OFFLINE = SWEEP.replace("  log: {every: 1}", "  log: {every: 1, wandb: {mode: offline, project: t}}")


@pytest.fixture
def offline_arm(write_sweep, workdir):
    """The sweep, and one arm that logged a W&B run offline (as on a compute node without internet)."""
    import wandb

    path = write_sweep(OFFLINE)
    run_dir = workdir / "runs" / "t" / "baseline-s0"
    run_dir.mkdir(parents=True)
    SweepDir(run_dir.parent).write_mark("t")  # the sweep folder as `ablate run` made it
    run = wandb.init(project="t", mode="offline", id="arm0", dir=str(run_dir))
    run.log({"train/loss": 1.0}, step=1)
    run.finish()
    return path, run_dir


def test_sync_lists_then_uploads_and_says_in_one_line_when_it_cannot(offline_arm, cli, monkeypatch):
    path, run_dir = offline_arm
    dry = cli("sync", path, "--dry-run")
    assert (
        dry.code == 0
        and "1 offline W&B run(s), 1 not synced yet" in dry.out
        and "baseline-s0: offline-run-" in dry.out
    )
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv(
        "WANDB_BASE_URL", "http://127.0.0.1:9"
    )  # W&B unreachable: wandb sync retries, we give up
    failed = cli("sync", path, "--timeout", "3")
    assert failed.code == 1 and failed.err.count("\n") == 1
    assert failed.err.startswith("error: 1 of 1 run(s) not synced: wandb sync did not finish within 3 s")
    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    (folder / "run-arm0.wandb.synced").touch()  # what wandb sync leaves after an upload
    again = cli("sync", path)
    assert again.code == 0 and "(synced)" in again.out and "nothing to upload" in again.out


def test_rank_logs_the_impact_table_in_the_sweep_group(write_sweep, cli, workdir):
    path = write_sweep(OFFLINE)
    SweepDir(workdir / "runs" / "t").write_mark("t")
    for arm, loss in (("baseline-s0", 1.0), ("lr-high-s0", 0.8)):
        write_json(workdir / "runs" / "t" / arm / "spec.json", {"name": arm})
        write_json(workdir / "runs" / "t" / arm / "status.json", {"state": "done", "step": 4})
        write_json(workdir / "runs" / "t" / arm / "result.json", {"step": 4, "throughput": {}})
        write_json(
            workdir / "runs" / "t" / arm / "eval" / "step_4.json", {"step": 4, "metrics": {"val_loss": loss}}
        )
    result = cli("rank", path, "--wandb")
    assert result.code == 0, result.err
    assert "impact table logged to W&B project t, group t (offline)" in result.err
    (folder,) = (workdir / "runs" / "t" / "wandb").glob("offline-run-*")
    run = read_run(folder)
    assert (run.group, run.job_type) == ("t", "rank")
    logged = next(row for row in run.history if "impact/path" in row)
    table = json.loads((folder / "files" / logged["impact/path"]).read_text())
    rows = [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
    assert [r["delta"] for r in rows] == ["baseline", "lr-high"]
    assert rows[1]["val_loss_change"] == pytest.approx(-0.2)
    assert {"val_loss_ci_low", "val_loss_noise", "val_loss_q", "val_loss_seeds_needed"} <= set(
        table["columns"]
    )
    assert run.config["verdicts"] == {
        "interval": "moderated",
        "rule": "bh",
    }  # the same table as the terminal's
