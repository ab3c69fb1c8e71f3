"""An arm's identity: which part of its config says what it trains, how it runs, and how it is scored.

Every config field has one of three roles, declared once where the field is defined, as
`Field(..., json_schema_extra=mark(RUNS))`, or on the section or component that holds it (its fields
inherit the role; a field's own mark overrides it):

- `trains` (what an unmarked field is: the safe side): what the arm trains. The arm's hash covers
  these fields and nothing else.
- `runs`: how the arm is executed, not what it computes beyond rounding: the process layout, compile,
  loader workers, threads, checkpoint cadence and count, logging, paths to the same content (weights,
  caches). Recorded in config.yaml; changing one never reruns an arm; a resubmission uses the new value.
- `evaluates`: how checkpoints are scored. They have their own hash (`eval_hash`): changing one
  re-scores a finished arm's newest kept checkpoint instead of training it again.

A field added once hashes exist declares `neutral` in its mark: the value with which the config trains
(or is scored) as it did before the field existed. A field at its neutral value is left out of the hash,
so a config recorded before the field (the field absent) and one holding the neutral value hash alike.
The neutral value is declared, never read from the default: changing a default later changes the hash
of the configs that hold the new value, because the resolved config is hashed, not its delta from the
defaults. `tests/ablate/test_identity.py` keeps the fields hashed at HASH_VERSION and fails for a new
hashed field that declares no neutral value.

Torch-free (pydantic only): the orchestrator's torch-free commands read `marks` recorded in spec.json.
"""

from __future__ import annotations

import hashlib
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

# 4: the trainer's numerics version is hashed with what an arm trains (contrastive.group added with it).
# 3: only the fields that train are hashed; evaluation settings have their own hash; a field at its
# declared neutral value is left out. Run folders with an older spec.json are hashed again from their
# config.yaml. (2: the `log` section left out; 1: the whole resolved config.)
HASH_VERSION = 4

# What the trainer's code computes from the same config, when that changes on purpose: an arm trained by
# other numerics trained something else, though its config reads the same. 2: every per-sample random
# draw keyed by (seed, step, global sample index), contrastive negatives in fixed global groups;
# 1 (spec.json before HASH_VERSION 4): draws for the global batch from (seed, step), routed tokens
# seeded per process, negatives rolled within each process's share.
NUMERICS = 2
NUMERICS_KEY = "numerics"

TRAINS, RUNS, EVALUATES = "trains", "runs", "evaluates"
ROLES = (TRAINS, RUNS, EVALUATES)
_NO_NEUTRAL = object()


def mark(role: str, *, neutral: Any = _NO_NEUTRAL) -> dict[str, Any]:
    """A field's role (and its neutral value) as its `json_schema_extra`."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    return {"role": role} if neutral is _NO_NEUTRAL else {"role": role, "neutral": neutral}


def field_mark(field: FieldInfo | None) -> dict[str, Any]:
    """What a field declares of its role: {} (it inherits), {"role": ...} and maybe {"neutral": ...}."""
    extra = None if field is None else field.json_schema_extra
    return {k: v for k, v in extra.items() if k in ("role", "neutral")} if isinstance(extra, dict) else {}


@dataclass(frozen=True)
class Identity:
    """A config's identity: the hash of what it trains, the hash of how it is scored, the parts by role."""

    hash: str
    eval_hash: str
    parts: dict[str, dict[str, Any]]
    """role → the config's fields of that role, nested as in the config (neutral-valued ones left out)"""
    marks: dict[str, str]
    """dotted path → role, where a role begins (an unlisted path has its nearest listed parent's role,
    else trains); recorded in spec.json so that torch-free commands tell the roles apart"""


def identity(model: type[BaseModel], config: Mapping[str, Any], numerics: int | None = None) -> Identity:
    """The identity of `config` (a resolved config, or part of one) read against `model`'s roles; with
    `numerics`, the trainer's numerics version it trains by is part of what it trains."""
    parts: dict[str, dict[str, Any]] = {role: {} for role in ROLES}
    marks: dict[str, str] = {}
    _walk(model, config, TRAINS, (), parts, marks)
    if numerics is not None:
        parts[TRAINS][NUMERICS_KEY] = numerics
    return Identity(digest(parts[TRAINS]), digest(parts[EVALUATES]), parts, marks)


def _walk(model, node: Mapping, inherited: str, prefix: tuple, parts: dict, marks: dict) -> None:
    for key, value in node.items():
        path = (*prefix, key)
        field = model.model_fields.get(key) if model is not None else None
        declared = field_mark(field)
        role = declared.get("role", inherited)
        if role != inherited:
            marks[".".join(path)] = role
        if "neutral" in declared and value == declared["neutral"]:
            continue
        sub = as_model(field.annotation, value) if field is not None and isinstance(value, Mapping) else None
        if sub is None:
            _put(parts[role], path, value)
        else:
            _walk(sub, value, role, path, parts, marks)


def _put(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def digest(tree: Any) -> str:
    """First 12 hex digits of sha256 over the canonical JSON of `tree`."""
    canonical = json.dumps(tree, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def role_of(path: str, marks: Mapping[str, str]) -> str:
    """The role of the dotted `path` under `marks` (an Identity's, or spec.json's)."""
    keys = path.split(".")
    for end in range(len(keys), 0, -1):
        if (role := marks.get(".".join(keys[:end]))) is not None:
            return role
    return TRAINS


def without(tree: Mapping[str, Any], marks: Mapping[str, str], role: str, prefix: str = "") -> dict[str, Any]:
    """`tree` (settings or a config) with the fields of `role` left out, read by `marks`."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping) and any(p.startswith(f"{path}.") for p in marks):
            out[key] = without(value, marks, role, path)
        elif role_of(path, marks) != role:
            out[key] = value
    return out


def table(model: type[BaseModel], prefix: str = "", inherited: str = TRAINS) -> dict[str, dict[str, Any]]:
    """Every field path of `model` (a kind-chosen component's fields as `path<kind>.field`) → its role and,
    where declared, its neutral value: the role table, read from the marks."""
    out: dict[str, dict[str, Any]] = {}
    for name, field in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        declared = field_mark(field)
        out[path] = {**declared, "role": declared.get("role", inherited)}
        models = [
            m for m in union_members(field.annotation) if isinstance(m, type) and issubclass(m, BaseModel)
        ]
        for m in models:
            kind = m.model_fields.get("kind")
            tag = f"<{kind.default}>" if kind is not None and len(models) > 1 else ""
            out |= table(m, path + tag, out[path]["role"])
    return out


def union_members(annotation: Any) -> list[Any]:
    """Union members, with Annotated/Optional unwrapped."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return union_members(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in union_members(a)]
    return [annotation]


def as_model(annotation: Any, node: Any) -> type[BaseModel] | None:
    """The model class `annotation` stands for, choosing a tagged-union member by node['kind']."""
    models = [a for a in union_members(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    if len(models) <= 1:
        return models[0] if models else None
    kind = node.get("kind") if isinstance(node, Mapping) else None
    for m in models:
        field = m.model_fields.get("kind")
        if field is not None and (kind in typing.get_args(field.annotation) or field.default == kind):
            return m
    return None
