"""Processes on this machine: whether one runs, and the local executor's jobs, each a process group a stop ends.

submitit's LocalExecutor starts a job's controller as a child of `ablate`, inside `ablate`'s own process group,
and cancels the job by sending SIGINT to that child. With setup lines (the code snapshot always has some) the
child is a `/bin/sh -c` wrapper: the signal stopped the shell, and submitit's controller and the trainer
trained on. Here each job starts a session of its own, so its id (the pid of what submitit started) names the
process group of everything the job runs: the shell, the controller, the trainer processes and their workers.
A stop signals that whole group and watches it until nothing of it is left.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit
from submitit.local.local import LocalJob

# How a stop escalates: each signal, and how long the job then has to end before the next one. SIGINT is
# Ctrl-C's signal: the trainer stops at once and submitit's controller ends its tasks. The trainer takes
# SIGTERM as a request to save at its next log point (trainer/runtime/preempt.py), so SIGTERM is for
# whatever the setup lines started; SIGKILL ends a process stuck where no handler runs.
STOP_STEPS = ((signal.SIGINT, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0))
POLL_S = 0.05


def pid_alive(pid: int | None, must_contain: bytes = b"") -> bool:
    """Whether process `pid` on this host runs (a zombie is dead; with `must_contain`, a reused pid
    whose command line lacks it is someone else's)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path(f"/proc/{pid}")
    if proc.exists():
        with contextlib.suppress(OSError):
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False
            if must_contain and must_contain not in (proc / "cmdline").read_bytes():
                return False
    return True


def members(group: int, must_contain: bytes = b"") -> list[int]:
    """The live processes (zombies aside) of process group `group` on this machine; with `must_contain`,
    only those whose command line holds it. Without /proc (not Linux): [group] while the group has any
    process, zombies included."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [group]
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, _ppid, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            if int(pgrp) != group or state in ("Z", "X"):
                continue
            if must_contain and must_contain not in (entry / "cmdline").read_bytes():
                continue
        except (OSError, ValueError):  # it ended while being read
            continue
        found.append(int(entry.name))
    return found


def stop(groups: Sequence[int], pids: Sequence[int] = ()) -> tuple[list[int], str]:
    """Stop process groups (and watch `pids`, processes that must end with them): each signal of
    STOP_STEPS in turn to every group, until nothing of them is left. Returns the processes still alive
    at the end (none: all gone) and the last signal sent."""
    left: list[int] = []
    sent = ""
    for sig, grace_s in STOP_STEPS:
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, sig)
        sent = sig.name
        deadline = time.monotonic() + grace_s
        while (left := _left(groups, pids)) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if not left:
            break
    return left, sent


def _left(groups: Sequence[int], pids: Sequence[int]) -> list[int]:
    alive = {pid for group in groups for pid in members(group)}
    return sorted(alive | {pid for pid in pids if pid_alive(pid)})


class LocalExecutor(submitit.LocalExecutor):
    """submitit's LocalExecutor, each job in a session (and process group) of its own named by its id.

    `_submit_command` starts the controller as submitit 1.5's `start_controller` does (the same command,
    environment and setup lines), with `start_new_session` as the one difference."""

    def _submit_command(self, command: str) -> LocalJob[Any]:
        p = self.parameters
        ntasks, n_gpus, visible = (
            p.get("tasks_per_node", 1),
            p.get("gpus_per_node", 0),
            p.get("visible_gpus", ()),
        )
        gpus = range(n_gpus) if visible == () else visible[:n_gpus]
        setup = list(p.get("setup", ()))
        env = {
            **os.environ,
            "SUBMITIT_LOCAL_NTASKS": str(ntasks),
            "SUBMITIT_LOCAL_COMMAND": command,
            "SUBMITIT_LOCAL_TIMEOUT_S": str(int(60 * p.get("timeout_min", 2.0))),
            "SUBMITIT_LOCAL_SIGNAL_DELAY_S": str(int(p.get("signal_delay_s", 30))),
            "SUBMITIT_LOCAL_NODEID": "0",
            "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
            "SUBMITIT_STDERR_TO_STDOUT": "1" if p.get("stderr_to_stdout", False) else "",
            "SUBMITIT_EXECUTOR": "local",
            "CUDA_VISIBLE_DEVICES": ",".join(str(k) for k in gpus),
            "SUBMITIT_LOCAL_WITH_SHELL": "1" if setup else "",
        }
        controller = [sys.executable, "-m", "submitit.local._local", str(self.folder)]
        args: Any = " && ".join([*setup, shlex.join(controller)]) if setup else controller
        process = subprocess.Popen(args, shell=bool(setup), env=env, start_new_session=True)
        return LocalJob(
            folder=self.folder, job_id=str(process.pid), process=process, tasks=list(range(ntasks))
        )
