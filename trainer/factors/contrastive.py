"""Contrastive flow matching (Stoica et al. 2025; PRX `contrastive_flow_matching.py`).

loss -= λ·MSE(v_pred, v_target rolled by one within the batch): each sample's prediction
is pushed away from another sample's target. λ = 0.05 in the study.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from trainer.model import FactorContext
from trainer.registry import Config, Registry

CONTRASTIVE = Registry("contrastive")


class ContrastiveConfig(Config):
    kind: Literal["contrastive"] = "contrastive"
    weight: float = Field(0.05, gt=0, description="λ of the negative term")


class ContrastiveTerm:
    def __init__(self, weight: float):
        self.weight = weight

    def __call__(self, v_pred: torch.Tensor, v_true: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) each; negatives are the batch's targets shifted by one sample
        return -self.weight * F.mse_loss(v_pred, v_true.roll(1, dims=0))


@CONTRASTIVE.register(ContrastiveConfig)
def build_contrastive(cfg: ContrastiveConfig, ctx: FactorContext | None = None) -> ContrastiveTerm:
    return ContrastiveTerm(cfg.weight)
