"""The denoiser: diffusers' PRXTransformer2DModel, its blocks run by us so factors can act between them.

`Denoiser.forward` is diffusers' forward written out (embed → blocks → final layer) with
hook points around every block. Recipe factors (REPA, token routing, …) are `Factor`
modules that read or rewrite the token state at those points; with no factors the output
equals `PRXTransformer2DModel.forward` exactly (tested). The PRX weights stay a plain
diffusers model (`save_pretrained` / `from_pretrained`); factor parameters live beside it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from trainer.identity import TRAINS, mark
from trainer.registry import Config

# One-line factories of the sizes we train; `context_in_dim` and `in_channels` come from the
# text encoder and the tokenizer.
PRESETS: dict[str, dict] = {
    # The study's PRX-1.2B (Photoroom/PRX configs/yamls/model/prx_small.yaml).
    "prx-1.2b": dict(
        hidden_size=1792, depth=16, num_heads=28, mlp_ratio=3.5, patch_size=2, axes_dim=(32, 32)
    ),
    # The pixel-space study's model (configs/yamls/model/prx_jit_32_small.yaml: prx_small with
    # in_channels 3, patch 32, bottleneck 256): each 32×32×3 patch (3072 values) is projected down to
    # 256 then up to the hidden size (JiT's bottleneck embedding), inside diffusers' own class.
    "prx-jit-32-small": dict(
        hidden_size=1792,
        depth=16,
        num_heads=28,
        mlp_ratio=3.5,
        patch_size=32,
        axes_dim=(32, 32),
        bottleneck_size=256,
    ),
    # CPU tests and the demo: same code path, seconds per hundred steps.
    "tiny": dict(hidden_size=64, depth=4, num_heads=4, mlp_ratio=2.0, patch_size=2, axes_dim=(8, 8)),
}


def _zero_final_layer(prx: nn.Module) -> None:
    """PRX's init (Photoroom/PRX prx/models/prx_layers.py `LastLayer`): the final adaLN modulation and
    the output linear start at exactly zero, so the untrained net predicts 0 and its first updates
    come from the output layer alone. Every other layer is initialised the same way in PRX and in
    diffusers' class (each block's adaLN modulation is zero in both, the rest is PyTorch's default),
    so this is the whole difference; it draws no random numbers, so the rest stays bit-identical."""
    final = prx.final_layer
    for linear in (final.adaLN_modulation[1], final.linear):
        nn.init.zeros_(linear.weight)  # adaLN (2C, C), output (p²·C_in, C)
        nn.init.zeros_(linear.bias)


# `model.init`: how a fresh denoiser's weights start (a resumed run loads its checkpoint instead).
INITS = {
    "prx": _zero_final_layer,  # the study's
    "diffusers": lambda prx: None,  # PRXTransformer2DModel's own: the final layer is PyTorch-default random
}


class ModelConfig(Config):
    preset: str | None = Field(
        "tiny", description=f"named size: {', '.join(PRESETS)}; fields below override it"
    )
    hidden_size: int | None = Field(None, ge=8, description="token width")
    depth: int | None = Field(None, ge=1, description="number of PRX blocks")
    num_heads: int | None = Field(None, ge=1, description="attention heads")
    mlp_ratio: float | None = Field(None, gt=0, description="GeGLU hidden width / token width")
    patch_size: int | None = Field(None, ge=1, description="latent pixels per token side")
    axes_dim: tuple[int, int] | None = Field(None, description="RoPE dims per axis; must sum to the head dim")
    bottleneck_size: int | None = Field(None, ge=1, description="two-layer patch embedding (pixel-space PRX)")
    in_channels: int | None = Field(None, ge=1, description="leave unset: follows the tokenizer")
    init: Literal[tuple(INITS)] = Field(
        "prx",
        description="prx: final layer zero-initialised as PRX does; diffusers: the class's own init",
        # added after hashes existed: the class's own init was the only one before
        json_schema_extra=mark(TRAINS, neutral="diffusers"),
    )

    @model_validator(mode="after")
    def _check_sizes(self):
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown model preset {self.preset!r}; valid: {', '.join(PRESETS)}")
        s = self.sizes()
        missing = [k for k in PRESETS["tiny"] if s.get(k) is None]
        if missing:
            raise ValueError(f"model needs a preset or explicit {', '.join(missing)}")
        if s["hidden_size"] % s["num_heads"]:
            raise ValueError(f"hidden_size {s['hidden_size']} is not divisible by num_heads {s['num_heads']}")
        if sum(s["axes_dim"]) != s["hidden_size"] // s["num_heads"]:
            raise ValueError(
                f"axes_dim {list(s['axes_dim'])} must sum to the head dim "
                f"{s['hidden_size'] // s['num_heads']} (hidden_size / num_heads)"
            )
        return self

    def sizes(self) -> dict:
        """Preset values with explicit fields on top."""
        out = dict(PRESETS.get(self.preset or "", {}))
        for k in (
            "hidden_size",
            "depth",
            "num_heads",
            "mlp_ratio",
            "patch_size",
            "axes_dim",
            "bottleneck_size",
        ):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out

    def diffusers_kwargs(self, in_channels: int, context_in_dim: int) -> dict:
        s = self.sizes()
        return dict(
            in_channels=in_channels,
            patch_size=s["patch_size"],
            context_in_dim=context_in_dim,
            hidden_size=s["hidden_size"],
            mlp_ratio=s["mlp_ratio"],
            num_heads=s["num_heads"],
            depth=s["depth"],
            axes_dim=list(s["axes_dim"]),
            bottleneck_size=s.get("bottleneck_size"),
        )


@dataclass
class TokenState:
    """What flows between blocks. Factors may read and replace any field."""

    img: torch.Tensor  # (B, L, C) image tokens
    txt: torch.Tensor  # (B, Lt, C) projected text tokens (never updated by blocks)
    vec: torch.Tensor  # (B, C) timestep conditioning
    pe: torch.Tensor  # (B, 1, L, head_dim/2, 2, 2) RoPE of the current image tokens
    mask: torch.Tensor | None  # (B, Lt) text padding mask, True = keep
    grid: tuple[int, int]  # token grid (h, w) of the full image
    # extra batch inputs factors need: in training "images" (B, 3, H, W), "step" and "draws", the step's
    # per-sample random numbers (trainer/draws.py), the one source of randomness a factor may use
    inputs: dict = field(default_factory=dict)
    losses: dict = field(default_factory=dict)  # name → scalar auxiliary loss added by factors
    kept: torch.Tensor | None = (
        None  # (B, K) sorted indices of the image tokens `img` holds inside a token route
    )


class Factor(nn.Module):
    """A recipe factor acting inside the denoiser's forward. Every hook defaults to doing nothing."""

    # True when some train steps leave the factor's parameters without a gradient (REPA after
    # its stop_step): DDP must then be told to look for unused parameters.
    skips_params: bool = False

    def begin(self, state: TokenState) -> None: ...

    def before_block(self, index: int, state: TokenState) -> None: ...

    def after_block(self, index: int, state: TokenState) -> None: ...


