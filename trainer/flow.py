"""Flow matching as PRX does it: the objective and the Euler sampler on one screen.

x_t = (1 - t)·x0 + t·ε (t = 1 is pure noise), velocity v = ε - x0, plain MSE.
Training t: sigmoid(N(0, 1)), shifted s·t / (1 + (s - 1)·t), clamped to [t_min, 1), and a
fraction of samples replaced by Uniform[t_min, 1). x-prediction (JiT): the net predicts x0
and the loss is taken in v-space, dividing by t clamped at `x_min_t`.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from trainer.draws import Draws
from trainer.registry import Config


class FlowConfig(Config):
    prediction: Literal["v", "x"] = Field("v", description="what the net outputs: velocity or clean x0")
    shift: float = Field(1.0, gt=0, description="timestep shift s (1 for latents, 3 for pixels)")
    uniform_fraction: float = Field(0.1, ge=0, le=1, description="share of t drawn uniformly")
    t_min: float = Field(1e-3, ge=0, lt=1, description="smallest training t")
    x_min_t: float = Field(0.05, gt=0, lt=1, description="x-prediction: t is clamped here in v-space")


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator that depends only on (seed, step), for draws that are not per training sample (the
    held-out set's noise is keyed by its own index). A train step draws per sample: trainer/draws.py."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def shift_t(t: torch.Tensor, s: float) -> torch.Tensor:
    return s * t / (1 + (s - 1) * t)


def times(z: torch.Tensor, u: torch.Tensor, cfg: FlowConfig) -> torch.Tensor:
    """(n,) training times from standard normals z (n,) and uniforms u (n, 2) on [0, 1): sigmoid(z)
    shifted and clamped, replaced by the uniform time from u[:, 0] where u[:, 1] < uniform_fraction."""
    t = shift_t(torch.sigmoid(z), cfg.shift)
    t = t.clamp(cfg.t_min, torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item())
    uniform = u[:, 0] * (1 - cfg.t_min) + cfg.t_min
    return torch.where(u[:, 1] < cfg.uniform_fraction, uniform, t)


def sample_t(n: int, cfg: FlowConfig, gen: torch.Generator) -> torch.Tensor:
    """(n,) training times on the CPU, a pure function of the generator's state."""
    z = torch.randn(n, generator=gen)
    return times(z, torch.stack([torch.rand(n, generator=gen), torch.rand(n, generator=gen)], 1), cfg)


def draw_t(draws: Draws, cfg: FlowConfig) -> torch.Tensor:
    """(rows,) training times on the CPU, each a function of its sample's (seed, step, global index)."""
    return times(draws.normal("t.logit", device="cpu"), draws.uniform("t.uniform", (2,), device="cpu"), cfg)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *[1] * (x0.dim() - 1))
    return (1 - t) * x0 + t * noise


# Each prediction type says how the net's output and the regression target read as velocities, and the
# output as a clean estimate (the perceptual losses'); the loss and the sampler use only velocities, so
# neither branches on the prediction type.
def _clamped(t: torch.Tensor, x: torch.Tensor, cfg: FlowConfig) -> torch.Tensor:
    return t.clamp(min=cfg.x_min_t).view(-1, *[1] * (x.dim() - 1))


PREDICTIONS: dict[str, dict[str, Callable]] = {
    "v": {
        "velocity": lambda pred, xt, t, cfg: pred,
        "target": lambda x0, noise, xt, t, cfg: noise - x0,
        "clean": lambda pred, xt, t, cfg: xt - t.view(-1, *[1] * (xt.dim() - 1)) * pred,
    },
    "x": {  # the net outputs x0; v = (x_t - x0) / max(t, x_min_t) for prediction and target alike
        "velocity": lambda pred, xt, t, cfg: (xt - pred) / _clamped(t, xt, cfg),
        "target": lambda x0, noise, xt, t, cfg: (xt - x0) / _clamped(t, xt, cfg),
        "clean": lambda pred, xt, t, cfg: pred,  # the raw output, as PRX's perceptual losses take it
    },
}


def velocity(pred: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, cfg: FlowConfig) -> torch.Tensor:
    return PREDICTIONS[cfg.prediction]["velocity"](pred, xt, t, cfg)


def loss(
    pred: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    xt: torch.Tensor,
    t: torch.Tensor,
    cfg: FlowConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain MSE in v-space. Returns (loss, predicted velocity, target velocity).

    The target is computed in the dtype of x0 and noise (bf16 in PRX's bf16 run, trainer/factors/precision.py)
    and compared in fp32, as PRX's mse_loss under bf16 autocast does."""
    v_pred = velocity(pred.float(), xt, t, cfg)
    v_true = PREDICTIONS[cfg.prediction]["target"](x0, noise, xt, t, cfg).float()
    return F.mse_loss(v_pred, v_true), v_pred, v_true


def clean(pred: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, cfg: FlowConfig) -> torch.Tensor:
    """The net's estimate of x0 (B, C, h, w): its output under x-prediction, x_t − t·v under v-prediction."""
    return PREDICTIONS[cfg.prediction]["clean"](pred.float(), xt, t, cfg)


@dataclass(frozen=True)
class Prediction:
    """A train step's prediction as a loss term sees it (trainer/config.py, `joins="loss"`): this
    process's rows, each tensor (b, …)."""

    v_pred: torch.Tensor  # (b, C, h, w) fp32, the predicted velocity
    v_true: torch.Tensor  # (b, C, h, w) fp32, the target velocity
    x0_pred: torch.Tensor  # (b, C, h, w) fp32, the net's clean estimate in the denoiser's space (`clean`)
    t: torch.Tensor  # (b,) fp32
    images: torch.Tensor  # (b, 3, H, W) in [0, 1], the batch's real images
    to_images: Callable[[torch.Tensor], torch.Tensor]  # denoiser space → (b, 3, H, W) in about [-1, 1],
    # differentiable (the tokenizer's `signed`: the identity for pixels, the frozen decoder for latents)

    @functools.cached_property
    def pred_images(self) -> torch.Tensor:
        """`to_images(x0_pred)`, decoded once however many terms compare images (LPIPS and perceptual DINO)."""
        return self.to_images(self.x0_pred)


@torch.no_grad()
def euler_sample(
    net: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    txt: torch.Tensor,
    mask: torch.Tensor,
    empty_txt: torch.Tensor,
    empty_mask: torch.Tensor,
    cfg: FlowConfig,
    steps: int = 50,
    guidance: float = 3.5,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Euler over shift(linspace(1, 0, steps + 1)) with CFG u + s·(c - u), the empty caption as u.

    `dtype` is the running state's: the state, the net's output and the timesteps the net sees are
    in it, the step sizes come from the fp32 grid (bf16 is PRX's bf16 run, trainer/factors/precision.py)."""
    b = noise.shape[0]
    ts = shift_t(torch.linspace(1, 0, steps + 1, device=noise.device), cfg.shift)  # (steps + 1,) fp32
    ctx = torch.cat([txt, empty_txt.expand(b, -1, -1)])  # (2B, Lt, D): conditional, then unconditional
    ctx_mask = torch.cat([mask, empty_mask.expand(b, -1)])
    x = noise.to(dtype)  # (B, C, h, w)
    for i in range(steps):
        t = ts[i].expand(2 * b)
        x2 = torch.cat([x, x])
        v_c, v_u = velocity(net(x2, t.to(dtype), ctx, ctx_mask).to(dtype), x2, t, cfg).chunk(2)
        x = (x + (ts[i + 1] - ts[i]) * (v_u + guidance * (v_c - v_u))).to(dtype)
    return x
