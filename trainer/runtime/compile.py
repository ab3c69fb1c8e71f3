"""Compiled train steps (`train.compile`): each PRX block compiled on its own by torch.compile.

Per block (regional compilation), not the whole denoiser: `Denoiser.forward` runs the blocks itself
and calls the factor hooks between them (TREAD/SPRINT pick and rejoin tokens, REPA reads a block's
output), so the hooks stay plain eager Python while the work inside a block (attention and MLP,
nearly every FLOP of the step) runs compiled. The blocks share one compiled graph (dynamo traces
their shared code once, with the parameters as graph inputs), so start-up costs one block's compile.

Shapes are static (`dynamic=False`): in training a block sees one shape, the full sequence or,
inside a token route, the route's fixed K kept tokens, so a route costs one more graph, made in the
first step, and no step after recompiles. Evaluation and sampling call the same blocks eagerly
(`Compiled.eager`): their batches vary (the last chunk, guidance doubling the batch) and each new
shape would be compiled anew, for a pass made once every few thousand steps.

On CUDA the compiled step asks for cuDNN's attention first, then flash, then the memory-efficient
kernel (`Compiled.step`): PRX passes a boolean text mask, which flash attention cannot take, so
torch's own order ends at the memory-efficient kernel. SDPA picks a kernel when the block is traced,
so the order holds around the whole step. Fused AdamW is not here: `optim._adamw` fuses on CUDA
whether or not the step is compiled. `compile: off` is the trainer without any of this, bit for bit.

Under FSDP2 the blocks are compiled before `fully_shard` wraps them (the order torchtitan uses);
FSDP2's gather and reshard hooks are excluded from dynamo, so they run eagerly around each block.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# torch.compile's backend. CPU tests use "aot_eager" (AOTAutograd's forward and backward graphs,
# run by eager kernels): inductor's C++ build of one tiny block takes about a minute on two cores.
BACKEND = "inductor"
# SDPA kernels in the order a compiled CUDA step tries them; () = torch's own order.
ATTENTION = (
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
)


def enabled(choice: str, device: torch.device) -> bool:
    """`train.compile`: auto = on for CUDA, off on CPU (where compiling takes longer than it saves)."""
    return device.type == "cuda" if choice == "auto" else choice == "on"


def compile_blocks(denoiser: nn.Module, backend: str | None = None) -> None:
    """Compile each PRX block of `denoiser` in place (`nn.Module.compile`): the modules, their
    parameters and state-dict keys stay what they were, for checkpoints, the optimizer and FSDP."""
    for block in denoiser.prx.blocks:
        block.compile(backend=backend or BACKEND, dynamic=False)


@dataclass(frozen=True)
class Compiled:
    """Whether the blocks are compiled, and the contexts the trainer runs its passes in."""

    on: bool
    device_type: str
    attention: tuple[SDPBackend, ...] = ATTENTION

    @property
    def orders_attention(self) -> bool:
        """Whether `step` sets the attention kernel order: a compiled CUDA step with an order to set."""
        return self.on and self.device_type == "cuda" and bool(self.attention)

    def step(self):
        """Around a train step: the attention kernel order of a compiled CUDA step."""
        if not self.orders_attention:
            return contextlib.nullcontext()
        return sdpa_kernel(list(self.attention), set_priority=True)

    def eager(self):
        """Around evaluation and sampling: compiled blocks run their eager code, nothing is compiled."""
        return torch.compiler.set_stance("force_eager") if self.on else contextlib.nullcontext()


def compiled(choice: str, denoiser: nn.Module, device: torch.device) -> Compiled:
    """Compile `denoiser`'s blocks when `choice` says so (on its device, before DDP or FSDP wraps it)."""
    on = enabled(choice, device)
    if on:
        compile_blocks(denoiser)
    return Compiled(on, device.type)
