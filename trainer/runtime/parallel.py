"""How the denoiser is spread over processes: whole on each (DDP, the default) or sharded (FSDP2).

`ddp`: every process holds the whole denoiser, its gradients and its optimizer state; gradients
are averaged by DDP. `fsdp`: `torch.distributed.fsdp.fully_shard` on every PRX block and on the
denoiser itself (embeddings, final layer, the modules factors add), so each process keeps 1/world
of the parameters, gradients and optimizer state, and a block's weights exist whole only while
it runs — what a model past one GPU's memory needs (PRX trained this way). The train step and
the factor hooks see the same modules either way: `Denoiser.forward` still calls each block.

The trainer talks to a `Replicated` (ddp) or `Sharded` (fsdp) through one interface: `net` for the
train step, the clipped grad norm, the context evaluation runs in, and the state for checkpoints:
gathered whole (`weights`, `optimizer_state`, `ema_state`: what a whole checkpoint holds; DDP keys
its optimizer state by position, FSDP by name) or as this process holds it (`held_state`, keyed by
name: what a sharded checkpoint saves and loads, `sharded` saying which a layout writes). Either
kind resumes any checkpoint, at any world size. Under FSDP every
forward is collective: evaluation gives every process the same number of forwards (`lockstep`).

With one process both kinds run the denoiser unwrapped: there is nothing to shard or average.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import ClassVar, Literal

import torch
from pydantic import Field, PositiveInt, StrictBool
from torch import nn

from trainer.factors.precision import Precision
from trainer.model import Stored
from trainer.registry import Config, Registry
from trainer.runtime.dist import Dist

# `shards_parameters`: no process holds a whole weight matrix (the trainer builds the PRX on the meta device).
PARALLEL = Registry("parallel", facts=("shards_parameters",))


class DDPConfig(Config):
    shards_parameters: ClassVar[bool] = False
    kind: Literal["ddp"] = "ddp"

    def world_problems(self, world: int, per_node: int) -> list[tuple[str, str, str]]:
        """What stops this kind on `world` processes, `per_node` to a node: (field, problem, expected)."""
        return []


class FSDPConfig(Config):
    shards_parameters: ClassVar[bool] = True
    kind: Literal["fsdp"] = "fsdp"
    reshard_after_forward: bool = Field(
        True,
        description="free each block's gathered weights after its forward and gather them again for "
        "backward: less memory, one more all-gather per block; false = PRX's setting (HSDP within a node)",
    )
    hybrid: StrictBool | PositiveInt = Field(
        False,
        description="HSDP: shard within groups of processes, replicate across them; true = one group "
        "per node (LOCAL_WORLD_SIZE processes), N = N replica groups; false = shard over all processes",
    )
    mixed_precision: Literal["auto", "off"] = Field(
        "auto",
        description="auto = gather weights in bf16 and reduce gradients in fp32 when bf16 autocast is on "
        "(precision.autocast; CUDA by default), fp32 otherwise (CPU); the shards the optimizer "
        "updates keep the precision's weight dtype (fp32 master weights); off = always gather fp32",
    )

    def replica_groups(self, world: int, per_node: int) -> int:
        """HSDP's replica groups on `world` processes, `per_node` to a node (1 = plain FSDP)."""
        if self.hybrid is False:
            return 1
        return world // per_node if self.hybrid is True else self.hybrid

    def world_problems(self, world: int, per_node: int) -> list[tuple[str, str, str]]:
        groups = self.replica_groups(world, per_node)
        if groups >= 1 and world % groups == 0:
            return []
        return [("hybrid", f"parallel.hybrid {self.hybrid} asks for {groups} replica groups, which do not "
                 f"divide the {world} processes", f"a divisor of {world}, true or false")]  # fmt: skip


