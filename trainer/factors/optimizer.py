"""Optimizers chosen by `kind`, and the LR schedule (linear warm-up, then constant).

`adamw` is the study's baseline. `muon` is torch.optim.Muon on the 2-D weights inside the
transformer blocks and AdamW on everything else (embeddings, final layer, norms, biases and
factor extras), as PRX's Muon run does. Parameters are grouped by name pattern, first match
wins, and a pattern that matches nothing is an error.

With several processes Muon's Newton–Schulz work is split over them (trainer/factors/muon.py):
`ShardedMuon` under data parallelism, `FSDPMuon` where FSDP has sharded the matrices.
"""

from __future__ import annotations

import fnmatch
from typing import Literal

import torch
from pydantic import Field
from torch.distributed.tensor import DTensor

from trainer.factors.muon import FSDPMuon, ShardedMuon
from trainer.registry import Config, Registry
from trainer.runtime.dist import Dist

# `name_patterns()`: the parameter-name patterns a config groups by, checked against the model's real names.
OPTIMIZERS = Registry("optimizer", facts=("name_patterns",))


class AdamWConfig(Config):
    kind: Literal["adamw"] = "adamw"
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas")
    eps: float = Field(1e-15, gt=0, description="Adam epsilon (the study uses 1e-15)")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay")

    def name_patterns(self) -> dict[str, tuple[str, ...]]:
        return {}


class MuonConfig(Config):
    kind: Literal["muon"] = "muon"
    lr: float = Field(1e-4, gt=0, description="Muon learning rate (RMS-matched to AdamW, see adjust_lr_fn)")
    momentum: float = Field(0.95, ge=0, lt=1, description="Nesterov momentum")
    nesterov: bool = Field(True, description="Nesterov momentum")
    ns_steps: int = Field(5, ge=1, description="Newton-Schulz iterations")
    weight_decay: float = Field(0.0, ge=0, description="Muon weight decay")
    adjust_lr_fn: Literal["original", "match_rms_adamw"] = Field(
        "match_rms_adamw",
        description="torch.optim.Muon's LR scaling; match_rms_adamw keeps AdamW's LR meaningful",
    )
    muon_params: tuple[str, ...] = Field(("prx.blocks.*",), description="name patterns of Muon's 2-D weights")
    adam_lr: float = Field(1e-4, gt=0, description="AdamW LR for the other parameters")
    adam_betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas for the other parameters")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon for the other parameters (PRX: 1e-8)")
    adam_weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay for the other parameters")

    def name_patterns(self) -> dict[str, tuple[str, ...]]:
        """{config key: patterns}: Muon's 2-D weights; every other parameter goes to AdamW."""
        return {"muon_params": self.muon_params}


class Optimizers:
    """Several torch optimizers stepped as one; checkpoints as one state dict."""

    def __init__(self, **optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers
        for opt in optimizers.values():
            for group in opt.param_groups:
                group.setdefault("base_lr", group["lr"])

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def set_lr_factor(self, factor: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * factor

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def group_by_pattern(
    model: torch.nn.Module, patterns: dict[str, tuple[str, ...]], rest: str, accept=lambda p: True
) -> dict[str, list[torch.nn.Parameter]]:
    """Assign each trainable parameter to the first group whose pattern matches its name.

    A parameter that matches a pattern but fails `accept` (e.g. a 1-D norm scale inside a
    block, for Muon) falls through to later patterns and finally to `rest`.
    """
    groups: dict[str, list[torch.nn.Parameter]] = {name: [] for name in [*patterns, rest]}
    hits = {(g, p): 0 for g, pats in patterns.items() for p in pats}
    for pname, param in model.named_parameters():
        if not param.requires_grad:
            continue
        for gname, pats in patterns.items():
            pat = next((p for p in pats if fnmatch.fnmatchcase(pname, p)), None)
            if pat is not None and accept(param):
                hits[gname, pat] += 1
                groups[gname].append(param)
                break
        else:
            groups[rest].append(param)
    unmatched = [f"{g}: {p!r}" for (g, p), n in hits.items() if n == 0]
    if unmatched:
        raise ValueError(
            f"optimizer pattern matches no parameter ({', '.join(unmatched)}); "
            f"parameter names look like {next(iter(dict(model.named_parameters())))!r}"
        )
    return groups


def _adamw(params, lr, betas, eps, weight_decay, device) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=device.type == "cuda"
    )


@OPTIMIZERS.register(AdamWConfig)
def build_adamw(cfg: AdamWConfig, model: torch.nn.Module, dist: Dist) -> Optimizers:
    """AdamW runs whole on every rank (its step is elementwise; there is nothing to split)."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    return Optimizers(adamw=_adamw(params, cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay, device))


def muon_groups(cfg: MuonConfig, model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """{"muon": the 2-D weights `cfg.muon_params` names, "adamw": every other trainable parameter}."""
    return group_by_pattern(model, {"muon": cfg.muon_params}, rest="adamw", accept=lambda p: p.ndim == 2)


@OPTIMIZERS.register(MuonConfig)
def build_muon(cfg: MuonConfig, model: torch.nn.Module, dist: Dist) -> Optimizers:
    """`dist`: the data-parallel ranks that split Muon's Newton–Schulz work (`ShardedMuon`); a model
    FSDP has sharded brings its own groups (`FSDPMuon`)."""
    groups = muon_groups(cfg, model)
    device = groups["muon"][0].device
    hyper = dict(
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        ns_steps=cfg.ns_steps,
        adjust_lr_fn=cfg.adjust_lr_fn,
    )
    if isinstance(groups["muon"][0], DTensor):  # parallel: fsdp on 2+ processes
        muon = FSDPMuon(groups["muon"], **hyper)
    else:
        muon = ShardedMuon(groups["muon"], dist, **hyper)
    adamw = _adamw(groups["adamw"], cfg.adam_lr, cfg.adam_betas, cfg.adam_eps, cfg.adam_weight_decay, device)
    return Optimizers(muon=muon, adamw=adamw)


def lr_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up from 1/warmup to 1 over `warmup_steps`, then constant (PRX's schedule)."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
