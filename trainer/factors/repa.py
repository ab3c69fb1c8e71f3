"""REPA (arXiv 2410.06940) and iREPA (arXiv 2512.10794): align a hidden state with a frozen ViT teacher.

After block `block` (0-based, as PRX's `blocks[7]`: the 8th of 16 blocks) a trainable projector
maps the image tokens h (B, L, C) to the teacher's width, and the loss

    repa = −weight · mean over samples and tokens of cos(proj(h), y)

is added to the flow-matching loss, y (B, L, Dt) being the teacher's patch tokens of the clean
image (its final normed output, CLS and register tokens stripped). The teacher sees the image
resized (bicubic) to token grid × teacher patch, so its token grid equals the denoiser's: 224 px
for DINOv2 and 256 px for DINOv3 at the study's 256 px with 16 px per token. ImageNet normalisation.

- `repa`: projector Linear(C→D)–SiLU–Linear(D→D)–SiLU–Linear(D→Dt), D = `projector_dim`
  (default the teacher width Dt, as PRX).
- `irepa`: the target is spatially normalised per sample and channel over tokens,
  y ← y − γ·mean_tokens(y), then y ← y / (std_tokens(y) + 1e-6) (unbiased std, as PRX), and the
  projector sees the token layout. Two variants of each part, because the iREPA paper (and the
  study's blog) and PRX's committed code differ:
  - `projector: conv` (the paper): Conv2d(C→Dt, 3×3, padding 1) on the token grid;
    `projector: attention` (PRX's `AttentionProjector`, its iREPA default): 4-head self-attention
    over the tokens with 2-D RoPE of their grid positions, then Linear(C→Dt).
  - `target_norm: alpha` (the paper): γ = α, a scalar; 0.6 for latent models (reference iREPA's LDM
    setting), 0.8 for pixel space (its JiT setting). `target_norm: per-token-mean` (PRX's code):
    γ = each token's mean over channels, (B, L, 1).

Inside a token route (trainer/factors/routing.py) the hidden state holds only the kept tokens
(`state.kept`); the target is gathered to the same tokens. TREAD's route implies it (as PRX);
in a SPRINT route, where 75 % of the tokens are gone, it must be asked for with
`routed_target: gather` (checked in TrainConfig). iREPA's conv needs the whole grid, so its block
must lie outside any route; the attention projector takes any subset of tokens (the positions come
from their indices), which is why PRX added it for TREAD.

`projector_dtype: bf16` stores the projector in bf16 whatever the denoiser's weights are, as PRX does
(its REPA/iREPA cast the projector `.to(torch.bfloat16)` before the optimizer is built; the same AdamW
then keeps its moments in bf16 and updates the weights in bf16, with no fp32 master copy). The
projector's input is cast to bf16 (what bf16 autocast does to a matmul's operands anyway). Left as
they were: PRX also runs its teacher in bf16 and takes the cosine of bf16 tensors; ours does both in fp32.

The teacher is frozen, in eval mode, run without grad, and kept out of the module tree: it is
neither a parameter nor in the factors' state dict, so checkpoints hold only the projector.
After `stop_step` (the study's advice: switch REPA off after ~200k steps) neither the teacher nor
the projector runs and no loss is added.
"""

from __future__ import annotations

from typing import ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, create_model, model_validator
from torch import nn

from core.weights import HFWeights, load_pretrained
from eval.domain import GRID_STRIDE
from eval.domain import WIDTH as ATTR_NET_WIDTH
from eval.metrics import SYNTHETIC_SHAPES
from trainer.factors.routing import gather_tokens
from trainer.identity import TRAINS, mark
from trainer.model import Factor, FactorContext, Stored, TokenState
from trainer.registry import Config, Registry

# `needs_domain`: the data domain a teacher is trained on (None: any images).
TEACHERS = Registry("teacher", facts=("needs_domain",))
REPA = Registry("repa", facts=("needs_full_grid",), nested={"teacher": TEACHERS})

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# iREPA's attention projector as PRX builds it (its defaults; no committed config changes them)
ATTENTION_HEADS = 4
ROPE_THETA = 10000


# -- teachers ------------------------------------------------------------------------------------
class TeacherSpec(NamedTuple):
    model_class: str  # transformers class
    repo_id: str
    patch_size: int
    width: int
    registers: int  # register tokens after CLS


