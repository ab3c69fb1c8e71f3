"""Weight storage precision: FP32 weights (the baseline) or BF16 weights, bf16 autocast on both.

The optimizer's state follows the weights' dtype, as in the study.

`Precision.flow` is the dtype of the flow-matching tensors around the net. fp32 everywhere but in
PRX's bf16 run (`flow_dtype: bf16`), which follows its `denoiser_dtype` (prx/pipeline/fm_pipeline.py,
prx/schedulers/scheduler.py): in training the latents x0 and the noise ε are bf16, so the v target
ε − x0 is computed and rounded in bf16, while t stays fp32 and x_t = (1 − t)·x0 + t·ε is fp32 (its
fp32 t promotes); in sampling the Euler state x (the initial noise, every step's update and the
CFG velocity) and the timesteps handed to the net are bf16, while the step sizes come from the fp32
grid. The held-out loss stays fp32 in every arm, one yardstick for all.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from trainer.identity import TRAINS, mark
from trainer.registry import Config, Registry

PRECISION = Registry("precision")

AUTOCAST = Field(
    "auto", description="bf16 autocast: auto = on where the device runs bf16 fast (CUDA), off on CPU"
)


class FP32Config(Config):
    kind: Literal["fp32"] = "fp32"
    autocast: Literal["auto", "bf16", "off"] = AUTOCAST


class BF16Config(Config):
    kind: Literal["bf16"] = "bf16"
    autocast: Literal["auto", "bf16", "off"] = AUTOCAST
    flow_dtype: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="dtype of the flow tensors: fp32 (only the weights are bf16) or bf16 as in PRX's bf16 "
        "run (x0, noise and v target in training; the Euler state and the net's timesteps in sampling)",
        json_schema_extra=mark(TRAINS, neutral="fp32"),  # added after hashes existed: fp32 before
    )


@dataclass(frozen=True)
class Precision:
    weights: torch.dtype
    autocast: bool
    device_type: str
    flow: torch.dtype = torch.float32  # x0, noise, target, sampler state (see the module docstring)

    def context(self):
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16)


def _autocast(choice: str, device: torch.device) -> bool:
    if choice == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return choice == "bf16"


@PRECISION.register(FP32Config)
def build_fp32(cfg: FP32Config, device: torch.device) -> Precision:
    return Precision(torch.float32, _autocast(cfg.autocast, device), device.type)


@PRECISION.register(BF16Config)
def build_bf16(cfg: BF16Config, device: torch.device) -> Precision:
    flow = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.flow_dtype]
    return Precision(torch.bfloat16, _autocast(cfg.autocast, device), device.type, flow)
