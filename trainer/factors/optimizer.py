"""Optimizers chosen by `kind`, and the LR schedule (linear warm-up, then constant).

`adamw` is the study's baseline. `muon` is torch.optim.Muon on the 2-D weights inside the
transformer blocks and AdamW on everything else (embeddings, final layer, norms, biases and
factor extras), as PRX's Muon run does. Parameters are grouped by name pattern, first match
wins, and a pattern that matches nothing is an error.

Under data parallelism Muon's Newton–Schulz work is split over the ranks (`ShardedMuon`): each
rank orthogonalises its share of the matrices and every rank applies every update.
"""

from __future__ import annotations

import fnmatch
import statistics
import time
from typing import ClassVar, Literal

import torch
import torch.distributed as tdist
from pydantic import Field
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

from trainer.registry import Config, Registry
from trainer.runtime.dist import Dist

# `name_patterns()`: the parameter-name patterns a config groups by, checked against the model's real names.
# `needs_whole_matrices`: it transforms each weight matrix as a whole (Muon orthogonalises it), so it
# cannot run where a process holds a slice of every matrix (parallel: fsdp).
OPTIMIZERS = Registry("optimizer", facts=("name_patterns", "needs_whole_matrices"))


class AdamWConfig(Config):
    needs_whole_matrices: ClassVar[bool] = False
    kind: Literal["adamw"] = "adamw"
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas")
    eps: float = Field(1e-15, gt=0, description="Adam epsilon (the study uses 1e-15)")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay")

    def name_patterns(self) -> dict[str, tuple[str, ...]]:
        return {}


class MuonConfig(Config):
    needs_whole_matrices: ClassVar[bool] = True
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


def ns_flops(shape: tuple[int, ...], ns_steps: int = 5) -> int:
    """Newton–Schulz FLOPs of one (m, n) matrix. torch iterates on the wide orientation X (a, b),
    a = min(m, n); each step costs X·Xᵀ (2a²b), the quintic's A·A (2a³) and B·X (2a²b)."""
    a, b = sorted(shape)
    return ns_steps * (4 * a * a * b + 2 * a**3)


def assign_shares(shapes: list[tuple[int, ...]], world: int) -> list[int]:
    """The rank that orthogonalises each matrix: the largest first, each to the least-loaded rank
    (LPT: the busiest rank is within 4/3 of the best split), ties to the lower rank and index. A pure
    function of the shapes in parameter order, so every rank computes the same split unasked."""
    load, owner = [0] * world, [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-ns_flops(shapes[i]), i)):
        owner[i] = min(range(world), key=lambda r: (load[r], r))
        load[owner[i]] += ns_flops(shapes[i])
    return owner


def ns_flops_per_rank(shapes: list[tuple[int, ...]], world: int, ns_steps: int = 5) -> list[int]:
    """Newton–Schulz FLOPs of each rank's share under `assign_shares`."""
    load = [0] * world
    for shape, rank in zip(shapes, assign_shares(shapes, world), strict=True):
        load[rank] += ns_flops(shape, ns_steps)
    return load