HF_TEACHERS: dict[str, TeacherSpec] = {
    "dinov2-vitb14": TeacherSpec("Dinov2Model", "facebook/dinov2-base", 14, 768, 0),
    "dinov2-vitl14": TeacherSpec("Dinov2Model", "facebook/dinov2-large", 14, 1024, 0),
    "dinov2-vitb14-reg": TeacherSpec(
        "Dinov2WithRegistersModel", "facebook/dinov2-with-registers-base", 14, 768, 4
    ),
    # the study's REPA-V2 teacher (torch.hub dinov2_vitl14_reg)
    "dinov2-vitl14-reg": TeacherSpec(
        "Dinov2WithRegistersModel", "facebook/dinov2-with-registers-large", 14, 1024, 4
    ),
    "dinov3-vitb16": TeacherSpec("DINOv3ViTModel", "facebook/dinov3-vitb16-pretrain-lvd1689m", 16, 768, 4),
    # the study's REPA-V3 teacher (torch.hub dinov3_vitl16)
    "dinov3-vitl16": TeacherSpec("DINOv3ViTModel", "facebook/dinov3-vitl16-pretrain-lvd1689m", 16, 1024, 4),
}


class HFTeacherConfig(Config):
    """A pretrained teacher from the Hugging Face Hub; sizes are known without loading it."""

    needs_domain: ClassVar[str | None] = None

    @property
    def spec(self) -> TeacherSpec:
        return HF_TEACHERS[self.kind]  # type: ignore[attr-defined]

    @property
    def patch_size(self) -> int:
        return self.spec.patch_size

    @property
    def width(self) -> int:
        return self.spec.width

    def weights(self) -> list[HFWeights]:
        return [HFWeights(self.spec.repo_id)]


class TinyTeacherConfig(Config):
    needs_domain: ClassVar[str | None] = None
    kind: Literal["tiny"] = "tiny"
    width: int = Field(32, ge=8, description="token width")
    layers: int = Field(2, ge=1, description="transformer layers")
    heads: int = Field(2, ge=1, description="attention heads")
    patch_size: int = Field(2, ge=1, description="pixels per patch side")
    registers: int = Field(4, ge=0, description="register tokens after CLS (stripped like DINOv2-reg's)")
    seed: int = Field(0, description="init seed; keep it equal across arms")

    @model_validator(mode="after")
    def _check_heads(self):
        if self.width % self.heads:
            raise ValueError(
                f"repa.teacher.width {self.width} is not divisible by repa.teacher.heads {self.heads}"
            )
        return self


class Teacher(nn.Module):
    """Images (B, 3, H, W) in [0, 1] → patch tokens (B, h·w, Dt) on the denoiser's token grid (h, w)."""

    def __init__(self, model: nn.Module, patch_size: int, prefix: int):
        super().__init__()
        self.model, self.patch_size, self.prefix = model.eval().requires_grad_(False), patch_size, prefix
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # always eval: no dropout, no DINOv3 position jitter

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        size = (grid[0] * self.patch_size, grid[1] * self.patch_size)  # e.g. 16×14 = 224 for DINOv2
        x = F.interpolate(images.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
        return self.tokens(x)  # (B, h·w, Dt)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1], at a multiple of the patch → patch tokens (B, H·W/p², Dt), with
        gradients to the images (the perceptual DINO loss, trainer/factors/perceptual.py)."""
        x = (images - self.mean) / self.std  # (B, 3, H, W)
        tokens = self.model(pixel_values=x).last_hidden_state  # (B, prefix + H·W/p², Dt), final norm applied
        return tokens[:, self.prefix :].float()  # (B, H·W/p², Dt)


def build_hf_teacher(cfg: HFTeacherConfig, ctx: FactorContext) -> Teacher:
    import transformers

    spec = cfg.spec
    model = load_pretrained(getattr(transformers, spec.model_class), HFWeights(spec.repo_id), ctx.weights_dir)
    got = (model.config.patch_size, model.config.hidden_size, getattr(model.config, "num_register_tokens", 0))
    if got != (spec.patch_size, spec.width, spec.registers):
        raise ValueError(
            f"{spec.repo_id} has (patch, width, registers) {got}, expected "
            f"{(spec.patch_size, spec.width, spec.registers)} for teacher kind {cfg.kind!r}"
        )
    return Teacher(model, spec.patch_size, 1 + spec.registers).to(ctx.device)


for _kind in HF_TEACHERS:  # one config type per pretrained teacher, selected by its kind
    _name = "TeacherConfig_" + _kind.replace("-", "_")
    _cfg_type = create_model(
        _name, __base__=HFTeacherConfig, __module__=__name__, kind=(Literal[_kind], _kind)
    )
    TEACHERS.register(_cfg_type)(build_hf_teacher)


@TEACHERS.register(TinyTeacherConfig)
def build_tiny_teacher(cfg: TinyTeacherConfig, ctx: FactorContext) -> Teacher:
    """A seeded random-init DINOv2-with-registers: the CPU tests' and the demo's teacher, no download."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = Dinov2WithRegistersConfig(
        hidden_size=cfg.width,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=2 * cfg.width,
        patch_size=cfg.patch_size,
        image_size=ctx.grid * cfg.patch_size,
        num_register_tokens=cfg.registers,
    )
    with torch.random.fork_rng(devices=[]):  # leave the trainer's global RNG untouched
        torch.manual_seed(cfg.seed)
        model = Dinov2WithRegistersModel(config)
    return Teacher(model, cfg.patch_size, 1 + cfg.registers).to(ctx.device)


