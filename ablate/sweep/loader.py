"""Strict YAML loading that remembers where every key came from.

PyYAML accepts duplicate keys silently (the last one wins), which in a sweep file means a
delta quietly loses half of its overrides. `load_yaml` rejects them, reports syntax errors
with their line, and returns, next to the data, the line of every key path so that later
errors (schema, trainer config) can point at `sweeps/x.yaml:12`.

It also reads exponent floats without a dot (`3e-4`, `1e-3`) as numbers, as YAML 1.2 does;
YAML 1.1 (PyYAML's default) would read them as strings.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

from ablate.errors import UserError

KeyPath = tuple[str | int, ...]
_MERGE_TAG = "tag:yaml.org,2002:merge"
_INT_TAG = "tag:yaml.org,2002:int"

# Bounds on what a YAML file may make the parser do, whatever bytes it holds. A sweep file is a few
# kilobytes of hand-written settings; these are far above any real one and far below harm.
MAX_BYTES = 1 << 20  # file size
MAX_DEPTH = 64  # nesting of maps and lists, aliases expanded
MAX_ALIASES = 100  # uses of `*anchor` (merges `<<: *anchor` included)
MAX_NODES = 100_000  # values in the document with every alias expanded (a "billion laughs" is 10^9)
# What YAML does not allow in a file (PyYAML's Reader.NON_PRINTABLE), found before PyYAML sees it.
_NON_PRINTABLE = re.compile(r"[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class _Bounded(yaml.SafeLoader):
    """SafeLoader that stops, with a UserError naming the line, where a document exceeds the bounds:
    nesting deeper than MAX_DEPTH, more than MAX_ALIASES aliases, more than MAX_NODES values once
    aliases are expanded, an alias inside its own anchor (a recursive document). Values Python cannot
    hold (a 5,000-digit integer, a 13th month) are a located error too, not a ValueError."""

    def __init__(self, stream: str, file: Path) -> None:
        super().__init__(stream)
        self.file = file
        self._depth = 0
        self._aliases = 0
        self._open: set[str] = set()  # anchors whose node is still being composed
        self._size: dict[int, tuple[int, int]] = {}  # id(node) → (values, depth), aliases expanded

    def _stop(self, mark: yaml.Mark | None, problem: str, expected: str) -> UserError:
        return UserError(problem, expected, file=self.file, line=None if mark is None else mark.line + 1)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise self._stop(
                    event.start_mark,
                    f"more than {MAX_ALIASES} aliases (*{event.anchor})",
                    f"at most {MAX_ALIASES} uses of anchors; write the values out",
                )
            if event.anchor in self._open:
                raise self._stop(
                    event.start_mark,
                    f"alias *{event.anchor} inside its own anchor &{event.anchor} (a recursive document)",
                    "an alias after the end of the value it names",
                )
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise self._stop(
                event.start_mark, f"nested more than {MAX_DEPTH} levels deep", f"at most {MAX_DEPTH} levels"
            )
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self._open.add(anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open.discard(anchor)
        self._measure(node)
        return node

    def _measure(self, node: yaml.Node) -> None:
        """Values and depth of `node` with aliases expanded, from its children's (composed before it)."""
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        sizes = [self._size.get(id(c), (1, 1)) for c in children]
        values = 1 + sum(s for s, _ in sizes)
        depth = 1 + max((d for _, d in sizes), default=0)
        self._size[id(node)] = (values, depth)
        if values > MAX_NODES:
            raise self._stop(
                node.start_mark,
                f"aliases expand this value to {values:,} values (over {MAX_NODES:,})",
                "a sweep file without nested aliases that multiply (a 'billion laughs')",
            )
        if depth > MAX_DEPTH:
            raise self._stop(
                node.start_mark,
                f"aliases nest this value {depth} levels deep (over {MAX_DEPTH})",
                f"at most {MAX_DEPTH} levels",
            )

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError, TypeError, RecursionError) as e:
            raise self._value_error(node, e) from None

    def _value_error(self, node: yaml.Node, e: Exception) -> UserError:
        text = str(node.value) if isinstance(node, yaml.ScalarNode) else ""
        digits = sum(c.isdigit() for c in text)
        if node.tag == _INT_TAG and digits > sys.get_int_max_str_digits() > 0:
            return self._stop(
                node.start_mark,
                f"an integer of {digits:,} digits (Python reads at most {sys.get_int_max_str_digits():,})",
                "a shorter number, or the value in quotes as a string",
            )
        shown = text if len(text) <= 40 else text[:37] + "..."
        what = node.tag.rsplit(":", 1)[-1]
        return self._stop(
            node.start_mark, f"cannot read {shown!r} as a {what} ({e})"[:300], f"a valid {what}"
        )


