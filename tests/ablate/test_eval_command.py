"""`ablate eval`: checkpoints of ended arms scored again through the launcher, and ranked at that step."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import submitit
from ablate_testing import SWEEP, trained_sweep, write_json

from ablate.running import jobs as arm_jobs
from ablate.running.evaljobs import eval_note, mark_eval_queued
from ablate.running.store import observe, plan, prepare
from ablate.sweep.expand import RunSpec, config_hash
from core.rundir import EVAL_JOB, RunDir

# checkpoints kept at steps 2, 3 and 4; evaluated (while training) at steps 2 and 4
EVAL_SWEEP = SWEEP.replace("checkpoint: {every: 2}", "checkpoint: {every: 1, keep: 3}")
ARMS = ("baseline-s0", "lr-high-s0")


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


trained, sweep_path = trained_sweep(EVAL_SWEEP)  # the tiny sweep, trained once for this module


def test_eval_scores_a_kept_step_and_rank_ranks_at_it(sweep_path, cli, workdir):
    root = workdir / "runs" / "t"
    assert sorted(os.listdir(root / "baseline-s0" / "checkpoints")) == [f"step_0000000{i}" for i in (2, 3, 4)]
    status = {arm: read(root / arm / "status.json") for arm in ARMS}
    results = {arm: read(root / arm / "result.json") for arm in ARMS}
    missing = cli("rank", sweep_path, "--step", "3")
    assert missing.code == 2 and "no arm has metrics at step 3" in missing.err

    result = cli("eval", sweep_path, "--step", "3")
    assert result.code == 0, result.out + result.err
    assert "2/2 arm(s) evaluated" in result.out and f"next: ablate rank {sweep_path} --step 3" in result.out
    scored = {}
    for arm in ARMS:
        record = read(root / arm / "eval" / "step_3.json")
        assert record["step"] == 3 and set(record["metrics"]) == {"val_loss"}
        scored[arm] = record["metrics"]["val_loss"]
        assert read(root / arm / "result.json") == results[arm]  # the result (step 4) is left alone
        assert sorted(RunDir(root / arm).metrics_by_step()) == [2, 3, 4]
        assert read(root / arm / "status.json") == status[arm]  # the training's status is left alone
        job = read(root / arm / EVAL_JOB)
        assert job["state"] == "done" and job["step"] == 3 and job["metrics"] == record["metrics"]

    table = json.loads(cli("rank", sweep_path, "--step", "3", "--format", "json").out)
    assert table["step"] == 3
    rows = {r["delta"]: r for r in table["rows"]}
    assert rows["baseline"]["val_loss"] == scored["baseline-s0"]
    assert rows["lr-high"]["val_loss"] == scored["lr-high-s0"]
    assert rows["lr-high"]["val_loss_change"] == scored["lr-high-s0"] - scored["baseline-s0"]
    # the default step is still the last one that every arm reached
    assert "at step 4" in cli("rank", sweep_path).out
    assert cli("status", sweep_path).out.count("eval step 3: done") == 2


def test_eval_defaults_to_the_newest_checkpoint_and_reproduces_its_metrics(sweep_path, cli, workdir):
    run_dir = workdir / "runs" / "t" / "lr-high-s0"
    trained_value = read(run_dir / "eval" / "step_4.json")["metrics"]["val_loss"]
    (run_dir / "eval" / "step_4.json").unlink()

    result = cli("eval", sweep_path, "--arm", "lr-high-s0")
    assert result.code == 0, result.out + result.err
    assert "1/1 arm(s) evaluated" in result.out and "baseline-s0" not in result.out
    assert read(run_dir / "eval" / "step_4.json")["metrics"]["val_loss"] == trained_value  # the same weights
    assert read(run_dir / EVAL_JOB)["step"] == 4
    assert not (workdir / "runs" / "t" / "baseline-s0" / EVAL_JOB).exists()


def test_eval_of_a_failed_arm_that_kept_checkpoints(sweep_path, cli, workdir):
    run_dir = workdir / "runs" / "t" / "lr-high-s0"
    write_json(run_dir / "status.json", {"state": "failed", "step": 4, "error": "RuntimeError: node lost"})
    (run_dir / "result.json").unlink()
    (run_dir / "eval" / "step_2.json").unlink()

    result = cli("eval", sweep_path, "--step", "2")
    assert result.code == 0, result.out + result.err
    assert read(run_dir / "eval" / "step_2.json")["step"] == 2
    assert not (run_dir / "result.json").exists()  # still failed: no result is made up
    table = json.loads(cli("rank", sweep_path, "--step", "2", "--format", "json").out)
    lr_high = next(r for r in table["rows"] if r["delta"] == "lr-high")
    assert lr_high["state"] == "failed" and lr_high["val_loss_change"] is not None


def test_eval_checks_everything_before_submitting(sweep_path, cli, workdir):
    root = workdir / "runs" / "t"
    new_delta = "  new:\n    optimizer.lr: 2e-3\nseeds: [0]"
    sweep_path.write_text(sweep_path.read_text().replace("seeds: [0]", new_delta))
    before = listing(workdir)

    unknown = cli("eval", sweep_path, "--arm", "lr-hihg-s0")
    assert unknown.code == 2
    assert "--arm: no arm named 'lr-hihg-s0' (did you mean 'lr-high-s0'?); expected one of: baseline-s0, lr-high-s0, new-s0" in unknown.err  # fmt: skip
    no_step = cli("eval", sweep_path, "--step", "7")
    assert no_step.code == 2
    assert "--step: baseline-s0: no checkpoint at step 7" in no_step.err
    assert "expected a kept step: 2, 3, 4" in no_step.err
    not_run = cli("eval", sweep_path, "--arm", "new-s0")
    assert not_run.code == 2 and "--arm: arm 'new-s0': not run yet" in not_run.err
    write_json(root / "lr-high-s0" / "status.json",
               {"state": "running", "step": 3, "pid": os.getpid(), "host": socket.gethostname()})  # fmt: skip
    running = cli("eval", sweep_path, "--arm", "lr-high-s0", "--step", "2")
    assert running.code == 2 and "arm 'lr-high-s0': running" in running.err
    no_wait = cli("eval", sweep_path, "--no-wait")
    assert no_wait.code == 2 and "debug executor" in no_wait.err
    for result in (unknown, no_step, not_run, running, no_wait):
        assert result.err.count("\n") == 1 and "Traceback" not in result.err
    assert listing(workdir) == before  # nothing written, nothing submitted

    implicit = cli("eval", sweep_path, "--step", "2")  # without --arm: arms that have not ended are left out
    assert implicit.code == 0, implicit.out + implicit.err
    rows = {line.split("│")[1].strip(): line for line in implicit.out.splitlines() if line.startswith("│")}
    assert "left out" in rows["lr-high-s0"] and "running" in rows["lr-high-s0"]
    assert "left out" in rows["new-s0"] and "not run yet" in rows["new-s0"]
    assert "1/1 arm(s) evaluated" in implicit.out


def test_an_arm_being_evaluated_is_neither_evaluated_again_nor_resubmitted(sweep_path, cli, workdir):
    run_dir = workdir / "runs" / "t" / "lr-high-s0"
    write_json(run_dir / "status.json", {"state": "failed", "error": "RuntimeError: node lost"})
    write_json(run_dir / EVAL_JOB, {"state": "running", "step": 2, "executor": "debug", "job_id": None,
                                    "host": socket.gethostname(), "submitter_pid": os.getpid()})  # fmt: skip
    again = cli("eval", sweep_path, "--arm", "lr-high-s0")
    assert again.code == 2 and "already being evaluated (step 2, running" in again.err
    dry = cli("run", sweep_path, "--dry-run")
    row = next(line for line in dry.out.splitlines() if "lr-high-s0" in line)
    assert "skip" in row and "being evaluated" in dry.out


def test_eval_job_is_checkpointable_and_records_its_outcome(tmp_path, monkeypatch):
    import trainer.job

    config = {"seed": 0}
    (run_dir,) = prepare(plan([RunSpec("a-s0", "a", 0, {}, config, config_hash(config))], tmp_path), tmp_path, "t",
                         "debug")  # fmt: skip
    job = arm_jobs.EvalArm({str(run_dir): 3})
    assert isinstance(job, submitit.helpers.Checkpointable)
    assert job.checkpoint(str(run_dir)).function is job

    calls = []
    monkeypatch.setattr(trainer.job, "rescore", lambda d, step: calls.append((d, step)) or {"val_loss": 0.5})
    mark_eval_queued(run_dir, 3, "debug")
    (submitted,) = arm_jobs.submit(submitit.DebugExecutor(tmp_path / ".submitit"), [run_dir], fn=job)
    assert read(run_dir / EVAL_JOB)["state"] == "submitted" and read(run_dir / "job.json")["job_id"] is None
    assert submitted.result() == {"val_loss": 0.5} and calls == [(str(run_dir), 3)]
    record = read(run_dir / EVAL_JOB)
    assert record["state"] == "done" and record["metrics"] == {"val_loss": 0.5}
    assert observe(run_dir).state == "queued"  # the training's status is not the eval job's

    def missing_checkpoint(d, step):
        raise FileNotFoundError(f"{d}: no checkpoint at step {step}; checkpoints kept: none")

    monkeypatch.setattr(trainer.job, "rescore", missing_checkpoint)
    with pytest.raises(FileNotFoundError):
        job(str(run_dir))
    record = read(run_dir / EVAL_JOB)
    assert record["state"] == "failed" and record["metrics"] is None
    assert record["error"].startswith("FileNotFoundError:")
    assert eval_note(run_dir).startswith("eval step 3: failed: FileNotFoundError: ")


@pytest.mark.parametrize("command", ["status", "rank"])
def test_a_sweep_file_edited_into_an_invalid_one_is_one_error_not_a_line_per_arm(sweep_path, cli, command):
    """After the arms ran, a typo in the sweep file: status and rank stop as run does, at the key."""
    sweep_path.write_text(sweep_path.read_text().replace("{steps:", "{stepz:"))
    result = cli(command, sweep_path)
    assert result.code == 2 and result.err.count("\n") == 1
    assert "baseline.train.stepz: unknown key 'stepz' (did you mean 'steps'?)" in result.err