class DomainTeacherConfig(Config):
    """The synthetic domain's own attribute net as the teacher (its stride-4 conv features): the demo's
    DINOv2, trained on the domain once and cached, as the demo metrics' extractor is."""

    needs_domain: ClassVar[str | None] = SYNTHETIC_SHAPES
    kind: Literal["domain"] = "domain"

    @property
    def patch_size(self) -> int:
        return GRID_STRIDE

    @property
    def width(self) -> int:
        return 4 * ATTR_NET_WIDTH


class DomainTeacher(nn.Module):
    """Images (B, 3, H, W) in [0, 1] → the attribute net's grid features (B, h·w, C) on the token grid."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> DomainTeacher:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        size = (grid[0] * GRID_STRIDE, grid[1] * GRID_STRIDE)
        x = images.float()
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        return self.tokens(x)  # (B, h·w, C)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] → the grid features (B, h·w, C) at stride GRID_STRIDE, with gradients."""
        features = self.net.grid_features(images * 2 - 1)  # the net's input range [-1, 1]; (B, C, h, w)
        return features.flatten(2).transpose(1, 2)  # (B, h·w, C)


@TEACHERS.register(DomainTeacherConfig)
def build_domain_teacher(cfg: DomainTeacherConfig, ctx: FactorContext) -> DomainTeacher:
    from trainer.data.synthetic import attribute_net

    return DomainTeacher(attribute_net(ctx.data, ctx.cache_dir)).to(ctx.device)


# -- REPA / iREPA ----------------------------------------------------------------------------------
class AlignConfig(Config):
    # Whether the projector needs every token of the grid, so its block may not lie inside a token
    # route (trainer/factors/routing.py). Every alignment kind states it: a class attribute, or a property
    # where one of its fields decides it.
    needs_full_grid: ClassVar[bool]
    # The model's hidden_size must be a multiple of this for the projector to split it (TrainConfig).
    hidden_multiple: ClassVar[int] = 1
    teacher: TEACHERS.union() = Field(description="frozen teacher (kind: " + ", ".join(TEACHERS.kinds) + ")")
    block: int = Field(7, ge=0, description="align the hidden state after this block (0-based; PRX: 7 of 16)")
    weight: float = Field(0.5, gt=0, description="loss = −weight · mean cos(proj(h), y)")
    stop_step: int | None = Field(
        None, ge=1, description="steps ≥ this run no teacher, no projector, no loss; null = never stop"
    )
    routed_target: Literal["gather"] | None = Field(
        None,
        description="block inside a SPRINT route: gather = align only the kept tokens (TREAD implies it)",
    )
    projector_dtype: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="the projector's weights, gradients and optimizer state: fp32 = as the denoiser's "
        "weights (bf16 under precision bf16); bf16 = always bf16, as PRX stores and trains every projector",
        json_schema_extra=mark(TRAINS, neutral="fp32"),  # added after hashes existed: fp32 before
    )


