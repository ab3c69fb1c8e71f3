"""The job entry point: a run directory in, a trained and evaluated arm out.

    python -m trainer.job RUN_DIR

`evaluate(run_dir, step)` scores a checkpoint again without training (`ablate eval`).

Resumes from the newest complete checkpoint when one exists. On failure the run directory
says so (status.json: failed, with the error) and no result.json is written.
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path

from . import dist as distributed
from .train import Trainer, load_config


def run(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    d = distributed.init()
    trainer = None
    try:
        trainer = Trainer(cfg, run_dir, d)
        return trainer.run()
    except BaseException as e:
        preemption = getattr(trainer, "preemption", None)
        if isinstance(e, SystemExit) and preemption is not None and preemption.caught is not None:
            raise  # saved and requeued: the status already says so
        if trainer is not None:
            trainer.write_status("failed", error=f"{type(e).__name__}: {e}")
        elif d.main:
            from .io import atomic_write_json, read_json
            from .train import now

            old = read_json(run_dir / "status.json", default={})
            atomic_write_json(run_dir / "status.json", {**old, "state": "failed", "updated_at": now(),
                                                        "error": f"{type(e).__name__}: {e}"})
        if not isinstance(e, (KeyboardInterrupt, SystemExit)):
            traceback.print_exc()
        raise
    finally:
        distributed.shutdown()


def evaluate(run_dir: str | Path, step: int | None = None) -> dict:
    """Evaluate checkpoint `step` (default: the newest) of a run again, e.g. after adding a metric.

    Runs under the same launcher as training (`ablate eval`); the run's status is left alone.
    """
    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    d = distributed.init()
    try:
        return Trainer(cfg, run_dir, d).evaluate_checkpoint(step)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m trainer.job RUN_DIR")
    run(sys.argv[1])
