"""Text from records, paths and users, shown inert: a control character is seen, escaped (`\\x1b`), never
obeyed by the terminal that prints it, and `[bold]` or `:smile:` in it is text, not markup.

Anything a record can carry (an error, a data path, an arm's log tail, a W&B url) may hold ESC sequences
that clear a reader's screen or retitle their window. Everything ablate shows goes through here: `inert`
for a line (an error, a footer), `InertConsole` for everything a command prints with rich (every string it
renders passes `inert`; no markup, no emoji codes), `text` for the `Text` cells of a table, `html` for the
report.
"""

from __future__ import annotations

import html as html_module
import re
from typing import Any

from rich.console import Console
from rich.text import Text

# C0 (newline aside: see `lines`), DEL, C1, lone surrogates (undecodable bytes of a path) and the bidi
# controls that reorder what a line appears to say.
_CONTROL = r"\x00-\x09\x0b-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069"
_ONE_LINE = re.compile(f"[\\n{_CONTROL}]")
_LINES = re.compile(f"[{_CONTROL}]")
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def inert(text: str, *, lines: bool = False) -> str:
    """`text` with every control character escaped visibly; with `lines`, newlines kept (a block of lines
    meant as such), else escaped too (one line stays one line)."""
    return (_LINES if lines else _ONE_LINE).sub(_escape, text)


def text(value: str, style: str = "", *, lines: bool = True) -> Text:
    """A rich `Text` of `value`, inert (a table cell: never markup)."""
    return Text(inert(value, lines=lines), style=style)


def html(value: str, *, lines: bool = True) -> str:
    """`value` escaped for HTML, its control characters escaped visibly first."""
    return html_module.escape(inert(value, lines=lines))


class InertConsole(Console):
    """A rich Console for the commands' output: markup and emoji codes off, and every string it renders
    (printed, or a table's cell or title) inert, its lines kept."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(markup=False, emoji=False, **kwargs)

    def render_str(self, text: str, **kwargs: Any) -> Text:  # the one way a str becomes rich Text
        kwargs.update(markup=False, emoji=False)
        return super().render_str(inert(text, lines=True), **kwargs)
