"""The perceptual losses (trainer/factors/perceptual.py) against their formulas, the LPIPS network's
weights against the files they come from, and a latent arm's prediction decoded with gradients."""

from pathlib import Path

import lpips
import pytest
import torch
import torch.nn.functional as F

from core.weights import MissingWeightsError
from trainer.factors.perceptual import (
    TRUNKS,
    LPIPSConfig,
    PerceptualDINOConfig,
    build_lpips,
    build_perceptual_dino,
    lpips_network,
)
from trainer.factors.repa import IMAGENET_MEAN, IMAGENET_STD, TinyTeacherConfig
from trainer.flow import Prediction
from trainer.model import FactorContext

CTX = FactorContext(
    hidden_size=64, depth=4, patch_size=2, resolution=16, downsample=1, device=torch.device("cpu")
)


def prediction(x0_pred, images, t, to_images=lambda z: z):
    return Prediction(x0_pred, x0_pred, x0_pred, torch.tensor(t), images, to_images)


def test_lpips_network_holds_the_wheels_linear_layers_and_lpips_scaling():
    net = lpips_network("vgg", "random", None)
    linear = torch.load(
        Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth", map_location="cpu", weights_only=True
    )
    assert linear and all(torch.equal(net.state_dict()[k], v) for k, v in linear.items())
    fresh = lpips.lpips.ScalingLayer()
    assert torch.equal(net.scaling_layer.shift, fresh.shift) and torch.equal(
        net.scaling_layer.scale, fresh.scale
    )
    assert not any(p.requires_grad for p in net.parameters())
    again = lpips_network("vgg", "random", None)  # seeded: every arm gets the same random trunk
    assert all(
        torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values(), strict=True)
    )


def test_lpips_term_is_weight_times_lpips_of_resized_images_over_the_rows_below_the_threshold():
    g = torch.Generator().manual_seed(0)
    pred = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1).requires_grad_(True)
    images = torch.rand(2, 3, 32, 32, generator=g)
    term = build_lpips(LPIPSConfig(weight=0.1, resize=0.5, t_threshold=0.5, backbone="random"), CTX)
    got = term(prediction(pred, images, [0.2, 0.9]))
    half = [
        F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        for x in (pred, images * 2 - 1)
    ]
    per_sample = term.network(*half).view(-1)  # (2,)
    assert per_sample[1] > 0  # the masked row would have counted
    assert torch.allclose(got, 0.1 * per_sample[0] / 2)  # row 1 has t ≥ 0.5: zero, still divided by b = 2
    got.backward()
    assert pred.grad[0].abs().sum() > 0 and pred.grad[1].abs().sum() == 0


def test_lpips_trunk_comes_from_torchvisions_file_and_a_missing_one_says_how_to_fetch_it(tmp_path):
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    assert TRUNKS["vgg"].url == VGG16_Weights.IMAGENET1K_V1.url
    assert TRUNKS["alex"].url == AlexNet_Weights.IMAGENET1K_V1.url
    assert {w.filename for w in TRUNKS.values()} == {w.url.rsplit("/", 1)[1] for w in TRUNKS.values()}
    with pytest.raises(MissingWeightsError) as e:
        lpips_network("alex", "imagenet", str(tmp_path))
    assert str(e.value) == (
        f"lpips (net alex) needs alexnet-owt-7be5be79.pth (from {TRUNKS['alex'].url}) not at "
        f"{tmp_path / 'alexnet-owt-7be5be79.pth'}; fetch it on a machine with network: "
        f"ablate weights download SWEEP --dir {tmp_path}"
    )
    # a file laid out as torchvision's (features.<index>.<param>, classifier left out here)
    random = lpips_network("alex", "random", None)
    trunk = {f"features.{i}.{k}": v + 1 for s in random.net.children() for i, layer in s.named_children()
             for k, v in layer.state_dict().items()}  # fmt: skip
    torch.save(trunk, tmp_path / "alexnet-owt-7be5be79.pth")
    loaded = lpips_network("alex", "imagenet", str(tmp_path))
    got = {f"features.{i}.{k}": v for s in loaded.net.children() for i, layer in s.named_children()
           for k, v in layer.state_dict().items()}  # fmt: skip
    assert got.keys() == trunk.keys() and all(torch.equal(got[k], trunk[k]) for k in trunk)
    assert (
        LPIPSConfig(net="alex").weights() == [TRUNKS["alex"]]
        and LPIPSConfig(backbone="random").weights() == []
    )


def test_p_dino_term_is_one_minus_cos_of_the_encoders_patch_tokens():
    g = torch.Generator().manual_seed(1)
    pred = (torch.rand(2, 3, 16, 16, generator=g) * 2.4 - 1.2).requires_grad_(True)  # beyond [-1, 1]: clamped
    images = torch.rand(2, 3, 16, 16, generator=g)
    encoder = TinyTeacherConfig(width=16, layers=1, heads=2, patch_size=2)
    term = build_perceptual_dino(PerceptualDINOConfig(weight=0.01, encoder=encoder, resolution=8), CTX)
    got = term(prediction(pred, images, [0.3, 0.7]))

    def tokens(x):  # PRX's PDINOEncoder after its resize: [-1, 1] → [0, 1], clamp, ImageNet normalisation
        x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
        x = (((x + 1) / 2).clamp(0, 1) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
            IMAGENET_STD
        ).view(1, 3, 1, 1)
        return term.encoder.model(pixel_values=x).last_hidden_state[:, 1 + encoder.registers :]  # (2, 16, 16)

    a, b = tokens(pred), tokens(images * 2 - 1)
    assert a.shape == (2, 16, 16)
    expected = 0.01 * (1 - F.cosine_similarity(a, b, dim=-1)).mean(dim=-1).mean()
    assert torch.allclose(got, expected, atol=1e-7)
    got.backward()
    assert pred.grad.abs().sum() > 0


def test_a_latent_arms_prediction_is_decoded_with_gradients_through_the_frozen_decoder(tmp_path):
    from tiny_weights import tiny_autoencoder

    from core.weights import install
    from trainer.factors.tokenizer import TOKENIZERS

    tiny_autoencoder("flux-vae").save_pretrained(tmp_path / "vae")
    cfg = TOKENIZERS.config_type("flux-vae")(dtype="float32")
    install(type(cfg).MODEL, tmp_path / "vae", tmp_path / "weights")
    tokenizer = TOKENIZERS.build(cfg, torch.device("cpu"), str(tmp_path / "weights"))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    z = tokenizer.moments(images).mean.clone().requires_grad_(True)  # (2, 16, 4, 4)
    assert torch.equal(tokenizer.decode(z), ((tokenizer.signed(z).detach() + 1) / 2).clamp(0, 1))
    term = build_lpips(LPIPSConfig(backbone="random"), CTX)
    loss = term(prediction(z, images, [0.5, 0.5], tokenizer.signed))
    loss.backward()
    assert loss > 0 and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in tokenizer.parameters())  # the decoder stays frozen
