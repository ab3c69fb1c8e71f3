"""The trainer's config: one small config per component, assembled here.

Components chosen by `kind` come from their registries (`DATA`, `TEXT`, …); `None` turns
an optional factor off. Unknown keys are rejected everywhere. A config validates without
any weights, so a sweep can be checked on a laptop.

Rules that span components read facts the component configs declare (`domain` of the data,
`name_patterns()` of the optimizer, `implies_routed_alignment` of a route, `needs_full_grid`
of an alignment loss), never their kind strings: a new kind states its facts when it registers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, create_model, model_validator

from eval.metrics import METRICS
from trainer.data.cache import CacheConfig, Encoded
from trainer.data.datasets import DATA
from trainer.evaluation import EvalConfig
from trainer.factors.contrastive import CONTRASTIVE
from trainer.factors.ema import EMA
from trainer.factors.optimizer import OPTIMIZERS
from trainer.factors.perceptual import LPIPS, PERCEPTUAL_DINO
from trainer.factors.precision import PRECISION
from trainer.factors.repa import REPA
from trainer.factors.resolution import RESOLUTION
from trainer.factors.routing import ROUTING
from trainer.factors.text import TEXT
from trainer.factors.tokenizer import TOKENIZERS
from trainer.flow import FlowConfig
from trainer.identity import EVALUATES, NUMERICS, RUNS, TRAINS, Identity, mark
from trainer.identity import identity as identity_of
from trainer.model import ModelConfig
from trainer.recorder import LogConfig
from trainer.registry import Config, Registry
from trainer.runtime.checkpoint import CheckpointConfig
from trainer.runtime.parallel import PARALLEL, DDPConfig


class TrainSection(Config):
    steps: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(16, ge=1, description="global batch, split evenly over processes")
    warmup_steps: int = Field(0, ge=0, description="linear LR warm-up steps, then constant")
    grad_clip: float | None = Field(1.0, gt=0, description="clip the global grad norm to this; null = off")
    caption_dropout: float = Field(0.1, ge=0, le=1, description="share of captions replaced by the empty one")
    # How the steps run, not what they compute: execution (trainer/identity.py).
    num_workers: int = Field(
        0, ge=0, description="data loader worker processes", json_schema_extra=mark(RUNS)
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads per process (torch.set_num_threads)",
        json_schema_extra=mark(RUNS),
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="torch.compile each PRX block and prefer cuDNN attention in the train step "
        "(trainer/runtime/compile.py); auto = on for CUDA, off on CPU",
        json_schema_extra=mark(RUNS),
    )
    activation_checkpointing: bool = Field(
        False,
        description="recompute each PRX block's activations in backward instead of keeping them: less "
        "memory, about one more block forward per step (trainer/runtime/compile.py)",
        json_schema_extra=mark(RUNS),
    )
    micro_batch_size: int | None = Field(
        None,
        ge=1,
        description="rows per forward and backward on one process; the per-process batch is split into "
        "micro-batches whose gradients add up before one optimizer step (gradient sync on the last only); "
        "must divide train.batch_size / processes; null = the whole per-process batch at once",
        json_schema_extra=mark(RUNS),
    )
    collective_timeout_s: float = Field(
        600,
        gt=0,
        description="how long a collective (all-reduce, barrier) waits for the other processes before "
        "the job fails (torch.distributed's timeout)",
        json_schema_extra=mark(RUNS),
    )
    collective_timeout_long_s: float = Field(
        1800,
        gt=0,
        description="the same, where the processes wait for phases only the main one runs: writing a "
        "checkpoint, verifying one on resume, computing the metrics (the first eval's reference features)",
        json_schema_extra=mark(RUNS),
    )


@dataclass(frozen=True)
class Component:
    """A config key chosen by `kind:`, and the registry whose entries it names."""

    key: str
    registry: Registry
    doc: str
    optional: bool = False
    """null turns it off: the one way to say so"""
    joins: str | None = None
    """where a recipe factor that is on joins the trainer: "denoiser" (hooks around the denoiser's blocks,
    in table order), "loss" (a term added to the flow-matching loss) or "weights" (the EMA evaluation
    uses); None for the components the trainer builds by name (data, optimizer, ...)"""
    default: Any = None
    role: str = TRAINS
    """what the component is to the arm's identity (trainer/identity.py); its fields inherit it"""

    def field(self) -> tuple[Any, Any]:
        """(annotation, Field) of its TrainConfig field. An optional factor that is off is neutral: a factor
        added later leaves the hash of configs from before it unchanged while it is off."""
        doc = f"{self.doc} (kind: {', '.join(self.registry.kinds)})"
        if self.optional:
            off = Field(
                None, description=f"{doc}; null = off", json_schema_extra=mark(self.role, neutral=None)
            )
            return Optional[self.registry.union()], off  # noqa: UP045
        if self.default is not None:
            return self.registry.union(), Field(
                self.default, description=doc, json_schema_extra=mark(self.role)
            )
        return self.registry.union(), Field(description=doc, json_schema_extra=mark(self.role))


