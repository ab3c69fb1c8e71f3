"""Per-sample randomness: every random number of a train step is keyed by (arm seed, step, global sample index).

An arm's result does not depend on how many processes trained it (docs/architecture.md). So nothing
random in training comes from a generator seeded by rank, or by (seed, step) and then sliced: each
sample of the global batch owns one stream per purpose, `stream` naming it ("t.logit", "noise",
"route", …), seeded from a hash of (seed, step, global index, stream), and each process draws only
the samples it holds. One process holding the whole batch draws exactly what N processes draw
together, and a resumed run draws what an uninterrupted one did.

The train step builds one `Draws` per step and hands it to whatever needs random numbers: the flow
objective (t, noise), caption dropout, the tokenizer's posterior sample, and the denoiser's factors
(`state.inputs["draws"]`, e.g. TREAD's routed tokens). A factor asks it for its numbers; it never
builds a generator of its own.

Cost: one generator re-seeded per sample and stream (a hash and a `manual_seed`, a few µs on the CPU,
one tiny host call on CUDA) and one fill per sample instead of one per batch. `bench/draws.py`
measures it at the study's shapes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def sample_seed(seed: int, step: int, index: int, stream: str) -> int:
    """The 63-bit seed of sample `index`'s `stream` at `step` of the arm seeded `seed`."""
    digest = hashlib.blake2b(f"{stream}:{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sample_generator(
    seed: int, step: int, index: int, stream: str, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator that depends only on (seed, step, global sample index, stream)."""
    return torch.Generator(device).manual_seed(sample_seed(seed, step, index, stream))


class Draws:
    """The random numbers of one train step for the samples one process holds.

    `indices` are the global sample indices of this process's rows, in row order (rank r of a world
    holding b rows each: r·b … r·b + b − 1). Every method returns a tensor whose row i depends only on
    (seed, step, indices[i], stream): never on the rank, the world size or the other rows.
    """

    def __init__(self, seed: int, step: int, indices: Sequence[int], device: torch.device | str = "cpu"):
        self.seed, self.step, self.indices = seed, step, tuple(int(i) for i in indices)
        self.device = torch.device(device)

    @classmethod
    def of_rank(cls, seed: int, step: int, rank: int, rows: int, device: torch.device | str = "cpu") -> Draws:
        """The draws of rank `rank`'s `rows` consecutive rows of the global batch."""
        return cls(seed, step, range(rank * rows, (rank + 1) * rows), device)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, rows: slice) -> Draws:
        """The draws of rows `rows` alone (a micro-batch): each row's numbers are what they were."""
        return Draws(self.seed, self.step, self.indices[rows], self.device)

    def normal(
        self, stream: str, shape: Sequence[int] = (), device: torch.device | str | None = None
    ) -> torch.Tensor:
        """(rows, *shape) standard normal float32 draws on `device` (default: the draws' device)."""
        return self._fill(stream, shape, device, lambda row, gen: row.normal_(generator=gen))

    def uniform(
        self, stream: str, shape: Sequence[int] = (), device: torch.device | str | None = None
    ) -> torch.Tensor:
        """(rows, *shape) float32 draws uniform on [0, 1)."""
        return self._fill(stream, shape, device, lambda row, gen: row.uniform_(generator=gen))

    def _fill(self, stream, shape, device, fill) -> torch.Tensor:
        device = self.device if device is None else torch.device(device)
        out = torch.empty((len(self.indices), *shape), device=device)
        gen = torch.Generator(device)  # one generator, re-seeded per sample (cheap; a new one is not)
        for row, index in zip(out.view(len(self.indices), -1), self.indices, strict=True):
            fill(row, gen.manual_seed(sample_seed(self.seed, self.step, index, stream)))
        return out