class Replicated:
    """The whole denoiser on every process; DDP averages the gradients when there are several."""

    sharded: ClassVar[bool] = False  # checkpoints: whole tensors from the main process (False) or DCP shards

    def __init__(self, denoiser: nn.Module, net: nn.Module):
        self.denoiser, self.net = denoiser, net  # `net`: what the train step calls

    def held_state(self, optimizer, ema, *, optimizer_too: bool = True) -> dict:
        """The training state as this process holds it, keyed by name: the denoiser's weights, each
        optimizer's state and the EMA's shadows, DTensor shards under FSDP and whole tensors otherwise.
        The tensors are the live ones: DCP saves each process's part of them, or loads a checkpoint into
        them whatever world size and layout wrote it (`put_held_state` then hands them on)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        state = {"model": get_model_state_dict(self.denoiser), "ema": ema.state_dict()}
        if optimizer_too:  # (a fresh optimizer's state is made here, by a step with zero gradients)
            state["optimizer"] = {
                name: get_optimizer_state_dict(self.denoiser, opt)
                for name, opt in optimizer.optimizers.items()
            }
        return state

    def put_held_state(self, optimizer, ema, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(self.denoiser, state["model"])
        for name, opt in optimizer.optimizers.items() if "optimizer" in state else ():
            set_optimizer_state_dict(self.denoiser, opt, state["optimizer"][name])
        ema.load_state_dict(state["ema"])

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients to a global norm of `max_norm`; returns the norm before clipping (a scalar)."""
        return torch.nn.utils.clip_grad_norm_(self.denoiser.parameters(), max_norm)

    # Whole state for checkpoints: every process calls these (gathering sharded state is collective);
    # the main process gets whole tensors, the others may get {}.
    def weights(self) -> dict[str, torch.Tensor]:
        """The denoiser's state dict (keys prx.…, factors.…)."""
        return self.denoiser.state_dict()

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.denoiser.load_state_dict(weights, strict=True)

    def optimizer_state(self, optimizer) -> dict:
        """Keyed by position: a ddp run also resumes an fsdp run's checkpoint (keyed by name, same order)."""
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def evaluation(self):
        """Around forwards that no backward follows (evaluation, sampling)."""
        return contextlib.nullcontext()

    def accumulating(self):
        """Around the forward and backward of a micro-batch that is not a step's last: its gradients are
        added up locally, and averaged over the processes with the last micro-batch's (DDP's `no_sync`)."""
        no_sync = getattr(self.net, "no_sync", None)  # DDP; one process runs the denoiser unwrapped
        return no_sync() if no_sync is not None else contextlib.nullcontext()

    def ema_state(self, ema) -> dict:
        return ema.state_dict()

    def load_ema_state(self, ema, state: dict) -> None:
        ema.load_state_dict(state)


