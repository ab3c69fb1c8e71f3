"""Saving without stopping the job: the state is copied to host memory, then written in the background.

A save used to stop every process while the main one wrote the whole state and read it back to hash
it (20-35 s for PRX-1.2B). Now the only part the job waits for is `Stager.stage`: every tensor copied
into host buffers (pinned when it is on a GPU, so the copy runs at the link's speed), kept from one
save to the next, since a fresh allocation's page faults cost more than the copy itself (on this CPU
2 GB/s against 12 GB/s). `Background` then writes the copy in a thread while training goes on, one
write at a time: the next save, the end of training and a stop signal each wait for the one in
flight, and its error (a full disk) comes back to the trainer at the next log point.

`state_bytes(cfg)` projects what a checkpoint of an arm holds, from its model's real parameter count.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor


def _rebuilt(x: Any, leaf: Callable[[tuple, torch.Tensor], torch.Tensor], path: tuple = ()) -> Any:
    """`x` with new containers (dicts, lists, tuples) and every tensor replaced by `leaf(path, tensor)`:
    nothing in the result is shared with a live optimizer or model."""
    if isinstance(x, torch.Tensor):
        return leaf(path, x)
    if isinstance(x, dict):
        return {k: _rebuilt(v, leaf, (*path, k)) for k, v in x.items()}
    if isinstance(x, list):
        return [_rebuilt(v, leaf, (*path, i)) for i, v in enumerate(x)]
    if isinstance(x, tuple):
        items = [_rebuilt(v, leaf, (*path, i)) for i, v in enumerate(x)]
        return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
    return x  # numbers, strings, numpy RNG states: immutable or made fresh for the save


class Stager:
    """Copies of a nested state in host buffers that live from one save to the next."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}

    def stage(self, state: Any) -> Any:
        """`state` with every tensor copied to the host (a DTensor's shard: a DTensor of the same place in
        the whole tensor, its part on the host); returns once the copies are complete."""
        devices: set[torch.device] = set()

        def copy(path: tuple, t: torch.Tensor) -> torch.Tensor:
            if isinstance(t, DTensor):  # a shard: its local part copied, its place in the whole kept
                return DTensor(copy(path, t.to_local()), t._spec, requires_grad=False)
            buf = self.buffers.get(path)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
                self.buffers[path] = buf
            if t.is_cuda:
                devices.add(t.device)
            return buf.copy_(t.detach(), non_blocking=t.is_cuda)

        staged = _rebuilt(state, copy)
        for device in devices:
            torch.cuda.synchronize(device)
        return staged


def nbytes(state: Any) -> int:
    """The bytes of every tensor in a nested state."""
    total = 0

    def count(path: tuple, t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        part = t.to_local() if isinstance(t, DTensor) else t  # a shard's bytes, not the whole tensor's
        total += part.numel() * part.element_size()
        return t

    _rebuilt(state, count)
    return total


class Background:
    """At most one write in a background thread; its error is raised in the trainer's thread."""

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def submit(self, write: Callable[[], object]) -> None:
        self.wait()

        def run() -> None:
            try:
                write()
            except BaseException as e:  # handed to the trainer's thread
                self.error = e

        # not a daemon: an exit the trainer did not see coming still lets the write finish
        self.thread = threading.Thread(target=run, name="checkpoint-writer")
        self.thread.start()

    @property
    def in_flight(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def wait(self) -> None:
        """Until the write in flight (if any) is done; raises its error."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if (error := self.error) is not None:
            self.error = None
            raise error

    def check(self) -> None:
        """Raise a finished write's error now, without waiting for one still in flight."""
        if not self.in_flight:
            self.wait()


@dataclass(frozen=True)
class StateBytes:
    """What one checkpoint of an arm holds, in bytes."""

    parameters: int
    weights: int
    optimizer: int
    ema: int

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.ema


def state_bytes(cfg) -> StateBytes:
    """Projected from a TrainConfig: PRX's parameters counted on the meta device (no memory), stored in
    the precision's weight dtype; two optimizer moments per parameter in that dtype (AdamW's; Muon
    keeps one for its matrices, so this is an upper bound); an fp32 EMA shadow when the EMA is on.
    The modules factors add (projectors, fusions) are small and left out."""
    from diffusers import PRXTransformer2DModel

    from trainer.factors.precision import PRECISION

    with torch.device("meta"):
        kwargs = cfg.model.diffusers_kwargs(cfg.tokenizer.channels, cfg.text_encoder.dim)
        n = sum(p.numel() for p in PRXTransformer2DModel(**kwargs).parameters())
    width = PRECISION.build(cfg.precision, torch.device("cpu")).weights.itemsize
    return StateBytes(n, n * width, 2 * n * width, 4 * n if cfg.ema is not None else 0)
