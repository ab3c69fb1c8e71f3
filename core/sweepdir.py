"""A sweep's output folder: its arms' run folders and the sweep-wide files (the layout is in rundir.py)."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

from core.atomic import atomic_write_json
from core.records import Stage2, SweepMark
from core.rundir import EVAL_CACHE, LOCK, REPLACED, STAGE2, SUBMITIT, SWEEP_MARK, RunDir, now, read_record


class SweepDir:
    """A sweep's output folder: its arms' run folders and the sweep-wide files."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def run(self, arm: str) -> RunDir:
        return RunDir(self.root / arm)

    lock = property(lambda self: self.root / LOCK)
    eval_cache = property(lambda self: self.root / EVAL_CACHE)
    mark = property(lambda self: self.root / SWEEP_MARK)
    stage2 = property(lambda self: self.root / STAGE2)

    def read_stage2(self) -> Stage2 | None:
        """The second stage `ablate run --resolve` planned, None when there is none."""
        return read_record(self.stage2, Stage2)

    def write_stage2(self, plan: Stage2) -> None:
        atomic_write_json(self.stage2, plan.to_json())

    """Written by `ablate run` in the folder it made (or adopted) for a sweep: only there does it write."""

    def read_mark(self) -> SweepMark | None:
        """The marker (the sweep's name), None when the folder has none."""
        return read_record(self.mark, SweepMark)

    def write_mark(self, sweep: str) -> None:
        atomic_write_json(self.mark, SweepMark(sweep=sweep, marked_at=now()).to_json())

    @property
    def job_folder(self) -> Path:
        """submitit's folder pattern: one sub-folder per job (`%j`) with its pickles and logs."""
        return self.root / SUBMITIT / "%j"

    def move_aside(self, run: RunDir, hash_: str | None) -> Path:
        """Move a run folder to .replaced/<arm>-<hash>-<time>/ (kept, never deleted); returns where."""
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        target = self.root / REPLACED / f"{run.name}-{hash_}-{stamp}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(run.path), target)
        return target