class Sharded(Replicated):
    """`fully_shard` per block and at the root: parameters, gradients and optimizer state are DTensors
    sharded over the mesh. Checkpoints save each process's shards (`held_state`, trainer/runtime/sharded.py);
    the whole gathers (`weights`, `optimizer_state`, `ema_state`, onto the main process's CPU) serve the
    last step's diffusers folder (`weights`), and tests and bench/sharded_save.py comparing a whole save."""

    sharded: ClassVar[bool] = True

    def __init__(self, denoiser: nn.Module, main: bool):
        super().__init__(denoiser, denoiser)  # fully_shard changed the module in place
        self.main = main

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return super().clip_grad_norm_(max_norm).full_tensor()  # the norm is a DTensor over the mesh

    @contextlib.contextmanager
    def evaluation(self):
        """Drops gathered whole weights at the start and at the end. A forward that no backward follows
        leaves them gathered (the root's always, the blocks' with reshard_after_forward off), and the
        next forward reuses them: stale once the optimizer or the EMA's swap has changed the shards.
        In between, sampling's many forwards reuse them as they should."""
        self._reshard()
        try:
            yield
        finally:
            self._reshard()

    @contextlib.contextmanager
    def accumulating(self):
        """FSDP2's `no_sync`: no reduce-scatter (nor HSDP all-reduce) after this backward; each process keeps
        its whole (unsharded) gradients until the last micro-batch's backward reduces the sum. That costs
        a whole gradient per process in between: past that memory, leave train.micro_batch_size unset."""
        self.denoiser.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.denoiser.set_requires_gradient_sync(True)

    def _reshard(self) -> None:
        from torch.distributed.fsdp import FSDPModule

        for module in self.denoiser.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    @staticmethod
    def _options(gather: bool):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # gather: whole tensors on the main process's CPU only; load: every process reads whole
        # tensors from the checkpoint and keeps its shard
        return StateDictOptions(full_state_dict=True, cpu_offload=gather)

    def weights(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.denoiser, options=self._options(gather=True))

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.denoiser, weights, options=self._options(gather=False))

    def optimizer_state(self, optimizer) -> dict:
        """{optimizer name: its state keyed by parameter name}, as `Optimizers.state_dict` names them."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return {
            name: get_optimizer_state_dict(self.denoiser, opt, options=self._options(gather=True))
            for name, opt in optimizer.optimizers.items()
        }

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        for name, opt in optimizer.optimizers.items():
            named = self._by_name(opt, state[name])
            set_optimizer_state_dict(self.denoiser, opt, named, options=self._options(gather=False))

    def _by_name(self, opt, state: dict) -> dict:
        """An optimizer state keyed by parameter name. A whole checkpoint of a ddp or one-process run keys
        it by position in the optimizer's groups, which are built in the same order under either layout
        (fully_shard keeps the parameters' order): position i is the i-th parameter of `opt`'s groups."""
        if all(isinstance(key, str) for key in state["state"]):
            return state
        names = {p: n for n, p in self.denoiser.named_parameters()}
        order = [names[p] for group in opt.param_groups for p in group["params"]]
        groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in opt.param_groups]:
            raise ValueError("the checkpoint's optimizer groups do not match this arm's parameters")
        return {"state": {order[i]: moments for i, moments in state["state"].items()}, "param_groups": groups}

    def ema_state(self, ema) -> dict:
        """The EMA's shadow weights (DTensors shaped like the parameters), gathered one at a time."""
        from torch.distributed.tensor import DTensor
        from torch.utils._pytree import tree_map

        def whole(x):
            if not isinstance(x, DTensor):
                return x
            full = x.full_tensor()  # every process takes part
            return full.cpu() if self.main else None

        state = tree_map(whole, ema.state_dict())
        return state if self.main else {}

    def load_ema_state(self, ema, state: dict) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor
        from torch.utils._pytree import tree_map

        def shard(full, like):  # each process cuts its own shard from the whole tensor: no communication
            if not isinstance(like, DTensor):
                return full
            return distribute_tensor(
                full.to(like.device), like.device_mesh, like.placements, src_data_rank=None
            )

        ema.load_state_dict(tree_map(shard, state, ema.state_dict()))


def _mesh(cfg: FSDPConfig, dist: Dist):
    """1-D mesh over all processes, or 2-D (replicate, shard) for HSDP. `ablate run` has checked the
    launcher's processes against `world_problems`; a job started another way is checked here."""
    from torch.distributed.device_mesh import init_device_mesh

    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world))
    for _, problem, expected in cfg.world_problems(dist.world, per_node):
        raise ValueError(f"{problem}; expected {expected}")
    groups = cfg.replica_groups(dist.world, per_node)
    if groups == 1:
        return init_device_mesh(dist.device.type, (dist.world,))
    return init_device_mesh(
        dist.device.type, (groups, dist.world // groups), mesh_dim_names=("replicate", "shard")
    )


@PARALLEL.register(DDPConfig)
def build_ddp(cfg: DDPConfig, denoiser: nn.Module, dist: Dist, precision: Precision) -> Replicated:
    if dist.world == 1:
        return Replicated(denoiser, denoiser)
    from torch.nn.parallel import DistributedDataParallel as DDP

    unused = any(f.skips_params for f in denoiser.factors)  # e.g. REPA's projector after its stop_step
    return Replicated(denoiser, DDP(denoiser, find_unused_parameters=unused))


def shard(denoiser: nn.Module, mesh, cfg: FSDPConfig, precision: Precision) -> None:
    """`fully_shard` every PRX block, then the denoiser (the root) on `mesh`, in place."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Inputs are not cast (cast_forward_inputs=False): t and the RoPE table stay fp32 as under DDP;
    # autocast casts each matmul's operands, so gathering bf16 changes no matmul's dtype.
    bf16 = cfg.mixed_precision == "auto" and precision.autocast
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None,
        reduce_dtype=torch.float32 if bf16 else None,
        cast_forward_inputs=False,
    )
    for block in denoiser.prx.blocks:  # one all-gather per block; the factor hooks run between them
        fully_shard(block, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward, mp_policy=policy)
    for module in denoiser.factors.modules():  # a storage dtype of its own (REPA's bf16 projector):
        if isinstance(module, Stored):  # FSDP holds one dtype per unit
            fully_shard(module, mesh=mesh, mp_policy=policy)
    # the rest (embeddings, final layer, factor modules): kept gathered from forward to backward, whose
    # start needs them at once (FSDP's default for the root)
    fully_shard(denoiser, mesh=mesh, mp_policy=policy)


@PARALLEL.register(FSDPConfig)
def build_fsdp(cfg: FSDPConfig, denoiser: nn.Module, dist: Dist, precision: Precision) -> Replicated:
    if dist.world == 1:
        return Replicated(denoiser, denoiser)
    shard(denoiser, _mesh(cfg, dist), cfg, precision)
    return Sharded(denoiser, dist.main)


def wrap(cfg: Config, denoiser: nn.Module, dist: Dist, precision: Precision) -> Replicated:
    """Spread `denoiser` (on its device, in its weight dtype) over the processes; build the optimizer after."""
    return PARALLEL.build(cfg, denoiser, dist, precision)


def lockstep(mine: list[int], size: int, n: int, world: int) -> Iterator[tuple[list[int], bool]]:
    """This process's share `mine` of n items (item j on process j mod world) in chunks of `size`, then
    throw-away chunks ([0], False) until every process has run as many chunks as the busiest one.

    Under FSDP each forward gathers weights from every process, so all must run the same number of
    forwards (evaluation splits n items that need not divide evenly); under DDP the padding costs
    nothing, as the process would otherwise wait for the others."""
    chunks = math.ceil(math.ceil(n / world) / size)
    for k in range(chunks):
        part = mine[k * size : (k + 1) * size]
        yield (part, True) if part else ([0], False)