# Every config key chosen by `kind:`, in one table: TrainConfig's component fields, the registries a sweep
# error lists, the denoiser's block hooks, the loss terms and the EMA all come from here. A new factor is
# one entry (and its module's registry).
COMPONENTS: tuple[Component, ...] = (
    Component("data", DATA, "training data"),
    Component("text_encoder", TEXT, "caption encoder"),
    Component("tokenizer", TOKENIZERS, "image tokenizer"),
    Component("optimizer", OPTIMIZERS, "optimizer"),
    Component("precision", PRECISION, "weight precision"),
    # Execution: the layout changes rounding only (reduction order; FSDP's bf16 gathers under bf16 autocast,
    # where the matmuls are bf16 anyway), as the world size the launcher sets does.
    Component(
        "parallel", PARALLEL, "how the denoiser is spread over processes", default=DDPConfig(), role=RUNS
    ),
    Component("ema", EMA, "EMA of the weights, used for evaluation", optional=True, joins="weights"),
    Component("contrastive", CONTRASTIVE, "contrastive flow-matching term", optional=True, joins="loss"),
    # routing before repa: inside a route, later hooks see the kept tokens (state.kept)
    Component("routing", ROUTING, "token routing around middle blocks", optional=True, joins="denoiser"),
    Component(
        "repa", REPA, "representation alignment with a frozen teacher", optional=True, joins="denoiser"
    ),
    Component(
        "resolution_aware",
        RESOLUTION,
        "the input's height and width as two extra text tokens or added to the timestep vector",
        optional=True,
        joins="denoiser",
    ),
    Component(
        "lpips",
        LPIPS,
        "LPIPS between the predicted clean image and the real one",
        optional=True,
        joins="loss",
    ),
    Component(
        "perceptual_dino",
        PERCEPTUAL_DINO,
        "1 − cos of DINO patch tokens of the predicted clean image and the real one",
        optional=True,
        joins="loss",
    ),
)


def _registries() -> dict[str, Registry]:
    out: dict[str, Registry] = {}
    for c in COMPONENTS:
        out[c.key] = c.registry
        out.update({f"{c.key}.{name}": nested for name, nested in c.registry.nested.items()})
    return out


REGISTRIES: dict[str, Registry] = _registries()
"""Dotted config path → its registry (nested ones, like repa.teacher, included)."""