class REPAConfig(AlignConfig):
    needs_full_grid: ClassVar[bool] = False  # a per-token MLP: any subset of tokens will do
    kind: Literal["repa"] = "repa"
    projector_dim: int | None = Field(None, ge=1, description="MLP hidden width (default: the teacher width)")


class IREPAConfig(AlignConfig):
    kind: Literal["irepa"] = "irepa"
    projector: Literal["conv", "attention"] = Field(
        "conv",
        description="conv = 3×3 conv on the token grid (the iREPA paper); attention = PRX's code: "
        f"{ATTENTION_HEADS}-head self-attention with 2-D RoPE, then Linear; it also runs inside a token route",
        json_schema_extra=mark(TRAINS, neutral="conv"),  # added after hashes existed: conv before
    )
    target_norm: Literal["alpha", "per-token-mean"] = Field(
        "alpha",
        description="teacher tokens y ← (y − γ·mean_tokens(y)) / std_tokens: alpha = γ is the scalar "
        "`alpha` (the iREPA paper); per-token-mean = γ is each token's channel mean (PRX's code)",
        json_schema_extra=mark(TRAINS, neutral="alpha"),  # added after hashes existed: alpha before
    )
    alpha: float = Field(0.6, ge=0, le=1, description="γ of target_norm alpha: 0.6 latent, 0.8 pixel space")

    @property
    def needs_full_grid(self) -> bool:  # a 3×3 conv reads grid neighbours; attention takes any tokens
        return self.projector == "conv"

    @property
    def hidden_multiple(self) -> int:  # attention: heads × (2 axes × an even number of RoPE dims)
        return ATTENTION_HEADS * 4 if self.projector == "attention" else 1

    @model_validator(mode="after")
    def _alpha_only_with_alpha_norm(self):
        # the default passes: a resolved config (every field written out) must validate again
        if self.target_norm != "alpha" and self.alpha != type(self).model_fields["alpha"].default:
            raise ValueError(
                f"repa.alpha is unused with repa.target_norm {self.target_norm!r} (γ is then each "
                "token's channel mean); remove repa.alpha or set repa.target_norm: alpha"
            )
        return self


def mlp_projector(width: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out)
    )


