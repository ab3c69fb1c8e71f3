import pytest
import torch
from diffusers import PRXTransformer2DModel

from trainer.model import PRESETS, Denoiser, ModelConfig, build_prx


def test_denoiser_equals_diffusers_forward():
    torch.manual_seed(0)
    prx = build_prx(ModelConfig(preset="tiny"), in_channels=3, context_in_dim=32)
    # diffusers zero-initialises nothing by default here; perturb so the comparison is not trivial
    with torch.no_grad():
        for p in prx.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    txt, mask = torch.randn(2, 7, 32), torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)
    ours = Denoiser(prx)(x, t, txt, mask).pred
    ref = prx(x, t, txt, attention_mask=mask).sample
    assert ours.shape == (2, 3, 16, 16)
    assert torch.equal(ours, ref)


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
