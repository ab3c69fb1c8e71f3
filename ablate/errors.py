"""The one exception type for mistakes a user can fix.

The CLI renders a `UserError` as a single line on stderr and exits with code 2, without a
traceback: `error: <file>:<line>: <key path>: <what was wrong>; expected <what would be right>`.
Parts that do not apply (no file, no key path) are left out of the line.
"""

from __future__ import annotations

import errno
from pathlib import Path

from ablate.shown import inert


class UserError(Exception):
    """A mistake in the user's input: says what was wrong, where, and what would be right."""

    def __init__(
        self,
        problem: str,
        expected: str | None = None,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        path: str | None = None,
    ) -> None:
        self.problem = problem
        self.expected = expected
        self.file = None if file is None else str(file)
        self.line = line
        self.path = path
        super().__init__(self.render())

    def render(self) -> str:
        """The one-line message (without the leading `error: `)."""
        parts = []
        if self.file is not None:
            parts.append(self.file if self.line is None else f"{self.file}:{self.line}")
        if self.path:
            parts.append(self.path)
        parts.append(self.problem if self.expected is None else f"{self.problem}; expected {self.expected}")
        return inert(": ".join(parts))  # a path or a record's text may hold control characters


# Operating faults a user (or their admin) fixes, each with what would fix it.
FAULTS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("disk full", "free space on that file system (df -h), then run again"),
    errno.EDQUOT: ("disk quota exceeded", "room in your quota on that file system, then run again"),
    errno.EACCES: ("permission denied", "write permission there, or an output_dir of your own"),
    errno.EPERM: ("operation not permitted", "write permission there, or an output_dir of your own"),
    errno.EROFS: ("read-only file system", "an output_dir on a writable file system"),
}


def os_fault(e: OSError, doing: str, where: str | Path | None = None) -> UserError:
    """An OSError met while writing as one line: the path (the error's, else `where`), what was being
    done, the fault, the fix."""
    fault, fix = FAULTS.get(
        e.errno or 0, (e.strerror or type(e).__name__, "the path writable, then run again")
    )
    path = e.filename if e.filename is not None else where
    if path is not None:
        path = Path(path)
        if path.name.startswith(".") and path.name.endswith(".tmp"):  # an atomic write's temporary file
            path = path.parent
    return UserError(f"{doing}: {fault}", fix, file=path)
