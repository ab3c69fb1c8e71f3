"""The run store decides per arm: skip finished, (re)submit failed or missing, block drift, never touch in-flight."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import filelock
import pytest
import yaml
from ablate_testing import SWEEP, write_json

from ablate.errors import UserError
from ablate.running.ownership import sweep_lock
from ablate.running.store import blocked_error, check_names, observe, plan, prepare
from ablate.sweep.expand import RunSpec, config_hash
from core.records import Status
from core.rundir import RunDir

DEAD_PID = 2**30  # above any pid_max: never a live process


def spec(name: str, lr: float = 1e-3) -> RunSpec:
    config = {"seed": 0, "optimizer": {"kind": "adamw", "lr": lr}}
    delta = name.rsplit("-s", 1)[0]
    return RunSpec(name, delta, 0, {}, config, config_hash(config))


def finished(root: Path, s: RunSpec, state: str = "done", result: bool = True, **status) -> Path:
    run_dir = root / s.name
    write_json(run_dir / "spec.json", s.record("t").to_json())
    write_json(run_dir / "status.json", {"state": state, **status})
    if result:
        write_json(run_dir / "result.json", {"step": 4, "metrics": {}})
    return run_dir


def actions(decisions) -> dict[str, str]:
    return {d.spec.name: d.action for d in decisions}


def test_new_arms_are_submitted_and_plan_writes_nothing(tmp_path):
    decisions = plan([spec("baseline-s0"), spec("x-s0", 3e-3)], tmp_path / "runs")
    assert actions(decisions) == {"baseline-s0": "submit", "x-s0": "submit"}
    assert not (tmp_path / "runs").exists()


def test_finished_with_same_hash_is_skipped_failed_is_resubmitted(tmp_path):
    done, failed, broken = spec("baseline-s0"), spec("a-s0", 2e-3), spec("b-s0", 3e-3)
    finished(tmp_path, done)
    finished(tmp_path, failed, "failed", result=False, error="FloatingPointError: loss is nan at step 3")
    finished(tmp_path, broken, "done", result=False)  # says done but has no result: not finished
    decisions = plan([done, failed, broken], tmp_path)
    assert actions(decisions) == {"baseline-s0": "skip", "a-s0": "resubmit", "b-s0": "resubmit"}
    assert "loss is nan" in decisions[1].reason


def test_changed_config_is_blocked_until_rerun_or_force(tmp_path):
    old, new = spec("x-s0", 1e-3), spec("x-s0", 5e-3)
    other_old, other_new = spec("y-s0", 2e-3), spec("y-s0", 6e-3)
    finished(tmp_path, old)
    finished(tmp_path, other_old, "failed", result=False)
    decisions = plan([new, other_new], tmp_path)
    assert actions(decisions) == {"x-s0": "blocked", "y-s0": "blocked"}
    assert old.hash in decisions[0].reason and new.hash in decisions[0].reason
    err = blocked_error(decisions)
    assert err is not None and "x-s0, y-s0" in err.render() and "--rerun NAME" in err.render()
    assert actions(plan([new, other_new], tmp_path, rerun=["x-s0"])) == {"x-s0": "rerun", "y-s0": "blocked"}
    assert actions(plan([new, other_new], tmp_path, force=True)) == {"x-s0": "rerun", "y-s0": "rerun"}


def test_rerun_of_a_finished_arm_moves_the_old_directory_aside(tmp_path):
    s = spec("x-s0")
    run_dir = finished(tmp_path, s)
    (run_dir / "checkpoints").mkdir()
    decisions = plan([s], tmp_path, rerun=["x-s0"])
    assert actions(decisions) == {"x-s0": "rerun"}
    assert prepare(decisions, tmp_path, "t", "local") == [run_dir]
    assert not (run_dir / "checkpoints").exists()  # nothing stale to resume from
    (kept,) = (tmp_path / ".replaced").iterdir()
    assert kept.name.startswith(f"x-s0-{s.hash}-") and (kept / "result.json").exists()
    assert observe(run_dir).state == "queued"


def test_unknown_rerun_name_suggests_the_closest(tmp_path):
    with pytest.raises(UserError) as e:
        check_names(["muon-s0"], ["muon-s1"], "--rerun")
    assert "did you mean 'muon-s0'?" in e.value.render() and e.value.path == "--rerun"


def queued(root: Path, s: RunSpec, **job) -> Path:
    run_dir = root / s.name
    write_json(run_dir / "spec.json", s.record("t").to_json())
    write_json(run_dir / "status.json", {"state": "submitted"})
    write_json(run_dir / "job.json", {"host": socket.gethostname(), **job})
    return run_dir


def test_in_flight_arm_is_skipped_even_when_asked_or_changed(tmp_path):
    s = spec("x-s0")
    queued(tmp_path, s, executor="debug", job_id=None, submitter_pid=os.getpid())  # owned by a live process
    for kwargs in ({}, {"rerun": ["x-s0"]}, {"force": True}):
        (d,) = plan([s], tmp_path, **kwargs)
        assert d.action == "skip" and d.reason.startswith("in flight (submitted")
    (d,) = plan([spec("x-s0", 9e-3)], tmp_path, force=True)
    assert d.action == "skip" and "cancel its job" in d.reason


def test_arm_whose_job_died_is_stale_and_resubmitted(tmp_path):
    s = spec("x-s0")
    queued(tmp_path, s, executor="local", job_id=str(DEAD_PID), submitter_pid=os.getpid())
    view = observe(tmp_path / s.name)
    assert view.state == "stale" and str(DEAD_PID) in view.note
    (d,) = plan([s], tmp_path)
    assert d.action == "resubmit" and d.reason.startswith("stale")


def test_a_reused_pid_is_not_taken_for_a_local_job(tmp_path):
    # This process is alive but is not a submitit controller: the arm's job is gone.
    s = spec("x-s0")
    queued(tmp_path, s, executor="local", job_id=str(os.getpid()), submitter_pid=os.getpid())
    assert observe(tmp_path / s.name).state == "stale"


def test_job_on_another_host_is_assumed_alive(tmp_path):
    s = spec("x-s0")
    run_dir = queued(tmp_path, s, executor="local", job_id="123", submitter_pid=1)
    write_json(run_dir / "job.json", {"executor": "local", "job_id": "123", "host": "elsewhere"})
    view = observe(run_dir)
    assert view.state == "submitted" and "cannot check" in view.note
    assert observe(run_dir, check_jobs=False).note == ""


def test_trainer_running_by_hand_is_checked_by_its_pid(tmp_path):
    s = spec("x-s0")
    run_dir = finished(tmp_path, s, "running", result=False, pid=os.getpid(), host=socket.gethostname())
    assert observe(run_dir).state == "running"
    write_json(run_dir / "status.json", {"state": "running", "pid": DEAD_PID, "host": socket.gethostname()})
    assert observe(run_dir).state == "stale"


def test_prepare_writes_config_spec_status_and_job(tmp_path):
    s = spec("x-s0")
    (d,) = plan([s], tmp_path)
    (run_dir,) = prepare([d], tmp_path, "t", "local")
    assert (run_dir / "config.yaml").read_text().startswith("seed: 0\noptimizer:")
    view = observe(run_dir)
    assert view.state == "queued" and view.spec == s.record("t") and view.job.submitter_pid == os.getpid()
    stdout = tmp_path / ".submitit" / "42" / "42_0_log.out"
    RunDir(run_dir).mark_submitted("42", tmp_path / ".submitit" / "%j", stdout, stdout.with_suffix(".err"))
    view = observe(run_dir, check_jobs=False)
    assert view.state == "submitted" and view.status.job_id == "42" and view.log_path == str(stdout)
    assert os.readlink(run_dir / "launcher") == "../.submitit/42"


def test_mark_submitted_does_not_overwrite_a_started_job(tmp_path):
    (run_dir,) = prepare(plan([spec("x-s0")], tmp_path), tmp_path, "t", "local")
    write_json(run_dir / "status.json", {"state": "running", "step": 1})
    RunDir(run_dir).mark_submitted("42", tmp_path, tmp_path / "o", tmp_path / "e")
    assert observe(run_dir, check_jobs=False).status == Status(state="running", step=1)


def test_lock_refuses_a_second_holder(tmp_path):
    with sweep_lock(tmp_path):
        with pytest.raises(UserError, match="another `ablate run`"):
            with sweep_lock(tmp_path):
                pass
    with sweep_lock(tmp_path):  # released again
        pass


def test_second_ablate_run_while_the_lock_is_held_submits_nothing(write_sweep, cli, workdir):
    path = write_sweep(SWEEP)
    root = workdir / "runs" / "t"
    root.mkdir(parents=True)
    with filelock.FileLock(root / ".ablate.lock"):
        result = cli("run", path)
    assert result.code == 2
    assert result.err.startswith("error: another `ablate run` is submitting this sweep")
    assert sorted(p.name for p in root.iterdir()) == [".ablate.lock"]


def test_a_corrupt_record_marks_only_its_arm_unreadable_until_rerun(tmp_path):
    good, bad = spec("baseline-s0"), spec("x-s0", 3e-3)
    finished(tmp_path, good)
    run_dir = finished(tmp_path, bad, "failed", result=False)
    (run_dir / "status.json").write_bytes(b"\x00" * 16)  # zeroed by a crash
    view = observe(run_dir)
    assert view.state == "unreadable" and view.note.startswith(f"{run_dir / 'status.json'}: unreadable")
    decisions = plan([good, bad], tmp_path)
    assert actions(decisions) == {"baseline-s0": "skip", "x-s0": "skip"}
    assert "`--rerun x-s0` starts it afresh" in decisions[1].reason
    (d,) = plan([bad], tmp_path, rerun=["x-s0"])
    assert d.action == "rerun" and prepare([d], tmp_path, "t", "local") == [run_dir]
    (kept,) = (tmp_path / ".replaced").iterdir()
    assert (kept / "status.json").read_bytes() == b"\x00" * 16  # kept, never deleted
    assert observe(run_dir).state == "queued"


def test_a_run_folder_from_before_the_log_section_left_the_hash_is_still_recognised(tmp_path):
    config = {"seed": 0, "optimizer": {"kind": "adamw", "lr": 1e-3}, "log": {"wandb": {"mode": "disabled"}}}
    old = RunSpec("x-s0", "x", 0, {}, config, "0123456789ab")  # hashed the old way, log included
    run_dir = finished(tmp_path, old)
    legacy = {k: v for k, v in old.record("t").to_json().items() if k != "hash_version"}
    write_json(run_dir / "spec.json", legacy)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    now_config = {**config, "log": {"wandb": {"mode": "auto"}}}  # a new logging default
    (d,) = plan([RunSpec("x-s0", "x", 0, {}, now_config, config_hash(now_config))], tmp_path)
    # recognised: what it trained differs only by the trainer's numerics (per-sample draws since
    # HASH_VERSION 4), and the log section is how it ran, never what it trained
    logged = 'runs: log.wandb.mode "disabled" → "auto"'
    assert d.action == "blocked" and d.changes() == [
        "trains: numerics 1 → 2 (config changed)",
        f"{logged} (recorded, not rerun)",
    ]
    (d,) = plan([RunSpec("x-s0", "x", 0, {}, now_config, config_hash(now_config))], tmp_path, force=True)
    assert d.action == "rerun" and d.changes() == [
        "trains: numerics 1 → 2 (trained again)",
        f"{logged} (the resubmission uses it)",
    ]
