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
from pathlib import Path
from typing import Any

import yaml

from ablate.errors import UserError

KeyPath = tuple[str | int, ...]
_MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictLoader(yaml.SafeLoader):
    """SafeLoader plus YAML 1.2 exponent floats. Duplicate keys are checked on the node tree."""


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
            out += f".{part}" if out else str(part)
    return out


def line_of(lines: dict[KeyPath, int], path: KeyPath) -> int | None:
    """The line of `path`, or of its longest prefix that has one (a missing key → its parent)."""
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def load_yaml(file: str | Path) -> tuple[Any, dict[KeyPath, int]]:
    """Parse `file` strictly. Returns (data, {key path: 1-based line}).

    Raises UserError for syntax errors, duplicate keys, several documents, or an empty file.
    """
    file = Path(file)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(
            f"cannot read the sweep file ({e.strerror})", "a readable YAML file", file=file
        ) from None
    loader = StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise UserError(
                "the file is empty", "a mapping with name, baseline and deltas", file=file, line=1
            )
        lines: dict[KeyPath, int] = {}
        _walk(node, (), lines, file)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = " ".join(p for p in (e.context, e.problem) if p)
        raise UserError(
            f"YAML syntax error: {problem}",
            "valid YAML (check indentation, quotes and ':' after keys)",
            file=file,
            line=None if mark is None else mark.line + 1,
        ) from None
    except yaml.YAMLError as e:  # errors without a position (e.g. bad encoding)
        raise UserError(f"YAML error: {e}", "valid YAML", file=file) from None
    finally:
        loader.dispose()
    return data, lines


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
