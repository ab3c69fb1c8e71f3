"""A sweep's output folder: its arms' run folders and the sweep-wide files (the layout is in rundir.py)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path

from core.atomic import atomic_create, atomic_write_json
from core.records import Stage2, SweepMark
from core.rundir import (
    CODE_FOLDER,
    EVAL_CACHE,
    FIGURES,
    LOCK,
    REPLACED,
    REPORT,
    STAGE2,
    SUBMITIT,
    SWEEP_MARK,
    WANDB,
    PlantedLink,
    RunDir,
    now,
    read_record,
)

ENTRIES = frozenset(
    {SWEEP_MARK, LOCK, STAGE2, SUBMITIT, REPLACED, EVAL_CACHE, CODE_FOLDER, FIGURES, REPORT, WANDB}
)
"""What ablate puts in a sweep folder besides its arms' run folders."""
LOOKED_INTO = (SUBMITIT, EVAL_CACHE, CODE_FOLDER, FIGURES)
"""The sweep-wide folders whose entries ablate writes, or runs from: none of those is a link either
(.replaced/ keeps moved run folders as they were, links included; wandb/ is W&B's, which links in it)."""


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

    def read_mark(self) -> SweepMark | None:
        """The marker (the sweep's name), None when the folder has none."""
        return read_record(self.mark, SweepMark)

    def write_mark(self, sweep: str) -> SweepMark:
        """Mark the folder as `sweep`'s unless it is marked already (a marker is created, never replaced:
        two commands marking one new folder for two sweeps cannot both win); returns the marker in place."""
        if atomic_create(
            self.mark, json.dumps(SweepMark(sweep=sweep, marked_at=now()).to_json(), indent=2) + "\n"
        ):
            return SweepMark(sweep=sweep)
        return self.read_mark() or SweepMark()

    def planted_links(self) -> list[str]:
        """The symbolic links (relative paths) among what ablate writes in the sweep folder: its own
        entries (`ENTRIES`) and those of the folders in `LOOKED_INTO`. The run folders' own are theirs
        (`RunDir.planted_links`); a link in place of a whole run folder is shown unreadable."""
        found = [self.root / name for name in ENTRIES if (self.root / name).is_symlink()]
        for name in LOOKED_INTO:
            folder = self.root / name
            if folder.is_dir() and not folder.is_symlink():
                found += [p for p in folder.iterdir() if p.is_symlink() and not _submitits_own(p)]
        return sorted(p.relative_to(self.root).as_posix() for p in found)

    def refuse_planted_links(self) -> None:
        if links := self.planted_links():
            raise PlantedLink(self.links_problem(links))

    def links_problem(self, links: list[str]) -> str:
        """One line naming the links planted in the sweep folder."""
        one = len(links) == 1
        return (
            f"{self.root}: {', '.join(links)} {'is a symbolic link' if one else 'are symbolic links'}; "
            f"ablate writes nothing through a link in a sweep folder (remove {'it' if one else 'them'}; "
            "to share reference features between sweeps, set eval.cache_dir)"
        )

    @property
    def job_folder(self) -> Path:
        """submitit's folder pattern: one sub-folder per job (`%j`) with its pickles and logs."""
        return self.root / SUBMITIT / "%j"

    def move_aside(self, run: RunDir, hash_: str | None) -> Path:
        """Move a run folder to .replaced/<arm>-<hash>-<time>/ (kept, never deleted); returns where. An arm
        whose spec.json is missing or unreadable has no hash: `unreadable` stands in for it."""
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        target = self.root / REPLACED / f"{run.name}-{hash_ or 'unreadable'}-{stamp}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(run.path), target)
        return target


def _submitits_own(link: Path) -> bool:
    """The one link submitit makes in its folder: after each SLURM submission it leaves
    `.submitit/.submission_file_<uuid>.sh` pointing to the job's sbatch file, `.submitit/<job id>/…`
    (nothing ever writes through it: the next submission gets a new uuid)."""
    folder = link.parent
    if folder.name != SUBMITIT or not link.name.startswith(".submission_file_"):
        return False
    target = folder / os.readlink(link)  # submitit writes it absolute
    return target.parent.parent.resolve() == folder.resolve() and not target.parent.is_symlink()