class Stored(nn.Module):
    """A factor's module whose parameters keep a storage dtype of their own, whatever the denoiser is
    cast to (`Denoiser.to(device, precision.weights)`): PRX stores REPA's projector in bf16 beside fp32
    weights. Its gradients and the optimizer's state for it (made like its parameters) share that dtype,
    and its input is cast to it, so it runs with or without autocast. FSDP shards it as a unit of its own
    (trainer/runtime/parallel.py): FSDP holds one dtype per unit."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.module = module.to(dtype)

    def _apply(self, fn, recurse=True):  # every cast (.to, .float(), …) lands on `dtype`
        return super()._apply(lambda t: fn(t).to(self.dtype) if t.is_floating_point() else fn(t), recurse)

    def forward(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        return self.module(x.to(self.dtype), *args)


@dataclass(frozen=True)
class FactorContext:
    """What a factor's builder may know about the run it joins. No seed: a factor that draws random
    numbers takes them from the step's per-sample draws (`TokenState.inputs["draws"]`, trainer/draws.py)."""

    hidden_size: int
    depth: int
    patch_size: int
    resolution: int  # image side in pixels
    downsample: int  # image pixels per latent pixel (tokenizer)
    device: torch.device
    weights_dir: str | None = None
    data: Any = None  # the data config (a domain's own teacher renders the domain)
    cache_dir: str | None = None  # where networks trained on first use are kept (the eval cache)

    @property
    def grid(self) -> int:
        """Token grid side: pixels per token = downsample · patch_size."""
        return self.resolution // (self.downsample * self.patch_size)


