"""Activation checkpointing (`train.activation_checkpointing`): each PRX block keeps only its inputs from the
forward and runs its forward again in the backward, instead of keeping every intermediate activation:
at high resolution or past 1B parameters the activations, not the weights, fill a GPU.

Per block, in torchtitan's order: checkpointing first, then `torch.compile` per block
(trainer/runtime/compile.py, which traces the checkpoint into its graph), then FSDP's `fully_shard`
(trainer/runtime/parallel.py), whose gather hooks sit outside the recomputed region, so the backward
gathers a block's weights once for both the recomputation and the gradients.

In place, as compile is: the block's `forward` becomes the checkpointed one, and the module tree, its
parameter names and state-dict keys stay what they were (torch's `checkpoint_wrapper` would insert a
module and rename every block parameter), so checkpoints, the EMA's names, the optimizer's groups and
FSDP's units are the same with checkpointing on or off, and a run may switch it between restarts.

What is recomputed draws no random numbers: a PRX block has no dropout, and the factor hooks between blocks
(TREAD/SPRINT choosing tokens from the step's per-sample draws, REPA reading a block's output) run outside
it, once per forward. `preserve_rng_state` (torch's default) would replay any global-RNG draw inside a
block anyway. The losses and gradients equal those without checkpointing (tests/trainer/test_accumulation.py).
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpoint_blocks(denoiser: nn.Module) -> None:
    """Make each PRX block of `denoiser` recompute its activations in backward (before compile and FSDP)."""
    for block in denoiser.prx.blocks:
        # non-reentrant: takes the keyword arguments the denoiser passes, composes with torch.compile and FSDP
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)
