"""Which folders ablate writes into: a sweep's output folder is ablate's only when it made (and marked) it,
and one `ablate run` or `ablate eval` submits into it at a time.

`check_owner` reads only and refuses a folder of the user's own, one marked for another sweep, or a
link where ablate writes; `make_root` and `claim` create and mark the folder (the latter under the
sweep lock, `sweep_lock`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ablate.errors import UserError, os_fault
from ablate.sweep.schema import Sweep
from core.atomic import Unreadable
from core.rundir import EVAL_CACHE, JOB, LOCK, REPLACED, SPEC, STATUS, SUBMITIT, SWEEP_MARK
from core.sweepdir import SweepDir

# What ablate itself puts in a sweep folder besides run folders (.code: the code snapshot, figures and
# report.html: `ablate plot` / `ablate report`, wandb: `ablate rank --wandb`).
SWEEP_FILES = frozenset(
    {LOCK, SUBMITIT, REPLACED, EVAL_CACHE, SWEEP_MARK, ".code", "figures", "report.html", "wandb"}
)
NO_LINKS = (LOCK, SWEEP_MARK, REPLACED)  # written (or moved into) by the orchestrator itself


def check_owner(sweep: Sweep) -> bool:
    """Whether ablate may write in the sweep's output folder; reads only. Returns whether the folder still
    needs its marker (`claim` writes it): a new or empty folder, or a sweep folder from before markers
    (its entries are all ablate's: run folders with records, .submitit, ...). Raises a UserError, located
    at output_dir, for a folder ablate did not make (a user's own files), one marked for another sweep,
    or a link where ablate writes."""
    root, folder = sweep.root, SweepDir(sweep.root)
    key = ("output_dir",) if sweep.output_dir else ("name",)
    fix = "an output_dir of the sweep's own: a new or empty folder (ablate marks the folders it makes)"
    try:
        if not root.exists():
            return True
        for name in NO_LINKS:
            if (root / name).is_symlink():
                raise sweep.error(
                    key,
                    f"{root / name} is a symbolic link; ablate does not write through links",
                    "it removed",
                )
        try:
            mark = folder.read_mark()
        except Unreadable as e:
            raise sweep.error(
                key, f"the folder's marker is unreadable ({e})", f"{SWEEP_MARK} as ablate wrote it"
            ) from None
        if mark is not None:
            owner = mark.sweep
            if owner != sweep.name:
                raise sweep.error(
                    key,
                    f"the output folder {root} belongs to sweep {owner!r} ({folder.mark}); nothing written",
                    f"an output_dir of its own, or name: {owner}",
                )
            return False
        arms = set(sweep.arm_names())
        foreign = sorted(entry.name for entry in root.iterdir() if not _ablates(entry, arms))
    except OSError as e:
        raise os_fault(e, "cannot look into the sweep's output folder", root) from None
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise sweep.error(
            key, f"the output folder {root} was not made by ablate (it holds {shown}); nothing written", fix
        )
    return True


def _ablates(entry: Path, arms: set[str]) -> bool:
    """Whether an entry of a sweep folder without a marker is something ablate puts there."""
    if entry.name in SWEEP_FILES or _is_run_folder(entry):
        return True
    # an arm's name: a link (shown unreadable, never written through) or an empty folder
    return entry.name in arms and (entry.is_symlink() or (entry.is_dir() and not any(entry.iterdir())))


def _is_run_folder(path: Path) -> bool:
    """A folder (not a link) holding an arm's records: a run folder from before sweep markers."""
    return path.is_dir() and not path.is_symlink() and any((path / n).is_file() for n in (SPEC, STATUS, JOB))


def make_root(sweep: Sweep) -> None:
    """Create the sweep's output folder (after `check_owner`)."""
    try:
        sweep.root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_fault(e, "cannot create the sweep's output folder; nothing submitted", sweep.root) from None


def claim(sweep: Sweep) -> None:
    """Mark the sweep's output folder as ablate's (under the sweep lock, where `check_owner` said so)."""
    try:
        SweepDir(sweep.root).write_mark(sweep.name)
    except OSError as e:
        raise os_fault(
            e, "cannot mark the sweep's output folder; nothing submitted", SweepDir(sweep.root).mark
        ) from None


@contextlib.contextmanager
def sweep_lock(root: Path, *, wait_s: float = 0, nothing: str = "nothing submitted") -> Iterator[None]:
    """Hold the sweep's lock; a second `ablate run` on the same sweep fails fast instead of double-submitting.

    `wait_s`: how long to wait for it (-1: as long as it takes); `nothing`: what the refusal says was not done."""
    import filelock

    path = SweepDir(root).lock
    lock = filelock.FileLock(path)
    try:
        lock.acquire(timeout=wait_s, poll_interval=0.1)
    except filelock.Timeout:
        raise UserError(
            f"another `ablate run` is submitting this sweep (lock {path} is held); {nothing}",
            "to run again once it has finished submitting (`ablate status` shows the arms meanwhile)",
        ) from None
    except OSError as e:
        raise os_fault(e, f"cannot take the sweep's lock; {nothing}", path) from None
    try:
        yield
    finally:
        lock.release()
