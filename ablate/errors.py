"""The one exception type for mistakes a user can fix.

The CLI renders a `UserError` as a single line on stderr and exits with code 2, without a
traceback: `error: <file>:<line>: <key path>: <what was wrong>; expected <what would be right>`.
Parts that do not apply (no file, no key path) are left out of the line.
"""

from __future__ import annotations

from pathlib import Path


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
        return ": ".join(parts)
