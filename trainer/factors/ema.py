"""EMA of the denoiser's weights (off in the study's baseline). When on, evaluation uses the EMA weights.

The train step always calls `ema.update(step)` and evaluation always enters `ema.swapped()`; with
`ema: null` nothing is built for the factor and the trainer holds a `NoEMA`, whose calls do nothing,
so neither place branches on the factor.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from pydantic import Field

from trainer.registry import Config, Registry

EMA = Registry("ema")


class EMAConfig(Config):
    kind: Literal["ema"] = "ema"
    decay: float = Field(0.9999, gt=0, lt=1, description="shadow = decay·shadow + (1 - decay)·weights")
    every: int = Field(1, ge=1, description="update every N steps (decay applies per update)")
    start_step: int = Field(0, ge=0, description="copy the weights at this step, average after it")


class NoEMA:
    def update(self, step: int) -> None: ...

    def swapped(self):
        return contextlib.nullcontext()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


class ModelEMA(NoEMA):
    """FP32 shadow copies of every trainable parameter."""

    def __init__(self, cfg: EMAConfig, model: torch.nn.Module):
        self.cfg, self.model = cfg, model
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after the optimizer step of `step` (0-based)."""
        if step < self.cfg.start_step or (step + 1) % self.cfg.every:
            return
        decay = 0.0 if step == self.cfg.start_step else self.cfg.decay
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach().float(), 1 - decay)

    @contextlib.contextmanager
    def swapped(self):
        """The model holds the EMA weights inside the block, its own weights again after."""
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(backup[n])

    def state_dict(self) -> dict:
        return {"shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        for n, v in state["shadow"].items():
            self.shadow[n].copy_(v)


@EMA.register(EMAConfig)
def build_ema(cfg: EMAConfig, model: torch.nn.Module) -> ModelEMA:
    return ModelEMA(cfg, model)
