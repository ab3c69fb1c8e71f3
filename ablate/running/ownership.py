"""Which folders ablate writes into: a sweep's output folder is ablate's only when it made (and marked) it,
and one `ablate run` or `ablate eval` submits into it at a time.

Every command that writes into a sweep's folder (run, eval, cancel, report, plot, rank --wandb, sync,
cache, run --resolve, export) first calls `check_owner`, which reads only and refuses a folder of the
user's own, one marked for another sweep, or a link planted where ablate writes (`SweepDir.planted_links`);
then `make_root` and `claim` create and mark the folder where it had no marker. Nothing is adopted by the
names of its entries: a folder without a marker is ablate's only when it is new or empty, or holds a
run folder whose spec.json says it is this sweep's arm (a sweep folder from before markers: every
spec.json ablate ever wrote names its arm, its hash and its sweep), beside nothing but ablate's own
entries and the sweep's arms.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from ablate.errors import UserError, os_fault
from ablate.sweep.schema import Sweep
from core.atomic import Unreadable
from core.records import Spec
from core.rundir import LOCK, SPEC, read_record
from core.sweepdir import ENTRIES, SweepDir


def check_owner(sweep: Sweep) -> bool:
    """Whether ablate may write in the sweep's output folder; reads only. Returns whether the folder still
    needs its marker (`claim` writes it): a new or empty folder, or a sweep folder from before markers.
    Raises a UserError, located at output_dir, for a folder ablate did not make (a user's own files, even
    named as ablate names its own), one marked for another sweep, or a link where ablate writes."""
    root, folder = sweep.root, SweepDir(sweep.root)
    key = _key(sweep)
    fix = "an output_dir of the sweep's own: a new or empty folder (ablate marks the folders it makes)"
    try:
        if not root.exists():
            return True
        if links := folder.planted_links():
            raise sweep.error(key, folder.links_problem(links), None)
        try:
            mark = folder.read_mark()
        except Unreadable as e:
            raise sweep.error(
                key, f"the folder's marker is unreadable ({e})", f"{folder.mark} as ablate wrote it"
            ) from None
        if mark is not None:
            _check_mark(sweep, mark.sweep)
            return False
        entries = list(root.iterdir())
        arms = set(sweep.arm_names())
        runs = {entry.name for entry in entries if _is_run_folder(entry, sweep.name)}
        # Beside run folders of this sweep's, ablate's own names and the arms' folders are ablate's (an arm's
        # record may be unreadable). With none, only what holds nothing: an arm's empty folder or link, an
        # empty lock (a command stopped after taking the lock, before marking the folder).
        ours = (ENTRIES | arms) if runs else set()
        empty = arms | {LOCK}
        foreign = sorted(
            entry.name
            for entry in entries
            if not (entry.name in runs or entry.name in ours or (entry.name in empty and _placeholder(entry)))
        )
    except OSError as e:
        raise os_fault(e, "cannot look into the sweep's output folder", root) from None
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise sweep.error(
            key, f"the output folder {root} was not made by ablate (it holds {shown}); nothing written", fix
        )
    return True


def _key(sweep: Sweep) -> tuple[str, ...]:
    return ("output_dir",) if sweep.output_dir else ("name",)


def _check_mark(sweep: Sweep, owner: str | None) -> None:
    if owner != sweep.name:
        raise sweep.error(
            _key(sweep),
            f"the output folder {sweep.root} belongs to sweep {owner!r} ({SweepDir(sweep.root).mark}); "
            "nothing written",
            f"an output_dir of its own, or name: {owner}",
        )


def _is_run_folder(path: Path, sweep: str) -> bool:
    """A folder (not a link) whose spec.json says it is arm `path.name` of `sweep`, as ablate wrote it
    (name, hash and sweep have been in every spec.json since the first version)."""
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        spec = read_record(path / SPEC, Spec)
    except Unreadable:
        return False
    return spec is not None and spec.name == path.name and spec.sweep == sweep and bool(spec.hash)


def _placeholder(entry: Path) -> bool:
    """An entry that holds nothing of anyone's: a link (shown unreadable, never written through; `--rerun`
    moves it aside), an empty folder or an empty file."""
    if entry.is_symlink():
        return True
    return not any(entry.iterdir()) if entry.is_dir() else entry.is_file() and entry.stat().st_size == 0


def make_root(sweep: Sweep, nothing: str = "nothing submitted") -> None:
    """Create the sweep's output folder (after `check_owner`); `nothing` ends a fault's line."""
    try:
        sweep.root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_fault(e, f"cannot create the sweep's output folder; {nothing}", sweep.root) from None


def claim(sweep: Sweep, nothing: str = "nothing submitted") -> None:
    """Mark the sweep's output folder as ablate's, for this sweep, where `check_owner` said it needs it. The
    marker is created, never replaced: if another command marked the folder for another sweep meanwhile,
    this one stops with nothing written."""
    try:
        mark = SweepDir(sweep.root).write_mark(sweep.name)
    except OSError as e:
        raise os_fault(
            e, f"cannot mark the sweep's output folder; {nothing}", SweepDir(sweep.root).mark
        ) from None
    except Unreadable as e:
        raise sweep.error(_key(sweep), f"the folder's marker is unreadable ({e})", None) from None
    _check_mark(sweep, mark.sweep)


def own(sweep: Sweep) -> None:
    """For a command that writes a few files in the sweep's folder: check it is ablate's, for this sweep
    (`check_owner`), and create and mark it where it needs its marker."""
    if check_owner(sweep):
        make_root(sweep, "nothing written")
        claim(sweep, "nothing written")


def own_if_within(sweep: Sweep, path: str | Path) -> None:
    """Before a command writes the folder `path` that the sweep's config names (a cache root, say): if it
    lies in the sweep's output folder, that folder must be ablate's (`own`) and no link may lead from it
    to `path` (a link there would take the writes outside it)."""
    path = Path(os.path.abspath(path))
    chain = [*reversed(path.parents), path]
    try:
        start = next((i for i, p in enumerate(chain) if p.exists() and p.resolve() == sweep.root), None)
        if start is None:
            return
        if link := next((p for p in chain[start + 1 :] if p.is_symlink()), None):
            raise sweep.error(
                _key(sweep),
                f"{link} is a symbolic link in the sweep's output folder; ablate writes nothing through "
                f"a link there ({path} would be written through it)",
                "it removed, or a folder outside output_dir",
            )
    except OSError as e:
        raise os_fault(e, "cannot look into the sweep's output folder", sweep.root) from None
    own(sweep)


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
