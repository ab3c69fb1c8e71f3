"""One live writer per run folder: the writer lock, and who holds it.

A trainer (or an `ablate eval` job) holds an exclusive flock on `<run folder>/.writer.lock` for its
whole life and says who it is in writer.json; `ablate status` and `ablate run` treat an arm whose lock
is held as in flight, whatever its records say.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket

from core.atomic import atomic_write_json
from core.records import Writer
from core.rundir import WRITER, WRITER_LOCK, RunDir, now


class Busy(RuntimeError):
    """Another live process writes this run folder; the message names it."""


class WriterLock:
    """One live writer per run folder: an exclusive flock on .writer.lock, held for the writer's life.

    The kernel drops it when the process dies however it dies (kill -9 included), so a lock that
    cannot be taken means a live owner, whichever way it was started (`ablate run`'s job or
    `python -m trainer.job` by hand). writer.json says who. Over NFS, Linux maps flock onto
    POSIX locks, which the server arbitrates between hosts.
    """

    def __init__(self, run: RunDir):
        self.run, self._fd = run, None

    def acquire(self) -> WriterLock:
        path = self.run.path / WRITER_LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(
                f"{self.run.path}: {describe_writer(read_writer(self.run))} is writing this run folder"
            ) from None
        self._fd = fd
        writer = Writer(host=socket.gethostname(), pid=os.getpid(), started_at=now())
        atomic_write_json(self.run.path / WRITER, writer.to_json())
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_writer(run: RunDir) -> Writer:
    """Who holds the lock, as far as writer.json says (an empty Writer when it is absent or garbled)."""
    with contextlib.suppress(ValueError):
        return run.read_writer() or Writer()
    return Writer()


def describe_writer(writer: Writer) -> str:
    if writer.pid is None and writer.host is None:
        return "another process"
    return f"process {writer.pid or '?'} on {writer.host or '?'} (since {writer.started_at or '?'})"


def live_writer(run: RunDir) -> Writer | None:
    """Who holds the run folder's writer lock now (writer.json), or None when nobody does."""
    try:
        fd = os.open(run.path / WRITER_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # never locked (or not a plain file): no live writer
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_writer(run)
    finally:
        os.close(fd)
    return None
