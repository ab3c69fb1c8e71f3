"""Muon with its Newton–Schulz work split over the processes, for the `muon` optimizer kind.

`ShardedMuon` (data parallel: every process holds every matrix) splits the orthogonalisations and
all-gathers the updates; `FSDPMuon` (FSDP2: every process holds a slice of every matrix) gathers each
matrix whole on the process that orthogonalises it and sends the result's rows back. Both take the
maths from torch.optim.Muon (`_zeropower_via_newtonschulz`, `_adjust_lr`), so they equal it. The
split (`assign_shares`) and the step's parts (`muon_step_parts`, `project_muon_step`) serve `make bench`.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as tdist
from torch.distributed.tensor import DTensor, Shard
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

from trainer.runtime.dist import Dist


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


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of `t`: a DTensor's local shard (its storage: in-place ops change the
    DTensor), a plain tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def newton_schulz(update: torch.Tensor, group: dict) -> torch.Tensor:
    """torch.optim.Muon's orthogonalisation of one whole (m, n) matrix with `group`'s settings; bf16 out."""
    return _zeropower_via_newtonschulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])


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
                local(buf).lerp_(local(grad), 1 - group["momentum"])  # elementwise: a shard's own
                work[self.index[p]] = (p, group)
        return work

    def _look_ahead(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """What torch.optim.Muon orthogonalises: the Nesterov look-ahead of the momentum, or the
        momentum itself; elementwise, so of this process's rows where the matrix is sharded."""
        grad, buf = local(p.grad), local(self.state[p]["momentum_buffer"])
        return grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf

    def _orthogonalise(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """torch.optim.Muon's update of one matrix: Nesterov look-ahead, then Newton–Schulz (bf16)."""
        return newton_schulz(self._look_ahead(p, group), group)

    def _orthogonalise_mine(self, work: dict) -> dict[int, torch.Tensor]:
        return {i: self._orthogonalise(p, g) for i, (p, g) in work.items() if self.owner[i] == self.rank}

    def _slot(self, p: torch.Tensor) -> int:
        """Elements one matrix takes in its owner's row of the exchange: the whole matrix."""
        return p.numel()

    def _layout(self, work: dict) -> tuple[dict[int, int], list[int]]:
        """Where each matrix sits in its owner's row of the exchange: {index: offset}, and each
        rank's row width [elements]."""
        used, offset = [0] * self.world, {}
        for i in sorted(work):
            offset[i] = used[self.owner[i]]
            used[self.owner[i]] += self._slot(work[i][0])
        return offset, used

    def _exchange(self, work: dict, mine: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Every rank's updates on every rank: each rank packs its share into one row (padded to the
        widest share), one all-gather. Returns {index: update (m, n) bf16}."""
        if self.world == 1 or not work:
            return mine
        offset, used = self._layout(work)
        width = max(used)
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
            lr, w = group["lr"], local(p)  # `updates[i]`: w's rows of the update where p is sharded
            w.mul_(1 - lr * group["weight_decay"])
            w.add_(updates[i], alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))  # the whole shape


class FSDPMuon(ShardedMuon):
    """torch.optim.Muon on matrices FSDP2 shards by rows: DTensors placed Shard(0) on the shard mesh
    (the whole mesh, or HSDP's "shard" dimension; replica groups repeat the same work).

    Momentum, weight decay and the parameter update are elementwise and run on each process's rows;
    the momentum buffers stay DTensors sharded like their parameters, so the state dict is
    torch.optim.Muon's and sharded checkpoints save and reshard it as they do AdamW's moments. Only
    Newton–Schulz needs a whole matrix: each matrix has an owner (`assign_shares` over the shard
    group, as under DDP); one all-to-all brings every process's rows of the look-ahead (cast to bf16,
    which torch's Newton–Schulz does first anyway) to the owners, each owner orthogonalises its
    matrices with torch's Newton–Schulz, and one all-to-all sends each process its rows of the result
    (the PRX/muon-fsdp2 gather-and-scatter, batched into one collective each way as dion does). The
    result equals torch.optim.Muon on whole matrices bit for bit, given the same gradients.

    Rows follow FSDP2's split: ⌈m/world⌉ per process, the last ones short or empty; each travels
    padded to ⌈m/world⌉. Transient memory on a process: its rows of every matrix it holds, and its
    share of whole matrices, in bf16. The same matrices must have gradients on every process (they
    run the same code); parameter groups are fixed at construction.
    """

    def __init__(self, params, **muon_kwargs):
        torch.optim.Muon.__init__(self, params, **muon_kwargs)
        matrices = [p for group in self.param_groups for p in group["params"]]
        self.index = {p: i for i, p in enumerate(matrices)}
        self.group, self.rank, self.world = shard_group(matrices)
        self.owner = assign_shares([tuple(p.shape) for p in matrices], self.world)
        for p in matrices:  # FSDP2's row split, which the exchange's unpacking assumes
            rows = min(self._rows(p), max(0, p.shape[0] - self.rank * self._rows(p)))
            if local(p).shape[0] != rows:
                raise ValueError(
                    f"FSDPMuon: a {tuple(p.shape)} matrix holds {local(p).shape[0]} rows on shard rank "
                    f"{self.rank}; FSDP2's split gives {rows}"
                )

    def _rows(self, p: torch.Tensor) -> int:
        """Rows of `p` one process holds at most (FSDP2's ⌈m/world⌉)."""
        return -(-p.shape[0] // self.world)

    def _slot(self, p: torch.Tensor) -> int:
        return self._rows(p) * p.shape[1]

    def _orthogonalise_mine(self, work: dict) -> dict[int, torch.Tensor]:
        """Gathers the look-ahead of the matrices this process owns, whole, and orthogonalises them.
        Each process sends owner o its rows of o's matrices, padded, in index order (block o of
        `send`); it receives from every process its rows of the matrices it owns. Returns {index:
        update (m, n) bf16} for its share."""
        if not work:
            return {}
        offset, used = self._layout(work)
        start = [sum(used[:o]) for o in range(self.world)]
        device = local(next(iter(work.values()))[0]).device
        send = torch.zeros(sum(used), dtype=torch.bfloat16, device=device)
        for i, (p, group) in work.items():
            rows = self._look_ahead(p, group)  # (this process's rows, n)
            at = start[self.owner[i]] + offset[i]
            send[at : at + rows.numel()].view(rows.shape).copy_(rows)
        mine = used[self.rank]
        recv = torch.empty(self.world * mine, dtype=torch.bfloat16, device=device)
        tdist.all_to_all_single(recv, send, [mine] * self.world, used, group=self.group)
        recv = recv.view(self.world, mine)  # (world, mine): process s's rows of every matrix I own
        out = {}
        for i, (p, group) in work.items():
            if self.owner[i] == self.rank:
                m, n = p.shape
                chunk = recv[:, offset[i] : offset[i] + self._slot(p)]  # (world, rows·n)
                out[i] = newton_schulz(chunk.reshape(-1, n)[:m], group)  # padding is the last rows
        return out

    def _exchange(self, work: dict, mine: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """The reverse all-to-all: each owner sends process s its rows of each update it computed.
        Returns {index: this process's rows of the update, bf16}."""
        if not work:
            return {}
        offset, used = self._layout(work)
        start = [sum(used[:o]) for o in range(self.world)]
        device = local(next(iter(work.values()))[0]).device
        send = torch.zeros(self.world, used[self.rank], dtype=torch.bfloat16, device=device)
        for i, update in mine.items():
            m, n = update.shape
            padded = update.new_zeros(self.world * self._rows(update), n)
            padded[:m] = update
            send[:, offset[i] : offset[i] + self._slot(update)] = padded.view(self.world, -1)
        recv = torch.empty(sum(used), dtype=torch.bfloat16, device=device)
        tdist.all_to_all_single(recv, send.view(-1), used, [used[self.rank]] * self.world, group=self.group)
        return {
            i: recv[start[self.owner[i]] + offset[i] :][: local(p).numel()].view(local(p).shape)
            for i, (p, _) in work.items()
        }


def shard_group(matrices: list[torch.Tensor]) -> tuple[tdist.ProcessGroup, int, int]:
    """The process group the matrices' rows are spread over, this process's rank in it and its size.
    Every matrix must be a DTensor sharded on rows (Shard(0)) over the same mesh dimension; other mesh
    dimensions (HSDP's "replicate") hold copies."""
    where = set()
    for p in matrices:
        dims = (
            [d for d, place in enumerate(p.placements) if place.is_shard()] if isinstance(p, DTensor) else []
        )
        if len(dims) != 1 or p.placements[dims[0]] != Shard(0):
            raise ValueError(f"FSDPMuon needs DTensors sharded on rows (FSDP2's Shard(0)); got {p!r:.120}")
        where.add((p.device_mesh, dims[0]))
    if len(where) != 1:
        raise ValueError(f"FSDPMuon needs every matrix sharded over the same mesh dimension; got {where}")
    mesh, dim = where.pop()
    return mesh.get_group(dim), mesh.get_local_rank(dim), mesh.size(dim)


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
        "row_bytes": 2 * max(opt._layout(work)[1]),  # bf16
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
