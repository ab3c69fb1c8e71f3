"""Resolution-aware conditioning (trainer/factors/resolution.py): the vec mode is diffusers' own
`resolution_embeds`, the token mode puts two unmasked tokens before the text, and a trained arm's
checkpoint still loads in diffusers with the embedder beside it."""

import math

import torch
from diffusers import PRXTransformer2DModel
from safetensors.torch import load_file

from trainer import job
from trainer.factors.resolution import (
    TokenResolutionConfig,
    VecResolutionConfig,
    build_token,
    build_vec,
    sinusoid,
)
from trainer.model import Denoiser, FactorContext, ModelConfig, TokenState
from trainer.runtime import checkpoint

KWARGS = ModelConfig(preset="tiny").diffusers_kwargs(4, 32)
CTX = FactorContext(
    hidden_size=64, depth=4, patch_size=2, resolution=16, downsample=1, device=torch.device("cpu")
)


def inputs(h=8, w=12):
    g = torch.Generator().manual_seed(0)
    x, txt = torch.randn(2, 4, h, w, generator=g), torch.randn(2, 5, 32, generator=g)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    return x, torch.tensor([0.3, 0.8]), txt, mask


def test_the_sinusoid_is_prxs_cos_then_sin_without_time_scaling():
    x = torch.tensor([32.0, 64.0])
    freqs = torch.exp(-math.log(10000) * torch.arange(64) / 64)
    assert torch.allclose(
        sinusoid(x, 10000), torch.cat([torch.cos(x[:, None] * freqs), torch.sin(x[:, None] * freqs)], 1)
    )


def test_vec_mode_is_diffusers_resolution_embeds():
    torch.manual_seed(0)
    native = PRXTransformer2DModel(**KWARGS, resolution_embeds=True)
    torch.nn.init.normal_(native.final_layer.linear.weight, std=0.1)  # a non-zero output to compare
    plain = PRXTransformer2DModel(**KWARGS)
    plain.load_state_dict({k: v for k, v in native.state_dict().items() if not k.startswith("resolution_")})
    factor = build_vec(VecResolutionConfig(), CTX)
    factor.embedder.load_state_dict(native.resolution_embedder.state_dict())
    x, t, txt, mask = inputs()  # a 8×12 latent: height and width differ
    with torch.no_grad():
        expected = native(x, t, txt, mask).sample
        assert torch.equal(Denoiser(plain, [factor])(x, t, txt, mask).pred, expected)
        assert not torch.allclose(Denoiser(plain)(x, t, txt, mask).pred, expected)


def test_token_mode_puts_the_height_and_width_tokens_before_the_text_unmasked():
    factor = build_token(TokenResolutionConfig(max_period=1000), CTX)
    txt, mask = torch.randn(2, 5, 64), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    state = TokenState(
        img=torch.zeros(2, 24, 64), txt=txt, vec=torch.zeros(2, 64), pe=None, mask=mask, grid=(4, 6)
    )
    factor.begin(state)
    h, w = (sinusoid(torch.full((2,), side), 1000) for side in (8.0, 12.0))  # the latent's 4·2 × 6·2
    assert torch.equal(state.txt[:, 0], factor.h_embedder(h)) and torch.equal(
        state.txt[:, 1], factor.w_embedder(w)
    )
    assert torch.equal(state.txt[:, 2:], txt)
    assert state.mask[:, :2].all() and torch.equal(state.mask[:, 2:], mask)


def test_a_trained_token_arm_loads_in_diffusers_with_the_embedder_beside_it(make_run):
    d = make_run("arm", resolution_aware={"kind": "token"}, train={"steps": 2, "batch_size": 2, "warmup_steps": 0},
                 checkpoint={"every": 2}, eval={"every": 100, "batch_size": 2}, log={"every": 1})  # fmt: skip
    job.run(d)
    ckpt = checkpoint.latest(d)
    prx = PRXTransformer2DModel.from_pretrained(ckpt / "transformer")
    assert prx.resolution_embedder is None  # a plain PRX: the conditioning is the factor's
    factors = load_file(ckpt / "factors.safetensors")
    assert sorted(factors) == sorted(
        f"0.{e}_embedder.{layer}.{p}"
        for e in "hw"
        for layer in ("in_layer", "out_layer")
        for p in ("weight", "bias")
    )
    assert factors["0.h_embedder.in_layer.weight"].shape == (64, 128)
