"""`ablate cancel` and the end of `ablate run --wait`, with real jobs: real trainers started by submitit's local
executor (through its `/bin/sh -c` wrapper, since the code snapshot gives it setup lines), real signals, and
each process looked up in /proc afterwards. Arms train for far longer than a test lasts, so only a stop ends
them; every wait polls with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ablate_testing import SWEEP

from core.records import Job, Status
from core.rundir import RunDir

REPO = Path(__file__).resolve().parents[2]
DEADLINE_S = 180  # a tiny trainer starts in seconds; a loaded test machine gets room


def sweep_text(arms: int, parallelism: int | None = None) -> str:
    """SWEEP as local jobs that train until stopped: only the baseline, or the baseline and lr-high."""
    text = SWEEP.replace("train: {steps: 4,", "train: {steps: 1000000,")
    text = text.replace("checkpoint: {every: 2}", "checkpoint: {every: 1000000}")
    text = text.replace("eval: {every: 2,", "eval: {every: 1000000,")
    if arms == 1:
        text = text.replace("deltas:\n  lr-high:\n    optimizer.lr: 3e-3\n", "")
    throttle = "" if parallelism is None else f", array_parallelism: {parallelism}"
    return text.replace(
        "launcher: {executor: debug}", f"launcher: {{executor: local, time_limit_min: 10{throttle}}}"
    )


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie has ended), read from /proc alone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def group(pgid: int) -> list[int]:
    """The live processes of process group `pgid`, read from /proc alone."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def poll(what: str, ready: Callable[[], bool], timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < deadline, f"not {what} after {timeout_s} s"
        time.sleep(0.2)


def status(run_dir: Path) -> Status:
    return RunDir(run_dir).read_status() or Status()


def job(run_dir: Path) -> Job:
    return RunDir(run_dir).read_job() or Job()


def training(run_dir: Path) -> bool:
    s = status(run_dir)
    return s.state == "running" and (s.step or 0) > 0 and bool(s.pid)


@contextlib.contextmanager
def reaped(*run_dirs: Path) -> Iterator[None]:
    """Whatever a failed test leaves running is killed, and the jobs this process started are reaped."""
    try:
        yield
    finally:
        for run_dir in run_dirs:
            pid, job_id = status(run_dir).pid, job(run_dir).job_id
            for kill, target in ((os.kill, pid), (os.killpg, job_id), (os.kill, job_id)):
                with contextlib.suppress(OSError, TypeError, ValueError):
                    kill(int(target), signal.SIGKILL)
            deadline = time.monotonic() + 10
            with contextlib.suppress(ChildProcessError, TypeError, ValueError):
                while os.waitpid(int(job_id), os.WNOHANG) == (0, 0) and time.monotonic() < deadline:
                    time.sleep(0.1)