class StrictLoader(_Bounded):
    """The bounded SafeLoader plus YAML 1.2 exponent floats. Duplicate keys are checked on the node tree."""


StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def format_path(path: KeyPath) -> str:
    """`('deltas', 'muon', 'optimizer.lr')` → `deltas.muon.optimizer.lr`; list items as `[i]`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            part = str(part) if len(str(part)) <= 60 else f"{str(part)[:57]}..."  # the line stays readable
            out += f".{part}" if out else part
    return out


def line_of(lines: dict[KeyPath, int], path: KeyPath) -> int | None:
    """The line of `path`, or of its longest prefix that has one (a missing key → its parent)."""
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def read_text(file: Path, what: str = "sweep file") -> str:
    """The file as text, checked before any parser sees it: at most MAX_BYTES, UTF-8, and no
    character YAML forbids (a NUL byte, a control character). Raises UserError naming the line."""
    try:
        with open(file, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise UserError(
            f"cannot read the {what} ({e.strerror or type(e).__name__})", "a readable YAML file", file=file
        ) from None
    if len(data) > MAX_BYTES:
        raise UserError(
            f"the {what} is larger than {MAX_BYTES // 1024} KiB",
            f"a {what} under {MAX_BYTES // 1024} KiB",
            file=file,
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(
            f"not UTF-8 text (byte 0x{data[e.start]:02x} at column {column})",
            "a UTF-8 text file",
            file=file,
            line=line,
        ) from None
    if (bad := _NON_PRINTABLE.search(text)) is not None:
        char = bad.group()
        line = text.count("\n", 0, bad.start()) + 1
        column = bad.start() - (text.rfind("\n", 0, bad.start()) + 1) + 1
        name = "a NUL byte" if char == "\0" else f"control character U+{ord(char):04X}"
        raise UserError(
            f"{name} at column {column}",
            "printable text (YAML allows tabs and newlines only)",
            file=file,
            line=line,
        )
    return text


def _compose(loader: _Bounded, file: Path, empty: str) -> yaml.Node:
    node = loader.get_single_node()
    if node is None:
        raise UserError("the file is empty", empty, file=file, line=1)
    return node


def _yaml_error(e: yaml.YAMLError, file: Path) -> UserError:
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        problem = " ".join(p for p in (e.context, e.problem) if p)
        return UserError(
            f"YAML syntax error: {problem}",
            "valid YAML (check indentation, quotes and ':' after keys)",
            file=file,
            line=None if mark is None else mark.line + 1,
        )
    return UserError(f"YAML error: {e}", "valid YAML", file=file)  # errors without a position


def load_yaml(file: str | Path) -> tuple[Any, dict[KeyPath, int]]:
    """Parse `file` strictly. Returns (data, {key path: 1-based line}).

    Raises UserError for syntax errors, duplicate keys, several documents, an empty file, and
    anything past the bounds (size, characters, depth, aliases, expanded size, unreadable values).
    """
    file = Path(file)
    loader = StrictLoader(read_text(file), file)
    try:
        node = _compose(loader, file, "a mapping with name, baseline and deltas")
        lines: dict[KeyPath, int] = {}
        _walk(node, (), lines, file)
        data = loader.construct_document(node)
    except yaml.YAMLError as e:
        raise _yaml_error(e, file) from None
    finally:
        loader.dispose()
    return data, lines


def load_plain_yaml(file: str | Path, what: str = "file") -> Any:
    """`yaml.safe_load` of `file` (YAML 1.1, as written by `yaml.safe_dump`) within the same bounds
    as a sweep file; raises UserError (naming the file and line) for anything it cannot read."""
    file = Path(file)
    loader = _Bounded(read_text(file, what), file)
    try:
        return loader.construct_document(_compose(loader, file, f"a non-empty {what}"))
    except yaml.YAMLError as e:
        raise _yaml_error(e, file) from None
    finally:
        loader.dispose()


def _walk(node: yaml.Node, prefix: KeyPath, lines: dict[KeyPath, int], file: Path) -> None:
    """Record the line of every key path under `node`; reject duplicate keys."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<: *anchor`: merged keys may be overridden
                for merged in value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]:
                    sub: dict[KeyPath, int] = {}
                    _walk(merged, prefix, sub, file)
                    for k, v in sub.items():
                        lines.setdefault(k, v)
                continue
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise UserError(
                    f"duplicate key '{key}' (first at line {seen[key]})",
                    "each key once per mapping; merge the two entries",
                    file=file,
                    line=line,
                    path=format_path((*prefix, key)),
                )
            seen[key] = line
            lines[(*prefix, key)] = line
            _walk(value_node, (*prefix, key), lines, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*prefix, i)] = item.start_mark.line + 1
            _walk(item, (*prefix, i), lines, file)