@dataclass
class DenoiserOutput:
    pred: torch.Tensor  # (B, C, H, W), same layout as the input
    losses: dict  # auxiliary losses from factors, already weighted


class Denoiser(nn.Module):
    """PRX transformer plus the modules recipe factors add (REPA projector, SPRINT fusion, …)."""

    def __init__(self, prx: nn.Module, factors: list[Factor] | None = None):
        super().__init__()
        self.prx = prx
        self.factors = nn.ModuleList(factors or [])

    def place(self, device: torch.device, dtype: torch.dtype) -> Denoiser:
        """`.to(device, dtype)`; a PRX still on the meta device (built to be sharded, `DeferredPRX`) takes
        only the dtype: its shards get memory on `device` once sharded."""
        if next(self.prx.parameters()).is_meta:
            self.factors.to(device, dtype)
            self.prx.to(dtype)
            return self
        return self.to(device, dtype)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        txt: torch.Tensor,
        mask: torch.Tensor | None,
        inputs: dict | None = None,
    ) -> DenoiserOutput:
        from diffusers.models.transformers.transformer_prx import get_image_ids, img2seq, seq2img

        prx, p = self.prx, self.prx.patch_size
        b, _, h, w = x.shape
        # (B, L, C), L = h·w / p²; img_in is Linear(p²·C_in → C), or p²·C_in → bottleneck → C (JiT)
        img = prx.img_in(img2seq(x, p))
        pe = prx.pe_embedder(get_image_ids(b, h, w, patch_size=p, device=x.device))  # (B, 1, L, hd/2, 2, 2)
        vec = prx._compute_timestep_embedding(t, dtype=img.dtype)  # (B, C)
        if prx.resolution_embedder is not None:
            size = (
                torch.full((b,), h, device=x.device, dtype=torch.float32),
                torch.full((b,), w, device=x.device, dtype=torch.float32),
            )
            vec = vec + prx.resolution_embedder(*size, dtype=vec.dtype)
        state = TokenState(
            img=img,
            txt=prx.txt_in(txt),
            vec=vec,
            pe=pe,
            mask=mask,
            grid=(h // p, w // p),
            inputs=inputs or {},
        )
        for f in self.factors:
            f.begin(state)
        for i, block in enumerate(prx.blocks):
            for f in self.factors:
                f.before_block(i, state)
            state.img = block(
                hidden_states=state.img,
                encoder_hidden_states=state.txt,
                temb=state.vec,
                image_rotary_emb=state.pe,
                attention_mask=state.mask,
            )  # (B, L', C)
            for f in self.factors:
                f.after_block(i, state)
        out = prx.final_layer(state.img, state.vec)  # (B, L, p²·C_in); a factor may add to vec (resolution)
        return DenoiserOutput(pred=seq2img(out, p, x.shape), losses=state.losses)


def build_prx(cfg: ModelConfig, in_channels: int, context_in_dim: int) -> nn.Module:
    from diffusers import PRXTransformer2DModel

    _check_in_channels(cfg, in_channels)
    prx = PRXTransformer2DModel(**cfg.diffusers_kwargs(in_channels, context_in_dim))
    INITS[cfg.init](prx)
    return prx


def _check_in_channels(cfg: ModelConfig, in_channels: int) -> None:
    if cfg.in_channels is not None and cfg.in_channels != in_channels:
        raise ValueError(
            f"model.in_channels={cfg.in_channels} disagrees with the tokenizer's {in_channels} "
            "channels; remove model.in_channels (it follows the tokenizer)"
        )


def _ones(module: nn.Module) -> None:  # diffusers' RMSNorm: weight ones (bias zeros), no reset_parameters
    for name, p in module.named_parameters(recurse=False):
        nn.init.ones_(p) if name == "weight" else nn.init.zeros_(p)


def _constructed(prx: nn.Module) -> None:
    """What diffusers' PRX constructors set after their layers' own init, drawing no random numbers:
    each block's `Modulation` zeroes its linear (whose init drew first)."""
    from diffusers.models.transformers.transformer_prx import Modulation

    for module in prx.modules():
        if isinstance(module, Modulation):
            nn.init.zeros_(module.lin.weight)
            nn.init.zeros_(module.lin.bias)


class DeferredPRX:
    """A PRX built on the meta device (no memory) and what its whole build would have drawn, replayable
    one module at a time onto each process's shards (`parallel: fsdp`: no process holds the whole model).

    A whole build draws from the global CPU generator in the order the layers are made, each layer's
    `reset_parameters` at its construction, then the constructors' and `model.init`'s zeros. Building
    on meta draws nothing, so `build` runs each layer's init once on a CPU twin in that order (one layer
    in memory at a time), recording the generator's state before it: the generator ends where a whole
    build leaves it (the factors built next draw what they would), and `materialise` later replays each
    layer from its state in full shape and keeps this process's shard, so every parameter equals the
    whole build's bit for bit, at any number of processes. A layer whose init this does not know is an
    error, never a silent difference."""

    RESETS: dict[str, Any] = {"RMSNorm": _ones}  # layers without reset_parameters, by class name

    def __init__(self, prx: nn.Module, order: list[tuple[str, nn.Module]], init: str):
        self.prx, self.init = prx, init
        self.steps: list[tuple[str, nn.Module, torch.Tensor]] = []  # (name, meta twin, generator state)
        self.largest = 0  # bytes: the largest layer held whole at once
        for name, module in order:
            if not hasattr(module, "reset_parameters") and type(module).__name__ not in self.RESETS:
                raise RuntimeError(f"PRX layer {name} ({type(module).__name__}) has no known init: "
                                   "meta-device init cannot reproduce it")  # fmt: skip
            twin = copy.deepcopy(module)  # on meta: costs nothing; the live layer is sharded later
            self.steps.append((name, twin, torch.get_rng_state()))
            self._draw(twin)  # advances the generator as the whole build did

    @classmethod
    def build(cls, cfg: ModelConfig, in_channels: int, context_in_dim: int) -> DeferredPRX:
        from diffusers import PRXTransformer2DModel

        _check_in_channels(cfg, in_channels)
        made: list[nn.Module] = []  # layers in the order their first parameter was made
        hook = torch.nn.modules.module.register_module_parameter_registration_hook(
            lambda module, name, param: None if any(m is module for m in made) else made.append(module)
        )
        try:
            with torch.device("meta"):
                prx = PRXTransformer2DModel(**cfg.diffusers_kwargs(in_channels, context_in_dim))
        finally:
            hook.remove()
        if any(True for _ in prx.buffers()):
            raise RuntimeError("PRX has buffers: meta-device init would leave them uninitialised")
        names = {id(m): n for n, m in prx.named_modules()}
        return cls(prx, [(names[id(m)], m) for m in made], cfg.init)

    def _draw(self, twin: nn.Module) -> dict[str, torch.Tensor]:
        """The layer's init in full shape on the CPU (fp32, as built), from the generator as it stands."""
        twin.to_empty(device="cpu", recurse=False)
        with torch.no_grad():
            if hasattr(twin, "reset_parameters"):
                twin.reset_parameters()
            else:
                self.RESETS[type(twin).__name__](twin)
        full = {k: p.detach() for k, p in twin.named_parameters(recurse=False)}
        self.largest = max(self.largest, sum(p.numel() * p.element_size() for p in full.values()))
        twin.to_empty(
            device="meta", recurse=False
        )  # the twin lets go; `full` lives until the caller drops it
        return full

    def materialise(self, device: torch.device) -> None:
        """Give every meta parameter of the PRX (sharded by now, or whole) its value on `device`: each
        layer replayed from its recorded generator state, this process's shard cut from it (no
        communication), then the constructors' zeros and `model.init`. The global generator is left as
        it was."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for name, twin, state in self.steps:
                live = self.prx.get_submodule(name)
                live.to_empty(device=device, recurse=False)
                torch.set_rng_state(state)
                for key, full in self._draw(twin).items():
                    param = getattr(live, key)
                    if isinstance(param, DTensor):
                        mine = distribute_tensor(full.to(param.device), param.device_mesh, param.placements,
                                                 src_data_rank=None)  # fmt: skip
                        param.to_local().copy_(mine.to_local())
                    else:
                        param.copy_(full)
            _constructed(self.prx)
            INITS[self.init](self.prx)