@contextlib.contextmanager
def ablate_run(path: Path, cwd: Path) -> Iterator[subprocess.Popen]:
    """`ablate run SWEEP` (it waits, for the local executor) in a process of its own, as a user starts it
    from a terminal: Ctrl-C's SIGINT at its default, though the tests may run where it is ignored (a
    background job of a non-interactive shell, as CI may start them, inherits SIGINT ignored)."""
    out = open(cwd / "ablate-run.out", "w")  # noqa: SIM115 - closed below
    child = subprocess.Popen(
        [sys.executable, "-c", "from ablate.cli import main; main()", "run", str(path)],
        cwd=cwd, stdout=out, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        yield child
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        out.close()


def test_cancel_stops_a_local_arms_trainer_and_says_so_only_once_it_is_gone(write_sweep, cli, workdir):
    path = write_sweep(sweep_text(arms=1))
    run_dir = workdir / "runs" / "t" / "baseline-s0"
    with reaped(run_dir):
        assert cli("run", path, "--no-wait").code == 0
        poll("training", lambda: training(run_dir))
        trainer, job_id = status(run_dir).pid, int(job(run_dir).job_id)
        assert alive(trainer) and trainer in group(job_id)  # the trainer runs in the job's own group

        cancelled = cli("cancel", path)
        assert cancelled.code == 0, cancelled
        assert f"baseline-s0: job {job_id} cancelled: its processes are gone" in cancelled.out
        assert not alive(trainer) and group(job_id) == []  # the shell, the controller, the trainer: all gone
        rows = (run_dir / "log.jsonl").read_bytes()
        assert status(run_dir).state == "cancelled" and status(run_dir).cancelled_at
        shown = cli("status", path)
        assert "cancelled" in shown.out and "is writing it" not in shown.out
        assert (run_dir / "log.jsonl").read_bytes() == rows  # nothing writes the folder any more

        again = cli("cancel", path)  # nothing left to stop: says so, and succeeds
        assert again.code == 0 and "baseline-s0: nothing in flight (cancelled)" in again.out


def test_cancel_works_while_run_feeds_its_waves_and_a_cancelled_arm_is_never_submitted(
    write_sweep, cli, workdir
):
    path = write_sweep(sweep_text(arms=2, parallelism=1))
    first, second = (workdir / "runs" / "t" / arm for arm in ("baseline-s0", "lr-high-s0"))
    with reaped(first, second), ablate_run(path, workdir) as run:
        poll("submitted", lambda: bool(job(first).job_id) and bool(group(int(job(first).job_id))))
        assert status(second).state == "queued" and not job(second).job_id  # waits for the one slot
        job_id = int(job(first).job_id)

        cancelled = cli("cancel", path)  # `ablate run` is still feeding the waves
        assert cancelled.code == 0, cancelled
        assert f"baseline-s0: job {job_id} cancelled: its processes are gone" in cancelled.out
        assert "lr-high-s0: cancelled before its job was submitted" in cancelled.out
        assert group(job_id) == []

        poll("ended", lambda: run.poll() is not None)  # the slot freed: nothing left to feed
        out = (workdir / "ablate-run.out").read_text()
        assert run.returncode == 1, out
        assert not job(second).job_id and status(second).state == "cancelled"  # never submitted
        assert jobs_started(workdir) == [str(job_id)]
        final = out[out.rindex("arm ") :]  # the last progress table and the summary
        assert re.search(r"baseline-s0\s+cancelled", final) and re.search(r"lr-high-s0\s+cancelled", final), (
            out
        )


def jobs_started(workdir: Path) -> list[str]:
    """The jobs submitit started for the sweep (one folder of logs each)."""
    return [p.name for p in (workdir / "runs" / "t" / ".submitit").iterdir() if p.name.isdigit()]


def test_the_last_progress_table_says_stale_when_the_summary_does(write_sweep, workdir):
    path = write_sweep(sweep_text(arms=1))
    run_dir = workdir / "runs" / "t" / "baseline-s0"

    def trainer() -> int | None:
        job_id = job(run_dir).job_id
        for pid in group(int(job_id)) if job_id else []:
            with contextlib.suppress(OSError):
                if b"submitit.core._submit" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
        return None

    with reaped(run_dir), ablate_run(path, workdir) as run:
        poll("started", lambda: trainer() is not None)
        os.kill(trainer(), signal.SIGKILL)  # the trainer dies without a word (the OOM killer): its job ends
        poll("ended", lambda: run.poll() is not None)
    out = (workdir / "ablate-run.out").read_text()
    table = out[out.rindex("arm ") : out.index("arm(s) done")]
    assert re.search(r"baseline-s0\s+stale", table), out
    assert not re.search(r"submitted|running", table), out
    assert re.search(r"baseline-s0: stale \(was (submitted|running), its job \d+ is gone\)", out), out


def test_ctrl_c_on_run_stops_the_local_jobs_it_started(write_sweep, workdir):
    path = write_sweep(sweep_text(arms=1))
    run_dir = workdir / "runs" / "t" / "baseline-s0"
    with reaped(run_dir), ablate_run(path, workdir) as run:
        poll("submitted", lambda: bool(job(run_dir).job_id) and bool(group(int(job(run_dir).job_id))))
        job_id = int(job(run_dir).job_id)
        run.send_signal(signal.SIGINT)  # to `ablate` alone: its jobs run in process groups of their own
        try:  # its stop gives each group 20 s at most (SIGINT, SIGTERM, SIGKILL); a loaded machine gets room
            poll("ended", lambda: run.poll() is not None)
        finally:
            out = (workdir / "ablate-run.out").read_text()
            print(out)  # shown when the test fails
        assert run.returncode == 130, out
        assert "interrupted: arms running on this machine stop with it" in out
        assert group(job_id) == []


@pytest.fixture(autouse=True)
def _linux_only():
    if not Path("/proc/self/stat").exists():
        pytest.skip("reads processes from /proc")
