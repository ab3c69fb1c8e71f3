"""Generation metrics during training: sample a fixed prompt set, score it with `eval/`, save a grid.

The prompt set is the first `eval.samples` images of the held-out split, with their captions
in the eval caption column; prompt j always starts from the same noise (seeded by j), so every
arm and every step is scored on the same prompts and noises. Sampling is sharded over processes
(prompt j on rank j mod world) and the features are gathered; the number of samples never
depends on the number of processes. The real images the metrics compare against are those
held-out images, or the first `eval.samples` of `eval.reference` when it is set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from trainer import flow
from trainer.data.datasets import ATTRIBUTES, ReferenceSet, SyntheticConfig, attribute_net
from trainer.runtime import parallel

GRID_TILE = 96  # px: small samples are enlarged (nearest) in the saved grid so a person can see them
PROMPT_SEED = 4321  # noise of the eval prompts: fixed, equal across arms, seeds and steps


def requested_attributes(caption_column: str, attrs: np.ndarray) -> dict[str, np.ndarray]:
    """Which attributes each synthetic prompt asks for: all in long captions, the shape in short ones."""
    named = set(ATTRIBUTES) if caption_column == "long" else {"shape"}
    return {a: np.where(a in named, attrs[:, i], -1) for i, a in enumerate(ATTRIBUTES)}


class GenerationEval:
    """Built at set-up (a missing weight fails before training starts), called at every eval step."""

    def __init__(self, trainer):
        from eval.evaluator import Evaluator

        self.tr, cfg = trainer, trainer.cfg.eval
        self.n = min(cfg.samples, len(trainer.val_set))
        self.cache_dir = Path(cfg.cache_dir or trainer.rundir.default_eval_cache)
        self.mine = list(range(trainer.dist.rank, self.n, trainer.dist.world))  # prompts this process samples
        extractors = {}
        if isinstance(trainer.cfg.data, SyntheticConfig) and any(
            m.startswith(("domain_", "prompt_")) for m in cfg.metrics
        ):
            from eval.domain import DomainAttrExtractor

            net = attribute_net(trainer.cfg.data, self.cache_dir)
            extractors["domain-attr"] = DomainAttrExtractor(net, trainer.device)
        self.evaluator = Evaluator(
            cfg.metrics,
            self._reference(),
            extractors=extractors,
            weights_dir=trainer.cfg.weights_dir,
            device=trainer.device,
            batch_size=cfg.batch_size,
        )

    def _reference(self):
        """The real images: `eval.reference` (listed now: a missing set fails at set-up), else the held-out rows."""
        from eval.evaluator import Reference

        cfg, batch, val = self.tr.cfg, self.tr.cfg.eval.batch_size, self.tr.val_set
        if cfg.eval.reference is None:
            return Reference(
                self._dataset_id(), self.n, lambda: _uint8_batches(val, self.n, batch), self.cache_dir
            )
        real = ReferenceSet(cfg.eval.reference, cfg.data.resolution)
        n = min(cfg.eval.samples, len(real))
        return Reference(real.identity(), n, lambda: _uint8_batches(real.images(n), n, batch), self.cache_dir)

    def _dataset_id(self) -> str:
        d = self.tr.cfg.data.model_dump(mode="json")
        d.pop("caption", None)  # the training caption column does not change the real images
        return "heldout:" + ",".join(f"{k}={v}" for k, v in sorted(d.items()))

    @torch.no_grad()
    def sample(self, indices: list[int]) -> np.ndarray:
        """Images for prompts `indices` (this process's share of the n prompts) as uint8 (N, H, W, 3)."""
        tr, cfg = self.tr, self.tr.cfg
        out = []
        empty_txt, empty_mask = tr.text.empty()
        wdtype = tr.precision.weights

        def net(x, t, txt, mask):
            with tr.precision.context():
                return tr.denoiser(x.to(wdtype), t, txt.to(wdtype), mask).pred

        for chunk, counts in parallel.lockstep(indices, cfg.eval.batch_size, self.n, tr.dist.world):
            items = [tr.val_set[j] for j in chunk]
            txt, mask = tr.text([it["caption"] for it in items])
            shape = tr.tokenizer.encode(items[0]["image"][None].to(tr.device)).shape[1:]  # (C, h, w)
            noise = torch.stack(
                [torch.randn(shape, generator=torch.Generator().manual_seed(PROMPT_SEED + j)) for j in chunk]
            ).to(tr.device)
            x0 = flow.euler_sample(
                net,
                noise,
                txt,
                mask,
                empty_txt,
                empty_mask,
                cfg.flow,
                steps=cfg.eval.sample_steps,
                guidance=cfg.eval.guidance,
                dtype=tr.precision.flow,
            )
            images = tr.tokenizer.decode(x0.float())  # (b, 3, H, W) in [0, 1]
            if counts:  # else a throw-away chunk that keeps this process in step with the others
                out.append((images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8))
        return np.concatenate(out) if out else np.zeros((0, 1, 1, 3), np.uint8)

    def __call__(self, step: int) -> dict[str, float]:
        tr = self.tr
        tr.denoiser.eval()
        images = self.sample(self.mine)
        tr.denoiser.train()
        feats = self.evaluator.features(images) if len(images) else {}
        feats, images = self._gather(feats, images)
        if not tr.dist.main:
            return {}
        attrs = np.stack([tr.val_set[j]["attrs"].numpy() for j in range(self.n)])
        requested = requested_attributes(tr.cfg.eval.caption or getattr(tr.cfg.data, "caption", ""), attrs)
        metrics = self.evaluator.compute(feats, requested)
        shown = images[: tr.cfg.eval.grid]
        if len(shown):  # people look at samples before any number
            from eval.images import save_grid

            save_grid(
                shown, tr.rundir.eval_grid(step), nrow=int(np.ceil(np.sqrt(len(shown)))), min_tile=GRID_TILE
            )
        return metrics

    def _gather(self, feats: dict, images: np.ndarray) -> tuple[dict, np.ndarray]:
        """Features and grid images of every prompt on the main process, in prompt order."""
        world = self.tr.dist.world
        if world == 1:
            return feats, images
        parts: list = [None] * world
        tdist.all_gather_object(parts, (self.mine, feats, images[: self.tr.cfg.eval.grid]))
        order = np.argsort(np.concatenate([p[0] for p in parts]))
        feats = {k: np.concatenate([p[1][k] for p in parts])[order] for k in feats}
        grid = [(j, img) for p in parts for j, img in zip(p[0], p[2], strict=True)]
        grid.sort(key=lambda x: x[0])
        return feats, np.stack([img for _, img in grid])


def _uint8_batches(dataset, n: int, batch_size: int):
    """The first `n` images of a dataset of training items as uint8 (b, H, W, 3) batches, decoded one
    batch at a time (10k images at 256 px never sit in memory as floats)."""
    for lo in range(0, n, batch_size):
        items = [dataset[j]["image"] for j in range(lo, min(n, lo + batch_size))]  # each (3, H, W) in [0, 1]
        yield (torch.stack(items).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


class NoGeneration:
    """`eval.metrics` is empty: nothing is sampled, the held-out loss is the only metric."""

    n = 0

    def __call__(self, step: int) -> dict[str, float]:
        return {}


def build(trainer) -> GenerationEval | NoGeneration:
    return GenerationEval(trainer) if trainer.cfg.eval.metrics else NoGeneration()