class ShardedMuon(torch.optim.Muon):
    """torch.optim.Muon with its Newton–Schulz work split over the data-parallel ranks.

    Every rank keeps every momentum buffer: DDP leaves the same gradients on every rank, so the
    buffers stay equal and the elementwise lerp is cheap next to Newton–Schulz. The state dict is
    therefore torch.optim.Muon's, the main process saves it alone, and a checkpoint resumes at any
    world size. Only the orthogonalisation is split (`assign_shares`): each rank runs torch's
    Newton–Schulz on its share, the bf16 updates travel in one all-gather, and every rank applies
    every update from the gathered copy, so the ranks' weights stay bitwise equal. With one rank
    nothing travels and the step is torch.optim.Muon's, bit for bit.

    Newton–Schulz runs matrix by matrix, as torch's does: PRX's matrices are 1792 wide or more, big
    enough to fill a GPU alone, so stacking same-shape matrices would gain little; what is batched
    is the communication, one collective per step. Its cost: a transient bf16 buffer of about every
    Muon weight (2.3 GB for PRX-1.2B). The process group is the default one (DDP's); parameter
    groups are fixed at construction.
    """

    def __init__(self, params, dist: Dist, **muon_kwargs):
        super().__init__(params, **muon_kwargs)
        self.rank, self.world = dist.rank, dist.world
        matrices = [p for group in self.param_groups for p in group["params"]]
        self.index = {p: i for i, p in enumerate(matrices)}
        self.owner = assign_shares([tuple(p.shape) for p in matrices], dist.world)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._momentum()
        updates = self._exchange(work, self._orthogonalise_mine(work))
        self._apply(work, updates)
        return loss

    def _momentum(self) -> dict[int, tuple[torch.Tensor, dict]]:
        """Every matrix's momentum buffer, on every rank. {matrix index: (param, its group)} for
        the matrices with a gradient (the same ones on every rank under DDP)."""
        work = {}
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            for p, grad, buf in zip(params, grads, bufs, strict=True):
                buf.lerp_(grad, 1 - group["momentum"])
                work[self.index[p]] = (p, group)
        return work

    def _orthogonalise(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """torch.optim.Muon's update of one matrix: Nesterov look-ahead, then Newton–Schulz (bf16)."""
        grad, buf = p.grad, self.state[p]["momentum_buffer"]
        update = grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
        return _zeropower_via_newtonschulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])

    def _orthogonalise_mine(self, work: dict) -> dict[int, torch.Tensor]:
        return {i: self._orthogonalise(p, g) for i, (p, g) in work.items() if self.owner[i] == self.rank}

    def _layout(self, work: dict) -> tuple[dict[int, int], int]:
        """Where each update sits in its owner's row of the all-gather: {index: offset}, row width."""
        used, offset = [0] * self.world, {}
        for i in sorted(work):
            offset[i] = used[self.owner[i]]
            used[self.owner[i]] += work[i][0].numel()
        return offset, max(used)

    def _exchange(self, work: dict, mine: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Every rank's updates on every rank: each rank packs its share into one row (padded to the
        widest share), one all-gather. Returns {index: update (m, n) bf16}."""
        if self.world == 1 or not work:
            return mine
        offset, width = self._layout(work)
        device = next(iter(work.values()))[0].device
        row = torch.empty(width, dtype=torch.bfloat16, device=device)  # torch's Newton–Schulz output dtype
        for i, update in mine.items():
            row[offset[i] : offset[i] + update.numel()].view(update.shape).copy_(update)
        rows = torch.empty(self.world * width, dtype=row.dtype, device=device)
        tdist.all_gather_single(rows, row)
        rows = rows.view(self.world, width)  # (world, width): rank r's row is its share
        return {
            i: rows[self.owner[i], offset[i] : offset[i] + p.numel()].view(p.shape)
            for i, (p, _) in work.items()
        }

    def _apply(self, work: dict, updates: dict[int, torch.Tensor]) -> None:
        """torch.optim.Muon's parameter update, in its order: decoupled weight decay, then the
        shape-adjusted learning rate times the orthogonalised update."""
        for i, (p, group) in sorted(work.items()):
            lr = group["lr"]
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(updates[i], alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))


def muon_step_parts(opt: ShardedMuon, repeats: int = 3) -> dict:
    """Time the parts of one `ShardedMuon` step on this rank, for bench/gpu.py. Steps `opt` (use a
    throw-away model whose gradients are set); each part is run `repeats` times after a warm-up and
    the median kept, with the device synchronised around it.

    Returns {"step_s": the whole step, "momentum_s", "ns_s": [seconds per matrix, None for another
    rank's], "exchange_s", "apply_s", "shapes": [matrix shapes], "row_bytes": this rank's row of the
    all-gather}. Measured at world 1, `project_muon_step` turns them into other world sizes.
    """
    device = next(iter(opt.index)).device

    def timed(fn):
        out = fn()  # warm-up
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    with torch.no_grad():
        step_s, _ = timed(opt.step)
        momentum_s, work = timed(opt._momentum)
        ns_s, mine = [None] * len(opt.index), {}
        for i, (p, g) in sorted(work.items()):
            if opt.owner[i] == opt.rank:
                ns_s[i], mine[i] = timed(lambda p=p, g=g: opt._orthogonalise(p, g))
        exchange_s, updates = timed(lambda: opt._exchange(work, mine))
        apply_s, _ = timed(lambda: opt._apply(work, updates))
    return {
        "step_s": step_s,
        "momentum_s": momentum_s,
        "ns_s": ns_s,
        "exchange_s": exchange_s,
        "apply_s": apply_s,
        "shapes": [tuple(p.shape) for p in opt.index],
        "row_bytes": 2 * opt._layout(work)[1],  # bf16
    }


def project_muon_step(parts: dict, world: int, gather_gbps: float) -> dict:
    """Muon's step time at `world` ranks from `muon_step_parts` measured at world 1: momentum and
    apply stay whole on every rank, Newton–Schulz is the busiest rank's share of the measured
    per-matrix times, and the ring all-gather moves (world-1) rows of the widest share at
    `gather_gbps` (NCCL's bus bandwidth in GB/s, e.g. nccl-tests' all_gather on the target node).
    Returns {"ns_s", "gather_s", "step_s", "ns_balance": busiest share / mean share}."""
    if None in parts["ns_s"]:
        raise ValueError(
            "project_muon_step needs parts measured at world 1 (every matrix's Newton–Schulz time)"
        )
    owner = assign_shares(parts["shapes"], world)
    share_s, share_numel = [0.0] * world, [0] * world
    for i, shape in enumerate(parts["shapes"]):
        share_s[owner[i]] += parts["ns_s"][i]
        share_numel[owner[i]] += shape[0] * shape[1]
    ns_s = max(share_s)
    gather_s = (world - 1) * 2 * max(share_numel) / (gather_gbps * 1e9) if world > 1 else 0.0
    return {
        "ns_s": ns_s,
        "gather_s": gather_s,
        "step_s": parts["momentum_s"] + ns_s + gather_s + parts["apply_s"],
        "ns_balance": ns_s / (sum(share_s) / world),
    }


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
    """`dist`: the data-parallel ranks that split Muon's Newton–Schulz work (`ShardedMuon`)."""
    groups = muon_groups(cfg, model)
    device = groups["muon"][0].device
    muon = ShardedMuon(
        groups["muon"],
        dist,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        ns_steps=cfg.ns_steps,
        adjust_lr_fn=cfg.adjust_lr_fn,
    )
    adamw = _adamw(groups["adamw"], cfg.adam_lr, cfg.adam_betas, cfg.adam_eps, cfg.adam_weight_decay, device)
    return Optimizers(muon=muon, adamw=adamw)


def lr_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up from 1/warmup to 1 over `warmup_steps`, then constant (PRX's schedule)."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
