"""`ablate export`: one arm's checkpoint as a diffusers folder, what `PRXTransformer2DModel.from_pretrained`
loads (written by trainer/runtime/pretrained.py, from a whole or a sharded checkpoint).

The checkpoint is the step asked for, or the newest one that verifies; one whose files do not match its
manifest is never exported, and nothing is set aside (this command only reads the run folder). The folder
goes to <run dir>/export/step_N, named as the checkpoint, or to `--out`: a new or empty folder, or an
earlier export, which is replaced whole; a folder of the user's is never written over. Every check is
made before anything is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ablate.errors import UserError, os_fault
from ablate.running.ownership import own_if_within
from ablate.running.rescore import check_kept
from ablate.running.store import check_names
from ablate.sweep.schema import Sweep
from core.rundir import CHECKPOINT_PREFIX, CHECKPOINTS, RunDir


def export(sweep: Sweep, arm: str, step: int | None, raw: bool, out: Path | None) -> list[str]:
    """Write arm `arm`'s checkpoint `step` (default: the newest that verifies) as a diffusers folder at
    `out` (default: the run folder's export/step_N); the EMA's weights where the arm keeps one, unless
    `raw`. Returns the lines to show: what was written, and how to load it."""
    from trainer.runtime.pretrained import export as write_folder

    check_names(sweep.arm_names(), [arm], "ARM")
    if out is not None:
        out = Path(os.path.abspath(out))
        check_out(sweep, out)
    run = RunDir(sweep.root / arm)
    checkpoint = choose(run, step)
    step = int(checkpoint.name.removeprefix(CHECKPOINT_PREFIX))
    out = out or run.export(step)
    own_if_within(sweep, out)  # in the sweep's folder: only one ablate made, reached by no link
    try:
        kind = write_folder(checkpoint, out, raw=raw)
    except OSError as e:
        if not checkpoint.is_dir():  # pruned meanwhile: the arm is training and keeps its newest only
            raise UserError(
                f"{checkpoint} was deleted while it was read; nothing exported", "to run again"
            ) from None
        raise os_fault(e, "exporting", out) from None
    weights = (
        "EMA weights" if kind == "ema" else "raw weights" if raw else "raw weights: the arm keeps no EMA"
    )
    return [
        f"exported {arm} step {step} ({weights}) to {out}",
        f"load it: PRXTransformer2DModel.from_pretrained({json.dumps(str(out / 'transformer'))})",
    ]


def choose(run: RunDir, step: int | None) -> Path:
    """Checkpoint `step` of `run`, or its newest that verifies; a UserError when there is none, the step
    is not kept, or the checkpoint fails verification. Reads only."""
    from trainer.runtime.checkpoint import newest_verified, verify

    if not run.checkpoint_steps():
        raise UserError(
            f"arm '{run.path.name}' has no checkpoint yet (none in {run.checkpoints})",
            "an arm that has saved one (`ablate status`)",
            path="ARM",
        )
    check_kept(run, step)
    if step is None:
        if (newest := newest_verified(run, set_aside=False)) is None:
            raise UserError(
                f"{run.path.name}: no checkpoint verifies (each fails: see the warnings above); nothing exported",
                "a checkpoint whose files match its manifest",
            )
        return newest
    if (problem := verify(run.checkpoint(step))) is not None:
        raise UserError(
            f"{run.checkpoint(step)}: fails verification ({problem}); nothing exported",
            "a checkpoint whose files match its manifest: another kept step, or none for the newest that does",
            path="--step",
        )
    return run.checkpoint(step)


def check_out(sweep: Sweep, out: Path) -> None:
    """`--out` must be a new or empty folder, or an earlier export (it holds export.json): not a file, a
    link, a folder of the user's, nor a place in an arm's checkpoints/ (its checkpoints would then fail
    verification)."""
    from trainer.runtime.pretrained import RECORD

    try:
        where = out.resolve()
        inside = where.relative_to(sweep.root).parts if where.is_relative_to(sweep.root) else ()
        if inside[1:2] == (CHECKPOINTS,):
            problem = f"is inside an arm's {CHECKPOINTS}/, which holds checkpoints only"
        elif out.is_symlink() or (out.exists() and not out.is_dir()):
            problem = "is a symbolic link" if out.is_symlink() else "is not a folder"
        elif not (above := next(a for a in out.parents if a.exists())).is_dir():
            problem = f"lies under {above}, which is not a folder"
        elif out.is_dir() and any(out.iterdir()) and not (out / RECORD).is_file():
            problem = f"holds files and no {RECORD} (it is no earlier export), and is never written over"
        else:
            return
    except OSError as e:
        raise os_fault(e, "cannot look into --out", out) from None
    raise UserError(
        f"{out} {problem}; nothing written",
        "a new or empty folder, or an earlier export (replaced whole)",
        path="--out",
    )
