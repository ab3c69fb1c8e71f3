"""Evaluation during training (and `ablate eval`): the held-out loss, the generation metrics, a sample grid.

The eval set is the first `eval.samples` rows of one image-caption set: the held-out split (captions
in the eval caption column), or `eval.reference` when it is set (photos with their own captions, as PRX
prompts Unsplash photos with theirs). Row j's caption is prompt j, which always starts from the same
noise (seeded by j), and row j's image is a real image the metrics compare against; so every arm and
every step is scored on the same prompts, noises and real images. Sampling is sharded over processes
(prompt j on rank j mod world) and the features are gathered; the number of samples never depends on
the number of processes.

`Sampler` is the one way images come out of a denoiser (prompts and noise in, images out); the metrics
get a sampler and the settings they need, never the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from pydantic import Field, model_validator

from eval.metrics import ALWAYS, GENERATED, METRICS, unknown
from trainer import flow
from trainer.data.cache import UNCACHED
from trainer.data.datasets import ReferenceConfig, ReferenceSet
from trainer.data.synthetic import ATTRIBUTES, SyntheticConfig, attribute_net
from trainer.factors.precision import Precision
from trainer.identity import EVALUATES, RUNS, mark
from trainer.registry import Config
from trainer.runtime.clock import Cadence
from trainer.runtime.dist import Dist
from trainer.runtime.parallel import lockstep

PROMPT_SEED = 4321  # noise of the eval prompts: fixed, equal across arms, seeds and steps
VAL_SEED = 1234  # noise of the held-out set: fixed, equal across arms and seeds


class EvalConfig(Config):
    every: int = Field(1000, ge=1, description="evaluate every N steps (and at the end)")
    caption: str | None = Field(
        None,
        description="caption column of the held-out set: the held-out loss's captions, and the eval prompts "
        "unless eval.reference brings its own; keep it equal across arms (default: the training column)",
    )
    batch_size: int = Field(64, ge=1, description="held-out / sampling batch size per process")
    metrics: list[str] = Field(
        [],
        description=f"generation metrics ({', '.join(GENERATED)}; eval/metrics.py); empty = the held-out "
        f"loss {ALWAYS} only, which every arm computes. fid_prx is PRX's FID on colour-inverted uint8 images, "
        "comparable only with PRX's published numbers; fid is standard clean-fid",
    )
    samples: int = Field(
        1000,
        ge=1,
        description="generated images per eval step (the first rows of the held-out set, or of eval.reference), "
        "whatever the number of processes",
    )
    sample_steps: int = Field(50, ge=1, description="Euler steps per sample")
    guidance: float = Field(3.5, ge=0, description="classifier-free guidance scale")
    grid: int = Field(16, ge=0, description="samples saved as eval/step_N.png")
    resamples: int = Field(
        1000,
        ge=0,
        description="eval noise: every metric again on this many resamples of the prompts (and of the held-out "
        "rows for val_loss), at the last step and at every `ablate eval`; `ablate rank` builds its eval intervals "
        "from them. 0 = none",
        json_schema_extra=mark(EVALUATES, neutral=0),  # added after hashes existed: none was kept before
    )
    cache_dir: str | None = Field(
        None,
        description="reference features and the demo's attribute net (default: <sweep dir>/.eval-cache)",
        json_schema_extra=mark(RUNS),  # where the same features are kept
    )
    reference: ReferenceConfig | None = Field(
        None,
        description="photos with their own captions: {kind: parquet|folder, path, caption, image_column}; "
        "their first `samples` rows are the eval prompts (the captions) and the real images the metrics "
        "compare against, prepared like training images (PRX: Unsplash photos, caption_llm_s); "
        "null = the held-out rows",
        json_schema_extra=mark(EVALUATES, neutral=None),  # added after hashes existed
    )

    @model_validator(mode="after")
    def _known_metrics(self):
        for name in self.metrics:
            if name == ALWAYS:
                raise ValueError(
                    f"{ALWAYS} is computed at every eval step of every arm; leave it out of eval.metrics"
                )
            if (problem := unknown(name, GENERATED)) is not None:
                raise ValueError(f"{problem}; eval.metrics takes {', '.join(GENERATED)}")
        asking = [name for name in self.metrics if not METRICS[name].needs_reference]
        if self.reference is not None and asking:
            raise ValueError(
                f"eval.metrics {asking} score what the demo domain's own prompts ask for; eval.reference "
                "brings its own captions, which ask for no known attributes: drop one of them"
            )
        return self


def sample_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed + index)


class Sampler:
    """Captions and their starting noise in, images out: Euler with classifier-free guidance on the
    denoiser as it is now (the caller chooses its weights: the EMA's during evaluation)."""

    def __init__(
        self, denoiser: torch.nn.Module, inputs: Any, precision: Precision, flow_cfg: Any, cfg: EvalConfig
    ):
        self.denoiser, self.inputs, self.precision, self.flow_cfg = denoiser, inputs, precision, flow_cfg
        self.steps, self.guidance = cfg.sample_steps, cfg.guidance

    def net(self, x: torch.Tensor, t: torch.Tensor, txt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with self.precision.context():
            return self.denoiser(x.to(self.precision.weights), t, txt.to(self.precision.weights), mask).pred

    @torch.no_grad()
    def __call__(self, captions: list[str], noise: torch.Tensor) -> torch.Tensor:
        """Images (b, 3, H, W) in [0, 1] for `captions`, each from its noise (b, C, h, w)."""
        txt, mask = self.inputs.text(captions)
        empty_txt, empty_mask = self.inputs.text.empty()
        x0 = flow.euler_sample(self.net, noise, txt, mask, empty_txt, empty_mask, self.flow_cfg, steps=self.steps,
                               guidance=self.guidance, dtype=self.precision.flow)  # fmt: skip
        return self.inputs.tokenizer.decode(x0.float())

    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        """(C, h, w) of the latent of a `resolution` px image: what the starting noise must be (the
        tokenizer's stated channels and downsampling; nothing is encoded to learn it)."""
        tokenizer = self.inputs.tokenizer
        side = resolution // tokenizer.downsample
        return (tokenizer.channels, side, side)


class HeldOutLoss:
    """Flow-matching loss on the held-out set at fixed (t, noise): comparable across arms and steps.

    t is an even grid over (0, 1); sample j's noise comes from a generator seeded by (VAL_SEED, j), so
    the number is the same whatever the number of processes."""

    def __init__(
        self, val_set: Any, inputs: Any, precision: Precision, flow_cfg: Any, dist: Dist, batch_size: int
    ):
        self.val_set, self.inputs, self.precision, self.flow_cfg = val_set, inputs, precision, flow_cfg
        self.dist, self.batch_size = dist, batch_size

    @torch.no_grad()
    def __call__(self, denoiser: torch.nn.Module) -> tuple[float, np.ndarray]:
        """(the loss, each held-out row's own loss (n,) on the main process, in row order)."""
        n, dev, world = len(self.val_set), self.dist.device, self.dist.world
        total, rows = torch.zeros((), dtype=torch.float64, device=dev), {}
        for chunk, counts in lockstep(list(range(self.dist.rank, n, world)), self.batch_size, n, world):
            per_row = self._losses(denoiser, chunk)  # (b,) float64
            if counts:  # else a throw-away chunk that keeps this process in step with the others
                total += per_row.sum()
                rows.update(zip(chunk, per_row.tolist(), strict=True))
        loss = float(self.dist.all_sum(total).item() / n)
        return loss, np.array([v for _, v in sorted(gathered(rows, self.dist).items())])

    def _losses(self, denoiser: torch.nn.Module, chunk: list[int]) -> torch.Tensor:
        n, dev, cfg = len(self.val_set), self.dist.device, self.flow_cfg
        batch = torch.utils.data.default_collate([self.val_set[j] for j in chunk])
        lat, txt, mask = self.inputs(batch, dev)
        x0 = lat.mean  # the posterior mean: the held-out loss stays deterministic
        noise = torch.stack(
            [torch.randn(x0.shape[1:], generator=flow.step_generator(VAL_SEED, j)) for j in chunk]
        )
        t = torch.tensor([(j + 0.5) / n for j in chunk], device=dev)
        xt = flow.interpolate(x0, noise.to(dev), t)
        with self.precision.context():
            pred = denoiser(xt.to(self.precision.weights), t, txt.to(self.precision.weights), mask).pred
        v_pred = flow.velocity(pred.float(), xt, t, cfg)
        v_true = flow.PREDICTIONS[cfg.prediction]["target"](x0, noise.to(dev), xt, t, cfg)
        return ((v_pred - v_true) ** 2).flatten(1).mean(1).double()  # (b,)


def requested_attributes(caption_column: str, attrs: np.ndarray) -> dict[str, np.ndarray]:
    """Which attributes each synthetic prompt asks for: all in long captions, the shape in short ones."""
    named = set(ATTRIBUTES) if caption_column == "long" else {"shape"}
    return {a: np.where(a in named, attrs[:, i], -1) for i, a in enumerate(ATTRIBUTES)}


def _uint8(images: torch.Tensor) -> np.ndarray:
    """(b, 3, H, W) in [0, 1] → uint8 (b, H, W, 3)."""
    return (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


class GenerationMetrics:
    """The generation metrics of `eval.metrics` on the fixed eval set: prompts, their noise and the real
    images, all from `eval.reference` when it is set, else from the held-out rows. Built at set-up, so a
    missing weight or reference set fails before training starts; with no metrics, nothing is sampled."""

    def __init__(
        self, cfg: EvalConfig, data: Any, val_set: Any, dist: Dist, weights_dir: str | None, cache_dir: Path
    ):
        self.cfg, self.data, self.dist = cfg, data, dist
        # listed now: a missing reference set fails at set-up
        self.real = ReferenceSet(cfg.reference, data.resolution) if cfg.metrics and cfg.reference else None
        self.rows = val_set if self.real is None else self.real.items  # row j: prompt j and real image j
        self.n = min(cfg.samples, len(self.rows)) if cfg.metrics else 0
        self.mine = list(range(dist.rank, self.n, dist.world))  # the prompts this process samples
        self.cache_dir = cache_dir
        self.evaluator = self._evaluator(weights_dir) if cfg.metrics else None

    def _evaluator(self, weights_dir: str | None):
        from eval.evaluator import Evaluator

        extractors = {}
        if isinstance(self.data, SyntheticConfig) and any(
            m.startswith(("domain_", "prompt_")) for m in self.cfg.metrics
        ):
            from eval.domain import DomainAttrExtractor

            extractors["domain-attr"] = DomainAttrExtractor(
                attribute_net(self.data, self.cache_dir), self.dist.device
            )
        return Evaluator(self.cfg.metrics, self._reference(), extractors=extractors, weights_dir=weights_dir,
                         device=self.dist.device, batch_size=self.cfg.batch_size)  # fmt: skip

    def _reference(self):
        """The real images: the first n rows' images, named for the reference-feature cache."""
        from eval.evaluator import Reference

        if self.real is None:
            # the images alone: not the caption, nor the training buckets (held-out images stay square)
            held_out = self.data.model_dump(mode="json", exclude={"caption", *UNCACHED})
            name = "heldout:" + ",".join(f"{k}={v}" for k, v in sorted(held_out.items()))
        else:
            name = self.real.identity()
        rows, n, batch = self.rows, self.n, self.cfg.batch_size
        # fid_prx's real images: resized with torch as PRX's eval set (a synthetic set is drawn at size)
        prx = rows.resized_with("torch") if hasattr(rows, "resized_with") else rows
        return Reference(name, n, lambda: _uint8_batches(rows, n, batch), self.cache_dir,
                         torch_images=lambda: _float_batches(prx, n, batch))  # fmt: skip

    def sample(self, sampler: Sampler, indices: list[int]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(the metrics' features, the images as uint8 (N, H, W, 3)) for prompts `indices` (this process's
        share of the n prompts). Features are taken from each chunk's float images, which each metric's
        extractor quantises its own way (fid_prx truncates as PRX does; the others round, as a PNG)."""
        feats, out = [], []
        shape = sampler.latent_shape(self.data.resolution)
        for chunk, counts in lockstep(indices, self.cfg.batch_size, self.n, self.dist.world):
            captions = [p["caption"] for p in self.rows.prompts(chunk)]  # no image is decoded
            noise = torch.stack(
                [torch.randn(shape, generator=sample_generator(PROMPT_SEED, j)) for j in chunk]
            )
            images = sampler(captions, noise.to(self.dist.device))  # (b, 3, H, W) in [0, 1]
            if counts:  # else a throw-away chunk that keeps this process in step with the others
                feats.append(self.evaluator.features(images))
                out.append(_uint8(images))
        if not out:
            return {}, np.zeros((0, 1, 1, 3), np.uint8)
        return {k: np.concatenate([f[k] for f in feats]) for k in feats[0]}, np.concatenate(out)

    def __call__(
        self, sampler: Sampler, resamples: int = 0
    ) -> tuple[dict[str, float], np.ndarray, EvalNoise]:
        """({metric: value}, the grid's images, the eval noise when `resamples`) on the main process;
        ({}, empty, none) elsewhere."""
        noise = EvalNoise()
        if self.evaluator is None:
            return {}, np.zeros((0, 1, 1, 3), np.uint8), noise
        feats, images = self.sample(sampler, self.mine)
        feats, images = self._gather(feats, images)
        if not self.dist.main:
            return {}, images[:0], noise
        attrs = np.stack([p["attrs"] for p in self.rows.prompts(list(range(self.n)))])
        requested = requested_attributes(self.cfg.caption or getattr(self.data, "caption", ""), attrs)
        if resamples:
            noise.resamples = self.evaluator.resampled(feats, requested, resamples)
            noise.per_item = {f"features/{k}": v.astype(np.float16) for k, v in feats.items()}
            noise.per_item |= {
                f"scores/{k}": v for k, v in self.evaluator.per_prompt(feats, requested).items()
            }
        return self.evaluator.compute(feats, requested), images[: self.cfg.grid], noise

    def _gather(self, feats: dict, images: np.ndarray) -> tuple[dict, np.ndarray]:
        """Features and grid images of every prompt on the main process, in prompt order."""
        world = self.dist.world
        if world == 1:
            return feats, images
        parts: list = [None] * world
        in_grid = sum(j < self.cfg.grid for j in self.mine)  # the grid shows prompts 0 .. grid-1
        tdist.all_gather_object(parts, (self.mine, feats, images[:in_grid]))
        order = np.argsort(np.concatenate([p[0] for p in parts]))
        feats = {k: np.concatenate([p[1][k] for p in parts])[order] for k in feats}
        grid = sorted(
            ((j, img) for p in parts for j, img in zip(p[0][: len(p[2])], p[2], strict=True)),
            key=lambda x: x[0],
        )
        return feats, np.stack([img for _, img in grid])


def _float_batches(dataset, n: int, batch_size: int):
    """The first `n` images of a dataset of training items as float (b, 3, H, W) batches in [0, 1], decoded
    one batch at a time (10k images at 256 px never sit in memory)."""
    for lo in range(0, n, batch_size):
        yield torch.stack([dataset[j]["image"] for j in range(lo, min(n, lo + batch_size))])


def _uint8_batches(dataset, n: int, batch_size: int):
    """`_float_batches` quantised as a PNG is, uint8 (b, H, W, 3)."""
    for images in _float_batches(dataset, n, batch_size):
        yield _uint8(images)


@dataclass
class EvalNoise:
    """What `ablate rank` needs to measure an eval step's noise: each metric on B resamples of the prompts
    (val_loss: of the held-out rows), and the per-prompt values they came from (half-precision features,
    per-prompt scores), kept beside the record."""

    resamples: dict[str, np.ndarray] = field(default_factory=dict)
    per_item: dict[str, np.ndarray] = field(default_factory=dict)


class Evaluation:
    """What an eval step computes, and when (`should_eval`); its eval noise when asked (the last step)."""

    def __init__(
        self, cfg: EvalConfig, held_out: HeldOutLoss, generation: GenerationMetrics, total_steps: int
    ):
        self.held_out, self.generation, self.resamples = held_out, generation, cfg.resamples
        self.should_eval = Cadence(cfg.every, total_steps)

    def __call__(
        self, denoiser: torch.nn.Module, sampler: Sampler, *, noise: bool = False
    ) -> tuple[dict[str, float], np.ndarray, EvalNoise]:
        """({metric: value}, grid images, eval noise if `noise`) of `denoiser` as it is now; the main
        process has them all."""
        denoiser.eval()
        try:
            val, per_row = self.held_out(denoiser)
            generated, grid, found = self.generation(sampler, self.resamples if noise else 0)
        finally:
            denoiser.train()
        if noise and self.resamples and len(per_row):
            from eval.distances import mean_resamples, resample_counts

            found.resamples[ALWAYS] = mean_resamples(per_row, resample_counts(len(per_row), self.resamples))
            found.per_item[f"scores/{ALWAYS}"] = per_row
        return {ALWAYS: val, **generated}, grid, found


def gathered(values: dict[int, float], dist: Dist) -> dict[int, float]:
    """Every process's {item: value} on the main process ({} elsewhere)."""
    if dist.world == 1:
        return values
    parts: list = [None] * dist.world
    tdist.all_gather_object(parts, values)
    return {k: v for part in parts for k, v in part.items()} if dist.main else {}
