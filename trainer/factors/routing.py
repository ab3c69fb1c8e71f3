"""Token routing: TREAD (arXiv 2501.04765) and SPRINT (arXiv 2510.21986), the study's cheaper-step factors.

Both send a per-sample random subset of the image tokens through blocks [start, end) (0-based,
half-open) and let the rest skip them. The study (PRX `TREAD.yaml` / `SPRINT.yaml`) writes
`route_start: 2, route_end: 12` with route_end *inclusive* (PRX hooks the route's end after
`blocks[12]`), i.e. blocks 2..12 are routed and 0–1, 13–15 stay dense. Here that is
`start: 2, end: 13`, the defaults.

- `tread`: `keep` (0.5) of the tokens go through the route; the others rejoin after block
  end-1 exactly as they entered block start. Training only: at eval every token sees every block.
- `sprint`: `keep` (0.25) of the tokens go through the route; after it, dropped positions get a
  learned zero-initialised mask token and the result is fused with the route's dense input,
  `Linear(2C→C)(concat[dense input to block start, deep output])`. At eval nothing is dropped
  but the fusion still runs (it is part of the network).

Inside the route `state.img` holds only the kept tokens, `state.pe` their RoPE entries and
`state.kept` their indices (B, K), sorted, so factors reading the hidden state there (REPA)
know which tokens they see. Each sample's kept subset comes from the step's per-sample draws
(`state.inputs["draws"]`, trainer/draws.py), keyed by (arm seed, step, global sample index): the
same on a resumed run and at any number of processes, different for every step and sample.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from trainer.draws import Draws
from trainer.model import Factor, FactorContext, TokenState
from trainer.registry import Config, Registry

ROUTING = Registry("routing", facts=("implies_routed_alignment",))


class RouteConfig(Config):
    # Whether an alignment loss (REPA) after a block inside this route may align just the tokens the
    # route kept without being told to (`repa.routed_target: gather`). Every routing kind states it.
    implies_routed_alignment: ClassVar[bool]
    start: int = Field(2, ge=0, description="first routed block (0-based)")
    end: int = Field(
        13,
        ge=1,
        description="one past the last routed block: blocks [start, end) are routed; "
        "13 = PRX's inclusive route_end 12",
    )

    @model_validator(mode="after")
    def _check_route(self):
        if self.start >= self.end:
            raise ValueError(
                f"routing.start {self.start} must be below routing.end {self.end} (blocks [start, end) "
                "are routed; the study uses start: 2, end: 13)"
            )
        return self

    @property
    def blocks(self) -> range:
        return range(self.start, self.end)


class TREADConfig(RouteConfig):
    implies_routed_alignment: ClassVar[bool] = True  # the routed tokens are the computation (as PRX)
    kind: Literal["tread"] = "tread"
    keep: float = Field(0.5, gt=0, lt=1, description="share of image tokens the routed blocks see (PRX: 0.5)")


class SPRINTConfig(RouteConfig):
    implies_routed_alignment: ClassVar[bool] = False  # 75 % of the tokens are gone: ask first
    kind: Literal["sprint"] = "sprint"
    keep: float = Field(
        0.25,
        gt=0,
        lt=1,
        description="share of image tokens the routed blocks see in training "
        "(PRX: routing_probability 0.75 dropped)",
    )


def num_kept(num_tokens: int, keep: float) -> int:
    """Tokens kept out of `num_tokens`: rounded, at least one kept and at least one routed."""
    return min(num_tokens - 1, max(1, round(keep * num_tokens)))


def choose_tokens(
    batch: int, num_tokens: int, keep: int, draws: Draws | None, device: torch.device
) -> torch.Tensor:
    """Per sample, a uniformly random subset of `keep` token indices, sorted: (B, keep) int64.

    Sample i's from its own draws (`draws`, one row per sample); without them (a forward outside the
    train step) from torch's global generator."""
    if draws is None:
        noise = torch.rand(batch, num_tokens, device=device)  # (B, L)
    else:
        noise = draws.uniform("route", (num_tokens,), device)  # (B, L), row i keyed by sample i alone
    return noise.topk(keep, dim=1).indices.sort(dim=1).values  # (B, K)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, L, C), idx (B, K) → (B, K, C)."""
    return x.gather(1, idx[:, :, None].expand(-1, -1, x.shape[-1]))


def scatter_tokens(full: torch.Tensor, idx: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """A copy of full (B, L, C) with rows idx (B, K) replaced by part (B, K, C)."""
    return full.scatter(1, idx[:, :, None].expand(-1, -1, full.shape[-1]), part)


def gather_pe(pe: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """RoPE pe (B', 1, L, hd/2, 2, 2), B' ∈ {1, B}, idx (B, K) → (B, 1, K, hd/2, 2, 2)."""
    pe = pe.expand(idx.shape[0], *pe.shape[1:])
    index = idx[:, None, :, None, None, None].expand(-1, pe.shape[1], -1, *pe.shape[3:])
    return pe.gather(2, index)


class TokenRoute(Factor):
    """Shared mechanics: pick the kept tokens before block `start`, hand back a full sequence after block end-1."""

    def __init__(self, cfg: RouteConfig, ctx: FactorContext):
        super().__init__()
        self.start, self.last, self.keep = cfg.start, cfg.end - 1, cfg.keep
        self._dense: tuple[torch.Tensor, torch.Tensor] | None = None  # (img, pe) entering block start

    def begin(self, state: TokenState) -> None:
        self._dense = None

    def before_block(self, index: int, state: TokenState) -> None:
        if index != self.start:
            return
        self._dense = (state.img, state.pe)
        if not self.training:  # eval: every token sees every block
            return
        b, n, _ = state.img.shape
        kept = choose_tokens(
            b, n, num_kept(n, self.keep), state.inputs.get("draws"), state.img.device
        )  # (B, K)
        state.img, state.pe, state.kept = gather_tokens(state.img, kept), gather_pe(state.pe, kept), kept

    def after_block(self, index: int, state: TokenState) -> None:
        if index != self.last:
            return
        dense_img, dense_pe = self._dense
        state.img = self.rejoin(dense_img, state.img, state.kept)  # (B, L, C)
        state.pe, state.kept, self._dense = dense_pe, None, None

    def rejoin(self, dense: torch.Tensor, deep: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class TREAD(TokenRoute):
    """Routed-around tokens rejoin unchanged: their value is what entered block `start`."""

    def rejoin(self, dense, deep, kept):
        return deep if kept is None else scatter_tokens(dense, kept, deep)


class SPRINT(TokenRoute):
    """Dropped slots get a learned mask token; the deep stream is fused with the dense input."""

    def __init__(self, cfg: SPRINTConfig, ctx: FactorContext):
        super().__init__(cfg, ctx)
        c = ctx.hidden_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c))  # (1, 1, C), zero-initialised
        self.fuse = nn.Linear(2 * c, c)  # default init, as PRX's sprint_fuse

    def rejoin(self, dense, deep, kept):
        if kept is not None:  # (B, L, C): mask token everywhere, the route's output at the kept tokens
            deep = scatter_tokens(self.mask_token.to(deep.dtype).expand_as(dense), kept, deep)
        return self.fuse(torch.cat([dense, deep], dim=-1))  # (B, L, 2C) → (B, L, C)


@ROUTING.register(TREADConfig)
def build_tread(cfg: TREADConfig, ctx: FactorContext) -> TREAD:
    return TREAD(cfg, ctx)


@ROUTING.register(SPRINTConfig)
def build_sprint(cfg: SPRINTConfig, ctx: FactorContext) -> SPRINT:
    return SPRINT(cfg, ctx)
