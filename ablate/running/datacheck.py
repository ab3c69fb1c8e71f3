"""Data checks before submission: every arm's data (and eval reference set) can be read, and the
latent and caption caches the arms read are computed.

The rules are the data kinds' own (`file_problem` of each `trainer/data` config: a parquet file's
footer, a folder's metadata.jsonl first row and that row's image, a reference set's listing); here
each distinct source is asked once and its answer located in the sweep file. `ablate run` (and
`--dry-run`) calls `check_data` after the arms validate and before anything is created, so a wrong
path or column costs a second on the login node instead of a queued job. A path whose top folder this
machine does not have (a file system mounted only on the compute nodes) is not checked: a warning says so.
"""

from __future__ import annotations

import json
from functools import partial
from typing import TYPE_CHECKING

from ablate.sweep.expand import RunSpec

if TYPE_CHECKING:
    from rich.console import Console


def check_data(specs: list[RunSpec], console: Console | None = None) -> None:
    """Raise a UserError for the first arm whose data cannot be read; it names the arm, the file and the
    sweep file's line of the key at fault. Each distinct data source is read once."""
    seen: dict[str, object] = {}
    unseen: set[str] = set()
    for spec in specs:
        cfg, reference = spec.train, spec.train.eval.reference
        sources = [] if reference is None else [(reference, None, reference.file_problem)]
        sources.append((cfg.data, cfg.eval.caption, partial(cfg.data.file_problem, cfg.eval.caption)))
        if cfg.cache is not None:  # live encoders every step would cost ~40% more GPU-hours at PRX's size
            encoded = cfg.encoded()
            sources.append((cfg.cache, encoded, partial(cfg.cache.file_problem, encoded)))
        for source, column, check in sources:
            key = json.dumps([source.model_dump(mode="json"), repr(column)])
            if key not in seen:
                seen[key] = check()
            if (problem := seen[key]) is None:
                continue
            if problem.unseen:
                unseen.add(getattr(source, "path", None) or source.dir)
                continue
            expected = problem.expected
            if problem.key[0] == "cache":  # the one command that fixes it
                expected += f": `ablate cache {spec.locate(problem.key)[0]}` computes every missing one"
            raise spec.error(problem.key, f"arm {spec.name}: {problem.problem}; nothing submitted", expected)
    for path in sorted(unseen):
        if console is not None:
            console.print(
                f"warning: {path} is not visible from this machine (its top folder is not here); not checked",
                style="yellow",
                markup=False,
            )
