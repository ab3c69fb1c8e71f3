"""The options and arguments of the `ablate` commands, named once (a command's signature lists them)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ablate.results.render import FORMATS

SweepFile = Annotated[Path, typer.Argument(help="The sweep file (YAML).", show_default=False)]
Wait = Annotated[
    bool | None,
    typer.Option(
        "--wait/--no-wait", help="Follow the jobs until they end \\[default: wait, except for slurm]."
    ),
]
WeightsDir = Annotated[
    Path | None,
    typer.Option(
        "--dir", metavar="D", help="Weights folder \\[default: each arm's weights_dir, else the HF cache]."
    ),
]
StepOption = Annotated[
    int | None,
    typer.Option("--step", help="At this step \\[default: the last step all finished arms reached]."),
]
ByOption = Annotated[
    str | None,
    typer.Option("--by", metavar="METRIC", help="Order by this rank_by metric \\[default: the first]."),
]
IntervalOption = Annotated[
    str,
    typer.Option(
        "--interval",
        help="Seed interval: moderated (each delta's variance shrunk toward the table's pooled one) | paired-t.",
    ),
]
FdrOption = Annotated[
    str,
    typer.Option(
        "--fdr", help="Significance over the table: bh (false-discovery rate) | holm (family-wise)."
    ),
]
RunDryRun = Annotated[bool, typer.Option("--dry-run", help="Print the plan; create and submit nothing.")]

Rerun = Annotated[
    list[str] | None, typer.Option("--rerun", metavar="NAME", help="Run this arm afresh (repeatable).")
]

Force = Annotated[bool, typer.Option("--force", help="Run afresh every arm whose config changed.")]

Resolve = Annotated[
    bool,
    typer.Option("--resolve", help="Add seeds only where a verdict is open (a confirmatory second stage)."),
]

Budget = Annotated[
    float | None,
    typer.Option("--budget-gpu-hours", metavar="H", min=0, help="With --resolve: spend at most this."),
]

MinEffect = Annotated[
    list[str] | None,
    typer.Option(
        "--min-effect",
        metavar="METRIC=X",
        help="With --resolve: the change worth resolving (repeatable).",
    ),
]

CancelArms = Annotated[
    list[str] | None,
    typer.Option(
        "--arm", metavar="NAME", help="Cancel this arm (repeatable) \\[default: every arm in flight]."
    ),
]

RankStep = Annotated[
    int | None,
    typer.Option("--step", help="Rank at this step \\[default: the last step all finished arms reached]."),
]

Format = Annotated[str, typer.Option("--format", help=" | ".join(FORMATS))]

ToWandb = Annotated[
    bool, typer.Option("--wandb", help="Also log the table as a W&B Table in the sweep's group.")
]

Top = Annotated[int, typer.Option("--top", min=1, metavar="K", help="Stack the K best deltas.")]

AnyChange = Annotated[
    bool, typer.Option("--any", help="Take the best means even where they are not a verdict (q > 0.05).")
]

StackOut = Annotated[
    Path | None,
    typer.Option("--out", metavar="FILE", help="The new sweep file \\[default: SWEEP-stack.yaml]."),
]

SyncDryRun = Annotated[bool, typer.Option("--dry-run", help="List the runs to upload; upload nothing.")]

SyncTimeout = Annotated[
    float, typer.Option("--timeout", min=1, help="Give up on `wandb sync` after this many seconds.")
]

EvalArms = Annotated[
    list[str] | None,
    typer.Option(
        "--arm",
        metavar="NAME",
        help="Evaluate this arm (repeatable) \\[default: every arm that has ended].",
    ),
]

EvalStep = Annotated[
    int | None,
    typer.Option(
        "--step", min=0, help="Evaluate the checkpoint of this step \\[default: each arm's newest]."
    ),
]

CacheDryRun = Annotated[
    bool, typer.Option("--dry-run", help="Print which caches the arms need; compute nothing.")
]

Arm = Annotated[str, typer.Argument(help="The arm to export (as `ablate status` names it).")]

ExportStep = Annotated[
    int | None,
    typer.Option(
        "--step", min=0, help="Export the checkpoint of this step \\[default: the newest that verifies]."
    ),
]

Raw = Annotated[
    bool,
    typer.Option(
        "--raw", help="The trained weights, not the EMA's \\[default: the EMA's, if the arm keeps one]."
    ),
]

OutDir = Annotated[
    Path | None,
    typer.Option("--out", metavar="DIR", help="Write the folder here \\[default: RUN_DIR/export/step_N]."),
]
