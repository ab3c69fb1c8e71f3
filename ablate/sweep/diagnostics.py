"""Turn a pydantic ValidationError into one precise UserError.

Pydantic's error locations include tagged-union tags and union member labels
(`('optimizer', 'muon', 'lrr')`, `('x', 'int')`); those are stripped so the path is the path
the user wrote. Unknown keys get a "did you mean" from the model's field names at that path,
unknown registry kinds list the valid kinds, and type errors say what was expected.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from ablate.errors import UserError
from ablate.sweep.loader import KeyPath
from trainer.identity import as_model as _as_model
from trainer.identity import union_members

# Locates a config path: returns (file, line, display path) for the error message.
Locator = Callable[[KeyPath], tuple[str | None, int | None, str]]


def to_user_error(
    err: ValidationError,
    data: Any,
    model: type[BaseModel],
    locate: Locator,
    registries: Mapping[str, list[str]] | None = None,
) -> UserError:
    """The error that comes first in the file, as a UserError located by `locate`."""
    groups: dict[KeyPath, list[dict[str, Any]]] = {}
    for e in err.errors(include_url=False):
        groups.setdefault(_user_path(e, data), []).append(e)

    def position(path: KeyPath) -> tuple[bool, int, int]:
        # A missing key is reported last: it is often the other half of a misspelt one.
        missing = all(e["type"] == "missing" for e in groups[path])
        line = locate(path)[1]
        return (missing, line if line is not None else 1 << 30, len(path))

    path = min(groups, key=position)
    problem, expected, path = _describe(groups[path], path, data, model, registries or {})
    file, line, shown = locate(path)
    return UserError(problem, expected, file=file, line=line, path=shown)


def _user_path(e: Mapping[str, Any], data: Any) -> KeyPath:
    """The error's location as the user wrote it: tags and union member labels removed."""
    loc, path, node = e["loc"], [], data
    for i, seg in enumerate(loc):
        if isinstance(node, Mapping) and seg in node:
            path.append(seg)
            node = node[seg]
        elif isinstance(node, list) and isinstance(seg, int) and 0 <= seg < len(node):
            path.append(seg)
            node = node[seg]
        elif i == len(loc) - 1 and e["type"] in ("missing", "extra_forbidden"):
            path.append(seg)  # the key that is missing (or unknown) is not in the data
        # else: a union tag ('muon') or member label ('int', 'function-after[...]'): skip it
    return tuple(path)


def _describe(
    errors: list[dict[str, Any]],
    path: KeyPath,
    data: Any,
    model: type[BaseModel],
    registries: Mapping[str, list[str]],
) -> tuple[str, str | None, KeyPath]:
    """(what was wrong, what would be right, path to point at) for the errors at one path."""
    e = errors[0]
    kind = e["type"]
    if kind == "extra_forbidden":
        key = str(path[-1])
        allowed = field_names(model, path[:-1], data)
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        expected = f"one of: {', '.join(sorted(allowed))}" if allowed else "no key here"
        return f"unknown key '{key}'{hint}", expected, path
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        field = ".".join(str(p) for p in path if isinstance(p, str))
        valid = registries.get(field) or _tags_from_ctx(e.get("ctx", {}))
        off = " (or null to turn it off)" if _nullable(model, path, data) else ""
        expected = f"one of: {', '.join(valid)}{off}"
        if kind == "union_tag_not_found":
            return (
                f"no 'kind' given for {field or 'this component'}",
                f"'kind' set to {expected}",
                (*path, "kind"),
            )
        tag = e.get("ctx", {}).get("tag")
        return f"unknown {field} kind '{tag}'", expected, (*path, "kind")
    if kind == "missing":
        return f"missing required key '{path[-1]}'", f"a value for '{path[-1]}'", path
    if kind in ("value_error", "assertion_error"):
        message = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        return message, None, path
    expectations = []
    for other in errors:
        text = other["msg"].removeprefix("Input should be ").removeprefix("input should be ")
        if text not in expectations:
            expectations.append(text)
    return f"got {_show(e.get('input'))}", " or ".join(expectations), path


def _show(value: Any) -> str:
    text = "null" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _tags_from_ctx(ctx: Mapping[str, Any]) -> list[str]:
    return [t.strip().strip("'") for t in str(ctx.get("expected_tags", "")).split(",") if t.strip()]


# --- walking a pydantic model along a user path -------------------------------------------------


def field_names(model: type[BaseModel], path: KeyPath, data: Any) -> list[str]:
    """Field names (aliases where set) of the model at `path`, or [] when it is not a model."""
    target = _model_at(model, path, data)
    if target is None:
        return []
    return [f.alias or name for name, f in target.model_fields.items()]


def _nullable(model: type[BaseModel], path: KeyPath, data: Any) -> bool:
    parent = _model_at(model, path[:-1], data)
    if parent is None or not path or path[-1] not in parent.model_fields:
        return False
    return type(None) in union_members(parent.model_fields[path[-1]].annotation)


def _model_at(model: type[BaseModel], path: KeyPath, data: Any) -> type[BaseModel] | None:
    annotation: Any = model
    node = data
    for seg in path:
        target = _as_model(annotation, node)
        if target is not None:
            if seg not in target.model_fields:
                return None
            annotation = target.model_fields[seg].annotation
        else:
            members = [a for a in union_members(annotation) if typing.get_origin(a) in (dict, list)]
            if not members:
                return None
            annotation = typing.get_args(members[0])[-1] if typing.get_args(members[0]) else Any
        try:
            node = node[seg]
        except (KeyError, IndexError, TypeError):
            node = None
    return _as_model(annotation, node)
