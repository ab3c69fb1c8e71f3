"""The job entry point: a run directory in, a trained and evaluated arm out.

    python -m trainer.job RUN_DIR

`rescore(run_dir, step)` evaluates a checkpoint again without training (`ablate eval`).

Resumes from the newest complete checkpoint when one exists. On failure the run directory
says so (status.json: failed, with the error) and no result.json is written.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

from core.rundir import FAILED, RunDir

from . import dist as distributed
from .config import load
from .preempt import Preemption
from .train import Trainer


def run(run_dir: str | Path, preemption: Preemption | None = None) -> dict:
    """Train the arm in `run_dir`. `preemption`: stop signals caught since the job started (installed
    by the job before its heavy imports); by default installed here."""
    run = RunDir(run_dir)
    preemption = preemption if preemption is not None else Preemption()  # a signal during set-up waits
    cfg = load(run.config)
    d = distributed.init()
    trainer = None
    try:
        trainer = Trainer(cfg, run.path, d, preemption=preemption)
        return trainer.run()
    except BaseException as e:
        if isinstance(e, SystemExit) and preemption.caught is not None:
            raise  # saved and requeued: the status already says so
        if trainer is not None:
            trainer.write_status(FAILED, error=f"{type(e).__name__}: {e}")
        elif d.main:  # set-up failed (a missing weight, bad data): no trainer to say so
            run.set_status(FAILED, error=f"{type(e).__name__}: {e}")
        if not isinstance(e, (KeyboardInterrupt, SystemExit)):
            traceback.print_exc()
        raise
    finally:
        preemption.restore()
        distributed.shutdown()


def rescore(run_dir: str | Path, step: int | None = None) -> dict:
    """Evaluate checkpoint `step` (default: the newest) of a run again, e.g. after adding a metric.

    Runs under the same launcher as training (`ablate eval`); the run's status is left alone.
    """
    run = RunDir(run_dir)
    cfg = load(run.config)
    d = distributed.init()
    try:
        return Trainer(cfg, run.path, d).rescore(step)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m trainer.job RUN_DIR")
    run(sys.argv[1])
