import pytest
import torch
from diffusers import PRXTransformer2DModel

from trainer.model import PRESETS, Denoiser, ModelConfig, build_prx


@pytest.mark.parametrize(
    "sizes, side",
    [
        ({}, 16),
        # pixel-space PRX at toy size: 8×8×3 = 192 values per patch → bottleneck 16 → hidden 64
        ({"patch_size": 8, "bottleneck_size": 16}, 32),
    ],
    ids=["linear-embedding", "bottleneck-embedding"],
)
def test_denoiser_equals_diffusers_forward(sizes, side):
    torch.manual_seed(0)
    prx = build_prx(ModelConfig(preset="tiny", **sizes), in_channels=3, context_in_dim=32)
    # the final layer starts at zero (PRX init) and every block's adaLN too (diffusers): perturb so
    # the comparison is not trivial
    with torch.no_grad():
        for p in prx.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x, t = torch.randn(2, 3, side, side), torch.rand(2)
    txt, mask = torch.randn(2, 7, 32), torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)
    ours = Denoiser(prx)(x, t, txt, mask).pred
    ref = prx(x, t, txt, attention_mask=mask).sample
    assert ours.shape == (2, 3, side, side)
    assert torch.equal(ours, ref)
    if sizes:
        assert [tuple(m.weight.shape) for m in prx.img_in] == [(16, 192), (64, 16)]


def test_pixel_preset_is_prx_jit_32_small():
    """PRX configs/yamls/model/prx_jit_32_small.yaml: prx_small with in_channels 3, patch 32, bottleneck 256."""
    kw = ModelConfig(preset="prx-jit-32-small").diffusers_kwargs(in_channels=3, context_in_dim=2304)
    assert kw == {
        **ModelConfig(preset="prx-1.2b").diffusers_kwargs(in_channels=3, context_in_dim=2304),
        "patch_size": 32,
        "bottleneck_size": 256,
    }
    with torch.device("meta"):
        prx = PRXTransformer2DModel(**kw)
    assert [tuple(m.weight.shape) for m in prx.img_in] == [(256, 3072), (1792, 256)]
    assert tuple(prx.final_layer.linear.weight.shape) == (3072, 1792)  # a whole 32×32×3 patch per token
    assert 1.1e9 < sum(p.numel() for p in prx.parameters()) < 1.3e9  # still PRX-1.2B (1.18 B)


def test_prx_init_zeroes_the_final_layer_and_nothing_else():
    """PRX (prx_layers.py `LastLayer`) zero-initialises the final adaLN modulation and output linear;
    diffusers' class leaves them random. Every other weight is the same draw under both inits."""
    nets = {}
    for init in ("prx", "diffusers"):
        torch.manual_seed(0)
        nets[init] = build_prx(ModelConfig(preset="tiny", init=init), in_channels=3, context_in_dim=32)
    ours, theirs = dict(nets["prx"].named_parameters()), dict(nets["diffusers"].named_parameters())
    final = {f"final_layer.{m}.{p}" for m in ("adaLN_modulation.1", "linear") for p in ("weight", "bias")}
    assert final <= set(ours)
    for name, p in ours.items():
        if name in final:
            assert not p.any() and theirs[name].any(), name
        else:
            assert torch.equal(p, theirs[name]), name
    x, t, txt = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 5, 32)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert torch.equal(Denoiser(nets["prx"])(x, t, txt, mask).pred, torch.zeros_like(x))  # predicts 0
    assert Denoiser(nets["diffusers"])(x, t, txt, mask).pred.abs().min() > 0


def test_prx_preset_is_the_studys_size():
    kw = ModelConfig(preset="prx-1.2b").diffusers_kwargs(in_channels=16, context_in_dim=2304)
    assert kw | {} == {
        **kw,
        "hidden_size": 1792,
        "depth": 16,
        "num_heads": 28,
        "mlp_ratio": 3.5,
        "patch_size": 2,
    }
    with torch.device("meta"):
        n = sum(p.numel() for p in PRXTransformer2DModel(**kw).parameters())
    assert 1.1e9 < n < 1.3e9  # PRX-1.2B


def test_explicit_sizes_override_preset_and_are_checked():
    assert ModelConfig(preset="tiny", depth=6).sizes()["depth"] == 6
    with pytest.raises(ValueError, match="axes_dim"):
        ModelConfig(preset="tiny", hidden_size=96)  # head dim 24 but axes sum to 16
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig(preset="huge")
    assert set(PRESETS) >= {"tiny", "prx-1.2b"}


def test_in_channels_must_follow_tokenizer():
    with pytest.raises(ValueError, match="follows the tokenizer"):
        build_prx(ModelConfig(preset="tiny", in_channels=16), in_channels=3, context_in_dim=32)
