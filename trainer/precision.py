"""Weight storage precision: FP32 weights (the baseline) or BF16 weights, bf16 autocast on both.

The optimizer's state follows the weights' dtype, as in the study.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from .registry import Config, Registry

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


@dataclass(frozen=True)
class Precision:
    weights: torch.dtype
    autocast: bool
    device_type: str

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
    return Precision(torch.bfloat16, _autocast(cfg.autocast, device), device.type)