class _Sections(Config):
    """The sections every config has; TrainConfig adds a field per component of the table.

    Each field's role in the arm's identity (trains, unless marked; runs; evaluates) is declared here or
    where its section defines it: trainer/identity.py says what each means and the rule for new fields."""

    seed: int = Field(0, description="the arm's seed: init, data order, noise")
    weights_dir: str | None = Field(
        None,
        description="pretrained weights (an HF cache folder filled by "
        "`ablate weights download`); null = the default HF cache",
        json_schema_extra=mark(RUNS),  # where the same weights are read from
    )
    model: ModelConfig = ModelConfig()
    flow: FlowConfig = FlowConfig()
    train: TrainSection = TrainSection()
    # when and how many checkpoints are kept; a save neither reads nor draws from the training RNG
    checkpoint: CheckpointConfig = Field(CheckpointConfig(), json_schema_extra=mark(RUNS))
    log: LogConfig = Field(LogConfig(), json_schema_extra=mark(RUNS))  # how the arm reports
    # Scoring only: evaluation draws from its own generators (fixed prompt and held-out seeds), never the
    # training's, and leaves the weights, the optimizer and the data order as they were.
    eval: EvalConfig = Field(EvalConfig(), json_schema_extra=mark(EVALUATES))
    cache: CacheConfig | None = Field(
        None,
        description="read latents and caption embeddings precomputed by "
        "`ablate cache SWEEP`; null = encode each step",
        json_schema_extra=mark(RUNS),  # the same latents and embeddings, up to the encoders' rounding
    )

    def encoded(self, tokenizer_cache: str | Path | None = None) -> Encoded:
        """What the latent and caption-embedding cache is made from: only these sub-configs reach it.
        `tokenizer_cache`: where a domain-trained tokenizer keeps itself unless eval.cache_dir says."""
        return Encoded(self.data, self.eval.caption, self.tokenizer, self.text_encoder,
                       self.eval.cache_dir or tokenizer_cache)  # fmt: skip

    @model_validator(mode="after")
    def _optimizer_patterns_match(self):
        """Name patterns of optimizer groups (Muon's) are checked against the real parameter names
        of the denoiser, built on the meta device: no memory, no weights, a second or two."""
        groups = self.optimizer.name_patterns()
        if not any(groups.values()):
            return self
        import fnmatch

        import torch
        from diffusers import PRXTransformer2DModel

        with torch.device("meta"):
            prx = PRXTransformer2DModel(
                **self.model.diffusers_kwargs(self.tokenizer.channels, self.text_encoder.dim)
            )
        names = [f"prx.{n}" for n, p in prx.named_parameters() if p.ndim == 2]
        for key, patterns in groups.items():
            dead = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
            if dead:
                example = next(n for n in names if n.startswith("prx.blocks."))
                raise ValueError(
                    f"optimizer.{key} {dead} match no 2-D parameter of the model; names look like "
                    f"{example!r}, e.g. use 'prx.blocks.*'"
                )
        return self

    def world_problems(self, world: int, per_node: int) -> list[tuple[tuple[str, ...], str, str]]:
        """What this config cannot do on `world` processes, `per_node` to a node (the launcher's
        nodes × tasks_per_node): (key path, problem, expected). `ablate run` checks it before it
        submits; the trainer checks the same at start-up for jobs started another way."""
        out, batch = [], self.train.batch_size
        if batch % world:
            out.append((("train", "batch_size"),
                        f"train.batch_size {batch} does not split evenly over {world} processes",
                        f"a multiple of {world}"))  # fmt: skip
        out += [(("parallel", key), problem, expected)
                for key, problem, expected in self.parallel.world_problems(world, per_node)]  # fmt: skip
        if batch % world:
            return out
        per_process, micro = batch // world, self.train.micro_batch_size
        if micro is not None and per_process % micro:
            out.append((("train", "micro_batch_size"),
                        f"train.micro_batch_size {micro} does not divide the per-process batch {per_process} "
                        f"(train.batch_size {batch} over {world} processes)",
                        f"a divisor of {per_process}"))  # fmt: skip
            return out
        rows = micro or per_process  # what one forward holds
        for key, group in self.batch_groups().items():  # samples one forward must hold together
            if rows % group:
                part = (
                    f"the micro-batch {rows} (train.micro_batch_size)"
                    if micro
                    else f"the per-process batch {rows} (train.batch_size {batch} over {world} processes)"
                )
                out.append(((key, "group"),
                            f"{key}.group {group} does not divide {part}, so its groups would span "
                            f"{'micro-batches' if micro else 'processes'}", f"a divisor of {rows}"))  # fmt: skip
        return out

    def batch_groups(self) -> dict[str, int]:
        """Config key → the group of consecutive samples (by global index) that component needs on one
        process, for every component that is on and states a `batch_group` (contrastive negatives)."""
        parts = {c.key: getattr(self, c.key, None) for c in COMPONENTS}
        return {key: part.batch_group for key, part in parts.items() if getattr(part, "batch_group", None)}

    @model_validator(mode="after")
    def _domain_metrics_need_the_domain(self):
        foreign = [m for m in self.eval.metrics if METRICS[m].domain not in (None, self.data.domain)]
        if foreign:
            raise ValueError(
                f"eval.metrics {foreign} score the {METRICS[foreign[0]].domain} demo domain, but "
                f"data.kind {self.data.kind!r} is not of it; use fid, cmmd, dino_mmd"
            )
        return self

    @model_validator(mode="after")
    def _check_batch(self):
        if self.model.in_channels is not None and self.model.in_channels != self.tokenizer.channels:
            raise ValueError(
                f"model.in_channels={self.model.in_channels} disagrees with tokenizer "
                f"{self.tokenizer.kind!r} ({self.tokenizer.channels} channels); "
                "remove model.in_channels, it follows the tokenizer"
            )
        return self

    @model_validator(mode="after")
    def _buckets_fit_the_tokens_and_the_cache(self):
        buckets = self.data.train_buckets() if hasattr(self.data, "train_buckets") else None
        if buckets is None:
            return self
        if self.cache is not None and self.tokenizer.caches_latents:
            raise ValueError(
                f"data.buckets: prx with cache: tokenizer {self.tokenizer.kind!r}'s latents are cached at one "
                "square shape, not per aspect-ratio bucket; set cache: null (encode each step) or data.buckets: "
                "square"
            )
        per_token = self.tokenizer.downsample * self.model.sizes()["patch_size"]
        if any(side % per_token for hw in buckets for side in hw):
            raise ValueError(
                f"data.bucket_px {self.data.bucket_px} is not a multiple of the model's {per_token} px per token "
                "(tokenizer downsample × model patch_size), so a bucket's sides would not fall on whole tokens; "
                f"use a bucket_px divisible by {per_token}"
            )
        return self

    def _trained_on_the_data(self, key: str, component, instead: str) -> None:
        domain = component.needs_domain
        if domain not in (None, self.data.domain):
            raise ValueError(
                f"{key} {component.kind!r} is trained on the {domain} domain, but data.kind "
                f"{self.data.kind!r} is not of it; use {instead}"
            )

    @model_validator(mode="after")
    def _domain_tokenizer_needs_the_domain(self):
        self._trained_on_the_data("tokenizer", self.tokenizer, "a pretrained tokenizer (pixel, flux-vae, …)")
        if self.perceptual_dino is not None:
            self._trained_on_the_data("perceptual_dino.encoder", self.perceptual_dino.encoder,
                                      "a pretrained encoder (dinov2-*, dinov3-*)")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _check_routing_and_repa(self):
        depth = self.model.sizes()["depth"]
        route = self.routing
        if route is not None and route.end > depth:
            raise ValueError(
                f"routing blocks [{route.start}, {route.end}) exceed the model's {depth} blocks; "
                f"set routing.end ≤ {depth} (blocks are 0-based, end exclusive)"
            )
        repa = self.repa
        if repa is None:
            return self
        self._trained_on_the_data("repa.teacher", repa.teacher, "a pretrained teacher (dinov2-*, dinov3-*)")
        if repa.block >= depth:
            raise ValueError(
                f"repa.block {repa.block} is outside the model's blocks 0..{depth - 1}; "
                f"set repa.block < {depth}"
            )
        hidden = self.model.sizes()["hidden_size"]
        if hidden % repa.hidden_multiple:
            raise ValueError(
                f"model.hidden_size {hidden} is not a multiple of {repa.hidden_multiple}, which the "
                f"{repa.kind} projector needs (heads × 2-D RoPE dims); use a hidden_size divisible by it"
            )
        per_token = self.tokenizer.downsample * self.model.sizes()["patch_size"]
        if self.data.resolution % per_token:
            raise ValueError(
                f"data.resolution {self.data.resolution} is not a multiple of the model's "
                f"{per_token} px per token (tokenizer downsample × model patch_size), so the "
                f"teacher's {repa.teacher.patch_size}-px patch grid cannot match the token grid; "
                f"use a resolution divisible by {per_token}"
            )
        # After block end-1 the route has rejoined: the hidden state there is the full sequence again.
        routed = route is not None and route.start <= repa.block < route.end - 1
        if repa.needs_full_grid and routed:
            raise ValueError(
                f"repa.block {repa.block} lies inside routing blocks [{route.start}, {route.end}) "
                f"where only kept tokens exist, but {repa.kind}'s conv projector needs the full token "
                f"grid; move repa.block below {route.start} or to {route.end - 1} or later"
            )
        if routed and not route.implies_routed_alignment and repa.routed_target is None:
            raise ValueError(
                f"repa.block {repa.block} lies inside the {route.kind} route [{route.start}, {route.end}) "
                f"where {route.keep:.0%} of the tokens remain; set repa.routed_target: gather to "
                f"align only those tokens, or move repa.block below {route.start} or to "
                f"{route.end - 1} or later"
            )
        if repa.routed_target is not None and not routed:
            raise ValueError(
                f"repa.routed_target is set but repa.block {repa.block} is not inside a token "
                "route (routing.start ≤ block < routing.end - 1); remove repa.routed_target"
            )
        return self


