"""The public surface, frozen: registry kinds, config keys, sweep keys, metrics, CLI commands and options.

A refactor must leave `surface.json` as it is. A change that adds, renames or removes part of the
surface on purpose regenerates it in the same commit and says so:

    ABLATE_FREEZE_SURFACE=1 .venv/bin/python -m pytest tests/test_surface.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ablate.sweep.diagnostics import union_members

SURFACE = Path(__file__).with_name("surface.json")


def config_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key path a config accepts; fields of a kind-tagged component as `path<kind>.field`."""
    keys = []
    for name, field in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        keys.append(path)
        models = [
            m for m in union_members(field.annotation) if isinstance(m, type) and issubclass(m, BaseModel)
        ]
        for m in models:
            kind = m.model_fields.get("kind")
            tag = f"<{kind.default}>" if kind is not None and len(models) > 1 else ""
            keys += config_keys(m, path + tag)
    return keys


def cli_surface() -> dict[str, list[str]]:
    """`ablate` command path → its arguments and options (as typed on the command line)."""
    import typer

    from ablate.cli import app

    out: dict[str, list[str]] = {}

    def walk(command: Any, path: str) -> None:
        out[path] = sorted(
            "/".join(p.opts + p.secondary_opts) if p.param_type_name == "option" else p.name.upper()
            for p in command.params
        )
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "ablate")
    return out


def current() -> dict[str, Any]:
    from ablate.sweep.schema import Sweep
    from eval.metrics import METRICS
    from trainer.config import TrainConfig, describe_registries

    return {
        "registries": describe_registries(),
        "trainer_config": config_keys(TrainConfig),
        "sweep": config_keys(Sweep),
        "metrics": sorted(METRICS),
        "cli": cli_surface(),
    }


def test_public_surface_is_unchanged():
    now = json.loads(json.dumps(current()))
    if os.environ.get("ABLATE_FREEZE_SURFACE"):
        SURFACE.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
    frozen = json.loads(SURFACE.read_text())
    for part in frozen.keys() | now.keys():
        assert now.get(part) == frozen.get(part), (
            f"the public surface changed in '{part}'; if on purpose, regenerate tests/surface.json "
            "(see this file's docstring) and say so in the commit"
        )