class ConvProjector(nn.Module):
    """3×3 conv over the token grid: (B, L, C) → (B, L, Dt), L = h·w."""

    def __init__(self, width: int, out: int):
        super().__init__()
        self.conv = nn.Conv2d(width, out, kernel_size=3, padding=1)

    def forward(self, h: torch.Tensor, kept: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor:
        assert kept is None, "needs_full_grid: TrainConfig rejects a block inside a route"
        x = h.transpose(1, 2).unflatten(2, grid)  # (B, C, h, w)
        return self.conv(x).flatten(2).transpose(1, 2)  # (B, L, Dt)


class AttentionProjector(nn.Module):
    """PRX's iREPA projector: self-attention over the tokens it is given, queries and keys rotated by
    2-D RoPE of each token's (row, col) on the full grid, then Linear(C→Dt): (B, K, C) → (B, K, Dt).

    The positions come from the token indices (`kept` inside a route, all L tokens outside), so a
    route's kept subset attends among itself at its true positions. The head dim is split in two
    halves, rows then columns, as the denoiser's own RoPE with axes_dim (Dh/2, Dh/2): diffusers'
    PRX helpers compute it. Module names follow PRX's (q_proj, k_proj, v_proj, out_proj, output)."""

    def __init__(self, width: int, out: int, heads: int = ATTENTION_HEADS, theta: int = ROPE_THETA):
        from diffusers.models.transformers.transformer_prx import PRXEmbedND

        super().__init__()
        self.heads, head_dim = heads, width // heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))
        self.output = nn.Linear(width, out)
        self.rope = PRXEmbedND(dim=head_dim, theta=theta, axes_dim=[head_dim // 2, head_dim // 2])

    def forward(self, h: torch.Tensor, kept: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor:
        from diffusers.models.transformers.transformer_prx import apply_rope

        b, k, c = h.shape
        idx = torch.arange(k, device=h.device).expand(b, k) if kept is None else kept  # (B, K)
        pe = self.rope(torch.stack([idx // grid[1], idx % grid[1]], dim=-1).float())  # (B, 1, K, Dh/2, 2, 2)
        q, key, v = (
            p(h).view(b, k, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        attn = F.scaled_dot_product_attention(apply_rope(q, pe), apply_rope(key, pe), v)  # (B, H, K, Dh)
        return self.output(self.out_proj(attn.transpose(1, 2).reshape(b, k, c)))  # (B, K, Dt)


PROJECTORS = {"conv": ConvProjector, "attention": AttentionProjector}


def stored(projector: nn.Module, cfg: AlignConfig) -> nn.Module:
    """The projector in its `projector_dtype`: fp32 follows the denoiser's weights, bf16 stays bf16."""
    return projector if cfg.projector_dtype == "fp32" else Stored(projector, torch.bfloat16)


def spatial_norm(y: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
    """iREPA's target normalisation over tokens, per sample and channel: y (B, L, D) → (B, L, D).

    y ← y − γ·mean_tokens(y), then y ← y / (std_tokens(y) + 1e-6). γ is the scalar α (the paper) or
    (B, L, 1), each token's channel mean (PRX); a γ that varies over tokens changes the std, which
    PRX takes of the shifted tokens, as here.
    """
    y = y - gamma * y.mean(dim=1, keepdim=True)
    return y / (y.std(dim=1, keepdim=True) + 1e-6)


class REPAFactor(Factor):
    """Adds `losses["repa"]` after block `block` in training, until `stop_step`."""

    def __init__(self, cfg: AlignConfig, teacher: Teacher, projector: nn.Module):
        super().__init__()
        self.block, self.weight, self.stop_step = cfg.block, cfg.weight, cfg.stop_step
        self.projector = projector
        self.skips_params = cfg.stop_step is not None  # the projector gets no gradient after stop_step
        object.__setattr__(
            self, "teacher", teacher
        )  # not a submodule: no params, no state dict, no .to()/.train()

    def active(self, state: TokenState) -> bool:
        step = state.inputs.get("step")
        return self.training and (self.stop_step is None or step is None or step < self.stop_step)

    def after_block(self, index: int, state: TokenState) -> None:
        if index != self.block or not self.active(state):
            return
        target = self.target(self.teacher(state.inputs["images"], state.grid))  # (B, L, Dt)
        if state.kept is not None:  # inside a token route: the tokens the block saw
            target = gather_tokens(target, state.kept)  # (B, K, Dt)
        pred = self.project(state.img, state)  # (B, K, Dt)
        cos = F.cosine_similarity(pred.float(), target, dim=-1, eps=1e-8)  # (B, K)
        state.losses["repa"] = -self.weight * cos.mean()

    def target(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def project(self, h: torch.Tensor, state: TokenState) -> torch.Tensor:
        return self.projector(h)


class IREPAFactor(REPAFactor):
    def __init__(self, cfg: IREPAConfig, teacher: Teacher, projector: nn.Module):
        super().__init__(cfg, teacher, projector)
        self.alpha = cfg.alpha if cfg.target_norm == "alpha" else None  # None: PRX's per-token γ

    def target(self, y: torch.Tensor) -> torch.Tensor:
        gamma = y.mean(dim=2, keepdim=True) if self.alpha is None else self.alpha  # (B, L, 1) or scalar
        return spatial_norm(y, gamma)

    def project(self, h: torch.Tensor, state: TokenState) -> torch.Tensor:
        return self.projector(h, state.kept, state.grid)


@REPA.register(REPAConfig)
def build_repa(cfg: REPAConfig, ctx: FactorContext) -> REPAFactor:
    dt = cfg.teacher.width
    projector = stored(mlp_projector(ctx.hidden_size, cfg.projector_dim or dt, dt), cfg)
    return REPAFactor(cfg, TEACHERS.build(cfg.teacher, ctx), projector)


@REPA.register(IREPAConfig)
def build_irepa(cfg: IREPAConfig, ctx: FactorContext) -> IREPAFactor:
    projector = stored(PROJECTORS[cfg.projector](ctx.hidden_size, cfg.teacher.width), cfg)
    return IREPAFactor(cfg, TEACHERS.build(cfg.teacher, ctx), projector)
