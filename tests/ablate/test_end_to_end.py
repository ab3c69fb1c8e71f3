"""`ablate run` trains real (tiny) arms with the real trainer through submitit, `ablate rank` ranks them."""

from __future__ import annotations

import json
import os
import re

from ablate_testing import SWEEP

from ablate.running.store import observe
from ablate.sweep.schema import load_sweep
from trainer import job as trainer_job

LOCAL = "launcher: {executor: local, time_limit_min: 5, array_parallelism: 2}"


def job_log(job: dict) -> str:
    return "".join(open(job[k]).read() for k in ("stdout", "stderr") if os.path.exists(job[k]))


def states(path) -> dict[str, str]:
    sweep = load_sweep(path)
    return {name: observe(sweep.root / name).state for name in sweep.arm_names()}


def test_debug_executor_trains_ranks_and_skips_finished_arms(write_sweep, cli, workdir):
    path = write_sweep()
    first = cli("run", path)
    assert first.code == 0, first.out + first.err
    assert "2/2 arm(s) done" in first.out
    assert states(path) == {"baseline-s0": "done", "lr-high-s0": "done"}
    run_dir = workdir / "runs" / "t" / "lr-high-s0"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["step"] == 4 and sorted(p.name for p in (run_dir / "eval").glob("*.json")) == [
        "step_2.json",
        "step_4.json",
    ]
    assert json.loads((run_dir / "spec.json").read_text())["overrides"] == {"optimizer.lr": 0.003}
    assert (run_dir / "launcher").is_dir()  # the job's launcher logs, reachable from the run directory

    ranked = cli("rank", path)
    assert ranked.code == 0 and "change vs baseline at step 4" in ranked.out
    row = next(line for line in ranked.out.splitlines() if line.startswith("│ lr-high "))
    assert "done" in row and "1/1" in row
    table = json.loads(cli("rank", path, "--format", "json").out)
    lr_high = next(r for r in table["rows"] if r["delta"] == "lr-high")
    base = next(r for r in table["rows"] if r["delta"] == "baseline")
    assert lr_high["val_loss_change"] == lr_high["val_loss"] - base["val_loss"]

    mtime = (run_dir / "result.json").stat().st_mtime_ns
    again = cli("run", path)
    assert again.code == 0 and "nothing to submit" in again.out
    assert (run_dir / "result.json").stat().st_mtime_ns == mtime


def test_local_executor_never_double_submits_then_reruns_a_changed_arm(write_sweep, cli, workdir):
    path = write_sweep(SWEEP.replace("launcher: {executor: debug}", LOCAL))
    first = cli("run", path, "--no-wait")
    assert first.code == 0, first.out + first.err
    assert "submitted 2 arm(s) (local)" in first.out
    root = workdir / "runs" / "t"
    jobs = [json.loads((root / arm / "job.json").read_text()) for arm in ("baseline-s0", "lr-high-s0")]

    second = cli("run", path)  # while the first run's jobs are in flight
    assert second.code == 0 and "nothing to submit" in second.out
    assert second.out.count("in flight (") == 2
    assert [
        json.loads((root / arm / "job.json").read_text()) for arm in ("baseline-s0", "lr-high-s0")
    ] == jobs

    for job in jobs:  # the local jobs' controllers are this process's children
        try:
            os.waitpid(int(job["job_id"]), 0)
        except ChildProcessError:
            pass  # already reaped
    assert states(path) == {"baseline-s0": "done", "lr-high-s0": "done"}, [job_log(job) for job in jobs]
    # each job's files are in .submitit/<job id>/; no folder named after submitit's pattern is left
    assert sorted(p.name for p in (root / ".submitit").iterdir()) == sorted(job["job_id"] for job in jobs)
    third = cli("run", path)
    assert third.code == 0 and "nothing to submit" in third.out
    ranked = cli("rank", path, "--format", "csv")
    assert ranked.code == 0 and ranked.out.splitlines()[2].startswith("lr-high,done,1/1,")

    path.write_text(path.read_text().replace("    optimizer.lr: 3e-3", "    optimizer.lr: 2e-3"))
    blocked = cli("run", path)
    assert blocked.code == 2 and "config changed for 1 arm(s) that already ran: lr-high-s0" in blocked.err
    rerun = cli("run", path, "--rerun", "lr-high-s0")  # waits by default for the local executor
    assert rerun.code == 0, rerun.out + rerun.err
    assert "1/1 arm(s) done" in rerun.out
    spec = json.loads((root / "lr-high-s0" / "spec.json").read_text())
    assert spec["overrides"] == {"optimizer.lr": 0.002}
    (replaced,) = (root / ".replaced").iterdir()
    assert json.loads((replaced / "spec.json").read_text())["overrides"] == {"optimizer.lr": 0.003}


def note_of(table: str, arm: str) -> str:
    """The note cell of `arm`'s row in `ablate status`'s table, its folded lines joined."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"│ {arm} "))
    cells = []
    for line in lines[start:]:
        if not line.startswith("│") or (cells and line.split("│")[1].strip()):
            break  # the table's end, or the next arm's row
        cells.append(line.split("│")[-2].strip())
    return " ".join(cells)


def test_status_and_report_show_the_checkpoints_set_aside_and_the_restart_from_zero(
    write_sweep, cli, workdir, capsys
):
    """Both kept checkpoints of a finished arm rot; its job runs again, trains from step 0 and is `done`
    again: `ablate status` and the report say what happened, in one line."""
    path = write_sweep()
    assert cli("run", path).code == 0
    run_dir = workdir / "runs" / "t" / "baseline-s0"
    for step in (2, 4):  # zeroed bytes in the middle of state.pt: the size stays, the checksum fails
        f = run_dir / "checkpoints" / f"step_{step:08d}" / "state.pt"
        data = bytearray(f.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)
        f.write_bytes(bytes(data))

    trainer_job.run(run_dir)  # the arm's job again (a requeue, or by hand)

    line = (
        "step_00000004 set aside (state.pt does not match its checksum); "
        "step_00000002 set aside (state.pt does not match its checksum); restarted from step 0"
    )
    capsys.readouterr()  # the job's own output
    status = cli("status", path)
    assert status.code == 0
    assert re.sub(r"\s", "", line) in re.sub(r"\s", "", note_of(status.out, "baseline-s0"))
    assert "set aside" not in note_of(status.out, "lr-high-s0")
    assert cli("report", path).code == 0
    assert line in (workdir / "runs" / "t" / "report.html").read_text()
