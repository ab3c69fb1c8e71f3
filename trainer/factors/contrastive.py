"""Contrastive flow matching (Stoica et al. 2025; PRX `contrastive_flow_matching.py`).

loss -= λ·MSE(v_pred, v_target rolled by one within its group): each sample's prediction is pushed
away from another sample's target. λ = 0.05 in the study.

PRX rolls the targets of whatever batch one GPU holds (its micro-batch of 32), so which sample is
whose negative depends on how the batch is split. Here the global batch is cut into fixed groups of
`group` consecutive samples (by global sample index) and the targets roll by one inside each group:
sample g's negative is the target of sample g − 1 of its group (the group's first takes its last).
A process holds whole groups (`group` must divide the per-process batch, checked against the
launcher's process count before submission and at start-up), so the negatives are the same at any
number of processes and no target crosses between them.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from trainer.flow import Prediction
from trainer.model import FactorContext
from trainer.registry import Config, Registry

# `batch_group`: samples of the global batch, consecutive by global index, that one process must hold
# together (TrainConfig checks it divides the per-process batch).
CONTRASTIVE = Registry("contrastive", facts=("batch_group",))


class ContrastiveConfig(Config):
    kind: Literal["contrastive"] = "contrastive"
    weight: float = Field(0.05, gt=0, description="λ of the negative term")
    group: int = Field(
        16,
        ge=2,
        description="negatives come from within fixed groups of this many consecutive samples of the "
        "global batch (targets rolled by one inside each); must divide the per-process batch "
        "(16 = the study's 256 over 16 processes; PRX rolled within each GPU's micro-batch of 32)",
    )

    @property
    def batch_group(self) -> int:
        return self.group


def rolled_in_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """x (B, …) with rows rolled by one inside each run of `group` consecutive rows: row g gets row g − 1
    of its group, the group's first row its last. B must be a multiple of `group`."""
    if x.shape[0] % group:
        raise ValueError(
            f"contrastive.group {group} does not divide this process's {x.shape[0]} samples; "
            "use a group that divides train.batch_size / processes"
        )
    return x.unflatten(0, (-1, group)).roll(1, dims=1).flatten(0, 1)


class ContrastiveTerm:
    def __init__(self, weight: float, group: int):
        self.weight, self.group = weight, group

    def __call__(self, p: Prediction) -> torch.Tensor:
        # (B, C, H, W) each, this process's rows: whole groups of the global batch
        return -self.weight * F.mse_loss(p.v_pred, rolled_in_groups(p.v_true, self.group))


@CONTRASTIVE.register(ContrastiveConfig)
def build_contrastive(cfg: ContrastiveConfig, ctx: FactorContext | None = None) -> ContrastiveTerm:
    return ContrastiveTerm(cfg.weight, cfg.group)
