"""The job entry point: a run directory in, a trained and evaluated arm out.

    python -m trainer.job RUN_DIR

`rescore(run_dir, step)` evaluates a checkpoint again without training (`ablate eval`).

Resumes from the newest complete checkpoint when one exists. On failure the run directory
says so (status.json: failed, with the error) and no result.json is written.
"""

from __future__ import annotations

import errno
import sys
import traceback
from pathlib import Path

from core.lock import Busy, WriterLock
from core.rundir import FAILED, RunDir
from core.sweepdir import SweepDir
from trainer.config import load
from trainer.runtime import dist as distributed
from trainer.runtime.preempt import Preemption
from trainer.train import Trainer

OPERATING_FAULTS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def describe_failure(e: BaseException, run: RunDir) -> str:
    """The one line status.json and `ablate status` show: an operating fault says which and where."""
    if isinstance(e, OSError) and e.errno in OPERATING_FAULTS:
        return f"{OPERATING_FAULTS[e.errno]}: {e.filename or run.path}"
    lines = [line for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1:  # one line: a DataLoader worker's error ends with the original one
        return lines[-1].strip() if lines[0].startswith("Caught ") else f"{type(e).__name__}: {lines[0]}"
    return f"{type(e).__name__}: {e}"


def _refuse_planted_links(run: RunDir) -> None:
    """Before writing: no link planted in the run folder, nor where the job writes in its sweep's folder
    (the default eval cache `.eval-cache/`, above all), raises `PlantedLink`."""
    run.refuse_planted_links()
    SweepDir(run.path.parent).refuse_planted_links()


def run(run_dir: str | Path, preemption: Preemption | None = None) -> dict:
    """Train the arm in `run_dir`. `preemption`: stop signals caught since the job started (installed
    by the job before its heavy imports); by default installed here.

    The main process holds the folder's writer lock for the whole run: a second trainer on the same
    folder (a job and a hand-started one) stops at once with `Busy`, before writing anything."""
    run = RunDir(run_dir)
    preemption = preemption if preemption is not None else Preemption()  # a signal during set-up waits
    cfg = load(run.config)
    d = distributed.init(cfg.train.collective_timeout_s, cfg.train.collective_timeout_long_s)
    trainer = None
    owner = WriterLock(run)
    try:
        if d.main:
            owner.acquire()
            _refuse_planted_links(run)
        trainer = Trainer(cfg, run.path, d, preemption=preemption)
        return trainer.run()
    except Busy:
        raise
    except BaseException as e:
        if isinstance(e, SystemExit) and preemption.caught is not None:
            raise  # saved and requeued: the status already says so
        error = describe_failure(e, run)
        try:
            if trainer is not None:
                trainer.recorder.status(FAILED, trainer.step, error=error)
            elif d.main:  # set-up failed (a missing weight, bad data): no trainer to say so
                run.set_status(FAILED, error=error)
        except (
            OSError,
            ValueError,
        ) as again:  # a full disk, a garbled status: the job's log is all that is left
            print(f"{run.path}: could not record the failure ({error}): {again}", file=sys.stderr, flush=True)
        if not isinstance(e, (KeyboardInterrupt, SystemExit)):
            traceback.print_exc()
        raise
    finally:
        owner.release()
        preemption.restore()
        distributed.shutdown()


def rescore(run_dir: str | Path, step: int | None = None) -> dict:
    """Evaluate checkpoint `step` (default: the newest) of a run again, e.g. after adding a metric.

    Runs under the same launcher as training (`ablate eval`); the run's state is left alone (a checkpoint
    that fails verification is set aside and recorded in status.json, as in training).
    """
    run = RunDir(run_dir)
    cfg = load(run.config)
    d = distributed.init(cfg.train.collective_timeout_s, cfg.train.collective_timeout_long_s)
    owner = WriterLock(run)
    try:
        if d.main:
            owner.acquire()
            _refuse_planted_links(run)
        return Trainer(cfg, run.path, d).rescore(step)
    finally:
        owner.release()
        distributed.shutdown()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m trainer.job RUN_DIR")
    try:
        run(sys.argv[1])
    except Busy as e:
        sys.exit(f"error: {e}")
