"""Which rows each training step reads: a pure function of (seed, step), the same at any process count
and on resume — the plain step sampler, and PRX's aspect-ratio buckets (`data.buckets: prx`), one bucket
a global batch."""

from __future__ import annotations

import math

import numpy as np
import torch

from trainer.data.rows import DataError


def bucket_sizes(
    resolution: int, grain: int, min_ar: float = 0.5, max_ar: float = 2.0
) -> list[tuple[int, int]]:
    """PRX's aspect-ratio buckets (prx/dataset/transforms.py `build_image_size_list`, the same list its
    scripts/fine-t2i-to-mds.py writes): (H, W) pairs, sides multiples of `grain`, about resolution² px each,
    aspect W/H about [min_ar, max_ar] (the floored side takes the extremes a little beyond), in ascending
    aspect. With n = resolution / grain cells a side: for each
    width of w cells, the tallest height floor(n² / w) cells, and for each height of h cells the widest
    width floor(n² / h). (PRX also asks sides divisible by 16, which multiples of its grain 32 are.)
    PRX's lists: 7 buckets at 256 px, 27 at 1024 px (W×H 160×352 … 256×256 … 352×160, and 704×1440 … 1440×704)."""
    n2, sizes = (resolution / grain) ** 2, set()
    for cells in range(math.ceil(math.sqrt(n2 * min_ar)), math.floor(math.sqrt(n2 * max_ar)) + 1):
        sizes.add((math.floor(n2 / cells) * grain, cells * grain))  # width of `cells`, tallest height
    for cells in range(math.ceil(math.sqrt(n2 / max_ar)), math.floor(math.sqrt(n2 / min_ar)) + 1):
        sizes.add((cells * grain, math.floor(n2 / cells) * grain))  # height of `cells`, widest width
    return sorted((s for s in sizes if min(s) > 0), key=lambda hw: (hw[1] / hw[0], hw))


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> int:
    """The index of the bucket (H, W) whose aspect W/H is nearest the image's width/height, as PRX picks
    it (`get_closest_ar`: the least |W/H − width/height|); on a tie the narrower one."""
    aspect = width / height
    return min(range(len(buckets)), key=lambda i: (abs(buckets[i][1] / buckets[i][0] - aspect), i))


class StepBatchSampler(torch.utils.data.Sampler):
    """This rank's indices for steps `start_step .. total_steps`, a pure function of (seed, step).

    The global index stream is a fresh permutation per epoch; step s takes the global batch
    at positions [s·B, (s+1)·B) and each rank its contiguous slice. So a resumed run reads
    exactly the batches an uninterrupted one would, and N processes read together what one
    process reads alone.
    """

    def __init__(
        self,
        n: int,
        global_batch: int,
        seed: int,
        start_step: int,
        total_steps: int,
        rank: int = 0,
        world: int = 1,
    ):
        if global_batch % world:
            raise ValueError(f"train.batch_size={global_batch} is not divisible by {world} processes")
        self.n, self.b, self.seed = n, global_batch, seed
        self.start, self.total, self.rank, self.world = start_step, total_steps, rank, world
        self._perm: tuple[int, np.ndarray] | None = None

    def _position(self, pos: int) -> int:
        epoch, offset = divmod(pos, self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return int(self._perm[1][offset])

    def global_batch(self, step: int) -> list[int]:
        return [self._position(p) for p in range(step * self.b, (step + 1) * self.b)]

    def __iter__(self):
        per_rank = self.b // self.world
        for step in range(self.start, self.total):
            yield self.global_batch(step)[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __len__(self) -> int:
        return self.total - self.start


class BucketBatchSampler(StepBatchSampler):
    """Aspect-ratio buckets (`data.buckets: prx`): every global batch holds one bucket, still a pure
    function of (seed, step) and cut into the same contiguous rank slices, so N processes read together
    what one reads alone and a resumed run reads what an uninterrupted one did.

    `buckets`: each item's bucket, (n,) int. Epoch e: each bucket's items in a permutation of their own
    (seeded by seed, e, bucket), cut into whole global batches (a bucket's last partial batch is left out
    that epoch, as PRX's loader drops its last batch), and the batches of every bucket in a permutation
    seeded by (seed, e). Step s takes batch s mod (batches an epoch) of epoch s div it. PRX draws one
    bucket per device batch (MosaicML streaming's device_per_stream, a stream per bucket); one per global
    batch keeps the batch independent of the process count."""

    def __init__(self, buckets, global_batch: int, seed: int, start_step: int, total_steps: int,
                 rank: int = 0, world: int = 1):  # fmt: skip
        buckets = np.asarray(buckets, dtype=np.int64)
        super().__init__(len(buckets), global_batch, seed, start_step, total_steps, rank, world)
        self.members = [np.flatnonzero(buckets == k) for k in range(int(buckets.max(initial=-1)) + 1)]
        self.per_epoch = sum(len(m) // global_batch for m in self.members)
        if not self.per_epoch:
            largest = max((len(m) for m in self.members), default=0)
            raise DataError(
                f"no aspect-ratio bucket holds train.batch_size={global_batch} training images (the fullest "
                f"holds {largest}); a batch is one bucket: use a smaller batch, more data or data.buckets: square"
            )
        self._epoch: tuple[int, np.ndarray] | None = None

    def _batches(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s global batches, (per_epoch, B) item indices."""
        if self._epoch is None or self._epoch[0] != epoch:
            whole = []
            for k, m in enumerate(self.members):
                order = m[np.random.default_rng([self.seed, epoch, k + 1]).permutation(len(m))]
                whole.append(order[: len(m) // self.b * self.b].reshape(-1, self.b))
            batches = np.concatenate(whole)
            self._epoch = (
                epoch,
                batches[np.random.default_rng([self.seed, epoch, 0]).permutation(len(batches))],
            )
        return self._epoch[1]

    def global_batch(self, step: int) -> list[int]:
        epoch, at = divmod(step, self.per_epoch)
        return [int(i) for i in self._batches(epoch)[at]]


def train_sampler(train_set, data, global_batch: int, seed: int, start_step: int, total_steps: int,
                  rank: int = 0, world: int = 1) -> StepBatchSampler:  # fmt: skip
    """The training batch sampler `data` asks for: one bucket per batch with aspect-ratio buckets, else
    the plain step sampler."""
    buckets = data.train_buckets() if hasattr(data, "train_buckets") else None
    if buckets is None:
        return StepBatchSampler(len(train_set), global_batch, seed, start_step, total_steps, rank, world)
    return BucketBatchSampler(
        train_set.bucket_index(), global_batch, seed, start_step, total_steps, rank, world
    )