TrainConfig = create_model(
    "TrainConfig",
    __base__=_Sections,
    __doc__="An arm's whole config: the sections, then one field per component of the table.",
    __module__=__name__,
    **{c.key: c.field() for c in COMPONENTS},
)


def build_factors(cfg: Any, joins: str, *args: Any) -> list[Any]:
    """What the recipe factors that join `joins` build, in table order. A factor that is null is off:
    nothing is built for it, so the trainer never asks whether one is on."""
    on = [c for c in COMPONENTS if c.joins == joins and getattr(cfg, c.key) is not None]
    return [c.registry.build(getattr(cfg, c.key), *args) for c in on]


def describe_registries() -> dict[str, list[str]]:
    """Dotted config path → the valid `kind` names there."""
    return {path: reg.kinds for path, reg in REGISTRIES.items()}


def load(path) -> TrainConfig:
    """A resolved config from its YAML file (a run directory's config.yaml)."""
    import yaml

    with open(path, encoding="utf-8") as f:
        return TrainConfig.model_validate(yaml.safe_load(f))


def identity(config: dict[str, Any], numerics: int = NUMERICS) -> Identity:
    """A resolved config's identity (or part of one, e.g. an old config.yaml): the hash of what it trains,
    by the trainer's `numerics` (today's, or the one an older arm trained by), the hash of how it is
    scored, and its parts by role, as this schema's marks declare them."""
    return identity_of(TrainConfig, config, numerics)
