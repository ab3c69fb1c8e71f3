"""Code snapshots: a job runs the code as it was when `ablate run` submitted it, not the working tree
as it is when the job starts (a queued job may wait hours while someone edits the trainer).

Running from a git checkout (an editable install), `ablate run` copies the packages' source as it is
at submission — tracked files, uncommitted edits included, and untracked files of the packages' own kinds
(`SOURCE_SUFFIXES`) — into `<sweep>/.code/<commit>[-<hash of the changes>]/` (once per distinct state;
the hash covers only what is copied). Any other untracked file (a `.env`, `credentials.json`, a data
file) is left out and named in code.json's `left_out`, never copied to the team's file system. Each job imports
from there: its environment puts the snapshot first on PYTHONPATH, with PYTHONSAFEPATH=1 so the
job's working folder (often the checkout itself) does not shadow it; the working folder is kept, so
relative data paths still mean what they meant. Every run folder records the commit and, when the
tree was dirty, the diff (`code.json`, `code.diff`). Installed from a wheel, the code cannot change
under a queued job; only the version is recorded.
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from core.atomic import commit_dir
from core.records import Code
from core.rundir import CODE_FOLDER

PACKAGES = ("ablate", "core", "trainer", "eval")
SOURCE_SUFFIXES = frozenset({".py"})
"""What the packages are made of: Python source, and the package data pyproject.toml declares (it
declares none; a suffix added to [tool.setuptools.package-data] belongs here too)."""


@dataclass(frozen=True)
class Snapshot:
    record: Code
    """what code.json says: commit, dirty, untracked files copied and left out, snapshot folder (or the
    installed version)"""
    diff: str
    """`git diff HEAD` of the packages at submission ('' when clean)"""
    folder: Path | None
    """the snapshot jobs import from; None when the code is installed, not a checkout"""

    def job_setup(self) -> list[str]:
        """Shell lines that make a job import the snapshot (submitit's `setup`, run before the job)."""
        if self.folder is None:
            return []
        folder = shlex.quote(str(self.folder))
        return ["export PYTHONSAFEPATH=1", f"export PYTHONPATH={folder}${{PYTHONPATH:+:$PYTHONPATH}}"]


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout


def source_root() -> Path | None:
    """The git checkout the packages are imported from, or None (installed, or no git)."""
    import ablate

    root = Path(ablate.__file__).resolve().parent.parent
    try:
        top = Path(_git(root, "rev-parse", "--show-toplevel").strip()).resolve()
    except (OSError, subprocess.CalledProcessError):
        return None
    return root if top == root else None


def take(sweep_root: Path) -> Snapshot:
    """Snapshot the packages as they are now (reusing an identical earlier snapshot)."""
    root = source_root()
    if root is None:
        from importlib.metadata import version

        return Snapshot(Code(installed=version("ablate")), "", None)
    commit = _git(root, "rev-parse", "HEAD").strip()
    diff = _git(root, "diff", "HEAD", "--binary", "--", *PACKAGES)
    tracked = _listed(root, "--cached")
    others = _listed(root, "--others", "--exclude-standard")
    untracked = [f for f in others if _source(root / f)]
    left_out = sorted(set(others) - set(untracked))
    files = [f for f in tracked + untracked if (root / f).is_file()]  # a tracked file deleted: not there
    changes = hashlib.sha256(diff.encode())
    for name in untracked:
        changes.update(name.encode() + b"\0" + (root / name).read_bytes())
    dirty = bool(diff or untracked)
    folder = sweep_root / CODE_FOLDER / (commit[:12] + (f"-{changes.hexdigest()[:8]}" if dirty else ""))
    if not folder.exists():
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for name in files:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / name, tmp / name)
            commit_dir(tmp, folder)
        except BaseException:  # a full disk: a half copy must not keep it full
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    record = Code(commit=commit, dirty=dirty, untracked=untracked, left_out=left_out, snapshot=str(folder),
                  source=str(root))  # fmt: skip
    return Snapshot(record, diff, folder)


def _listed(root: Path, *which: str) -> list[str]:
    """The packages' files git lists (`--cached`: tracked; `--others --exclude-standard`: untracked, not
    ignored), sorted."""
    return sorted(f for f in _git(root, "ls-files", "-z", *which, "--", *PACKAGES).split("\0") if f)


def _source(path: Path) -> bool:
    """Whether an untracked file is one of the packages' own kinds (a regular file, not a link)."""
    return path.suffix in SOURCE_SUFFIXES and path.is_file() and not path.is_symlink()


def left_out_note(record: Code) -> str | None:
    """One line naming the untracked files a snapshot left out, or None."""
    if not record.left_out:
        return None
    n, shown = len(record.left_out), ", ".join(record.left_out[:3])
    more = f" and {n - 3} more" if n > 3 else ""
    return (f"code snapshot: {n} untracked file(s) left out, not source ({shown}{more}); jobs do not see "
            "them (code.json lists them): commit them for jobs to use them")  # fmt: skip


def shadowing_warning() -> str | None:
    """Python < 3.11 has no PYTHONSAFEPATH: a job started in the checkout imports the checkout, not the snapshot."""
    if sys.version_info >= (3, 11) or not any((Path.cwd() / p).is_dir() for p in PACKAGES):
        return None
    return ("Python < 3.11: jobs started in this folder import its code, not the snapshot; "
            "submit from another folder to freeze the code")  # fmt: skip
