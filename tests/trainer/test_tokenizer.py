"""Latent tokenizers on tiny random-init autoencoders of the real diffusers classes.

Each model is saved with `save_pretrained` and installed into a weights folder in the HF cache
layout, so the tokenizers load it through the same path as the real weights.
"""

import pytest
import torch
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
from tiny_weights import BN_MEAN, BN_VAR, tiny_autoencoder

from core.weights import MissingWeightsError, install, required
from trainer.config import TrainConfig
from trainer.factors.tokenizer import TOKENIZERS, patchify, unpatchify

tiny = tiny_autoencoder


def put(model, cfg, weights_dir, tmp_path):
    src = tmp_path / f"src-{cfg.kind}"
    model.save_pretrained(src)
    install(cfg.MODEL, src, weights_dir)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A weights folder holding a tiny model for every autoencoder tokenizer."""
    d, tmp = tmp_path_factory.mktemp("weights"), tmp_path_factory.mktemp("src")
    for kind in ("flux-vae", "repa-e-vae", "flux2-ae", "dc-ae"):
        put(tiny(kind), config(kind), d, tmp)
    return d


def config(kind: str, **fields):
    return TOKENIZERS.config_type(kind)(**fields)


def build(kind: str, weights_dir, **fields):
    return TOKENIZERS.build(
        config(kind, dtype="float32", **fields), torch.device("cpu"), weights_dir=str(weights_dir)
    )


def images(b=2, side=32):
    return torch.rand(b, 3, side, side, generator=torch.Generator().manual_seed(1))


def test_configs_state_their_grid_and_weights_without_loading():
    grid = {k: (config(k).channels, config(k).downsample) for k in TOKENIZERS.kinds}
    assert grid == {
        "pixel": (3, 1),
        "flux-vae": (16, 8),
        "repa-e-vae": (16, 8),
        "flux2-ae": (32, 8),
        "dc-ae": (32, 32),
        "domain-ae": (4, 2),
    }
    assert config("flux2-ae").weights() == [("black-forest-labs/FLUX.2-dev", "vae")]
    prx = config("flux2-ae", latent_norm="prx-plain")  # PRX's loading: the same weights and latent grid
    assert config("flux2-ae").latent_norm == "batchnorm"
    assert (prx.channels, prx.downsample, prx.weights()) == (32, 8, config("flux2-ae").weights())
    assert config("pixel").weights() == []
    base = dict(
        data={"kind": "synthetic"},
        text_encoder={"kind": "tiny-t5"},
        optimizer={"kind": "adamw"},
        precision={"kind": "fp32"},
    )
    cfg = TrainConfig.model_validate({**base, "tokenizer": {"kind": "flux2-ae"}})  # no weights needed
    assert required(cfg) == [("black-forest-labs/FLUX.2-dev", "vae")]
    with pytest.raises(
        ValueError, match="in_channels=16 disagrees with tokenizer 'flux2-ae' \\(32 channels\\)"
    ):
        TrainConfig.model_validate({**base, "tokenizer": {"kind": "flux2-ae"}, "model": {"in_channels": 16}})


@pytest.mark.parametrize("kind", ["flux-vae", "repa-e-vae"])
def test_kl_vae_normalisation_matches_the_formula(kind, weights):
    tok, vae = build(kind, weights), tiny(kind).eval()
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    x = images()
    with torch.no_grad():
        dist = vae.encode(x * 2 - 1).latent_dist
        lat = tok.moments(x)
        torch.testing.assert_close(lat.mean, scale * (dist.mean - shift))
        torch.testing.assert_close(lat.std, scale * dist.std)
        # encode draws the same sample as diffusers' latent_dist.sample with the same generator
        z = tok.encode(x, torch.Generator().manual_seed(7))
        torch.testing.assert_close(z, scale * (dist.sample(torch.Generator().manual_seed(7)) - shift))
        assert z.shape == (2, 16, 4, 4)
        # decode inverts the normalisation exactly, then decodes
        torch.testing.assert_close(
            tok.decode(z), ((vae.decode(z / scale + shift).sample + 1) / 2).clamp(0, 1)
        )
    assert (scale, shift) != (0.18215, 0.0)


def test_flux_vae_uses_the_flux_constants(weights):
    tok = build("flux-vae", weights)
    assert (tok.norm.scale, tok.norm.shift) == (0.3611, 0.1159)
    latent = torch.tensor([0.1159, 1.1159, -0.8841])
    torch.testing.assert_close(tok.norm(latent), torch.tensor([0.0, 0.3611, -0.3611]))


def test_patchify_matches_the_flux2_pipeline():
    x = torch.randn(2, 32, 6, 4)
    assert torch.equal(patchify(x), Flux2Pipeline._patchify_latents(x))
    assert torch.equal(unpatchify(patchify(x)), x)
    assert torch.equal(Flux2Pipeline._unpatchify_latents(patchify(x)), x)


def test_flux2_normalises_with_the_batchnorm_statistics(weights, tmp_path):
    tok, vae = build("flux2-ae", weights), tiny("flux2-ae").eval()
    eps = vae.config.batch_norm_eps
    x = images()
    with torch.no_grad():
        raw = vae.encode(x * 2 - 1).latent_dist
    expected = unpatchify(
        (patchify(raw.mean) - BN_MEAN.view(1, -1, 1, 1)) / torch.sqrt(BN_VAR + eps).view(1, -1, 1, 1)
    )
    lat = tok.moments(x)
    assert lat.mean.shape == (2, 32, 4, 4)
    torch.testing.assert_close(lat.mean, expected)
    torch.testing.assert_close(
        lat.std, unpatchify(patchify(raw.std) / torch.sqrt(BN_VAR + eps).view(1, -1, 1, 1))
    )

    # other statistics in the checkpoint → the output moves exactly as the formula says
    other = tiny("flux2-ae")
    other.bn.running_mean.fill_(0.5)
    other.bn.running_var.fill_(9.0 - eps)
    d = tmp_path / "w2"
    put(other, config("flux2-ae"), d, tmp_path)
    torch.testing.assert_close(build("flux2-ae", d).moments(x).mean, (raw.mean - 0.5) / 3.0)


def test_flux2_prx_plain_is_what_a_plain_autoencoderkl_loads(weights, tmp_path):
    # PRX's vae/flux2.yaml: AutoencoderKL.from_pretrained on the FLUX.2 folder keeps the encoder and
    # decoder, drops the bn statistics and scales by the class default 0.18215 with no shift
    from diffusers import AutoencoderKL

    tiny("flux2-ae").save_pretrained(tmp_path / "flux2")
    plain = AutoencoderKL.from_pretrained(tmp_path / "flux2").eval()
    assert (plain.config.scaling_factor, plain.config.shift_factor) == (0.18215, None)
    tok, x = build("flux2-ae", weights, latent_norm="prx-plain"), images()
    with torch.no_grad():
        dist = plain.encode(x * 2 - 1).latent_dist
        lat = tok.moments(x)
        torch.testing.assert_close(lat.mean, 0.18215 * dist.mean)
        torch.testing.assert_close(lat.std, 0.18215 * dist.std)
        z = tok.encode(x, torch.Generator().manual_seed(7))
        torch.testing.assert_close(z, 0.18215 * dist.sample(torch.Generator().manual_seed(7)))
        assert z.shape == (2, 32, 4, 4)
        torch.testing.assert_close(tok.decode(z), ((plain.decode(z / 0.18215).sample + 1) / 2).clamp(0, 1))
    assert not torch.allclose(lat.mean, build("flux2-ae", weights).moments(x).mean)  # ≠ the BN default


def test_flux2_without_batchnorm_statistics_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    tiny("flux2-ae").save_pretrained(src)
    f = src / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(f).items() if not k.startswith("bn.")}, f)
    install(config("flux2-ae").MODEL, src, tmp_path / "w")
    with pytest.raises(ValueError, match="lacks .*bn.running_mean.*bn.running_var"):
        build("flux2-ae", tmp_path / "w")


def test_dc_ae_is_deterministic_and_scaled(weights):
    tok, vae = build("dc-ae", weights), tiny("dc-ae").eval()
    x = images(side=64)
    with torch.no_grad():
        latent = vae.encode(x * 2 - 1).latent
    lat = tok.moments(x)
    assert lat.std is None and lat.mean.shape == (2, 32, 2, 2)
    torch.testing.assert_close(lat.mean, 0.41407 * latent)
    assert torch.equal(tok.encode(x), lat.mean)


@pytest.mark.parametrize(
    "kind,fields",
    [("flux-vae", {}), ("repa-e-vae", {}), ("flux2-ae", {}), ("flux2-ae", {"latent_norm": "prx-plain"}),
     ("dc-ae", {})],
    ids=["flux-vae", "repa-e-vae", "flux2-ae", "flux2-ae-prx-plain", "dc-ae"],
)  # fmt: skip
def test_decode_inverts_the_normalisation(kind, fields, weights):
    norm = build(kind, weights, **fields).norm
    latent = torch.randn(
        3, 32 if kind in ("flux2-ae", "dc-ae") else 16, 4, 6, generator=torch.Generator().manual_seed(2)
    )
    torch.testing.assert_close(norm.inverse(norm(latent)), latent, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(norm(norm.inverse(latent)), latent, rtol=1e-6, atol=1e-6)


def test_posterior_mean_is_deterministic(weights):
    tok = build("flux-vae", weights, posterior="mean")
    x = images()
    lat = tok.moments(x)
    assert lat.std is None and torch.equal(tok.encode(x, torch.Generator().manual_seed(3)), lat.mean)


def test_bf16_autoencoder_runs_without_autocast(weights):
    tok = TOKENIZERS.build(config("flux-vae"), torch.device("cpu"), weights_dir=str(weights))  # default bf16
    assert next(tok.vae.parameters()).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lat = tok.moments(images())
    assert lat.mean.dtype == torch.float32 and torch.isfinite(lat.mean).all()


def test_missing_weights_is_one_line_naming_the_model_and_the_command(tmp_path):
    with pytest.raises(MissingWeightsError) as e:
        build("flux2-ae", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert "black-forest-labs/FLUX.2-dev (subfolder vae)" in msg
    assert f"ablate weights download SWEEP --dir {tmp_path}" in msg


def test_a_model_with_other_latent_channels_is_rejected(tmp_path):
    put(tiny("flux-vae", latent_channels=4), config("flux-vae"), tmp_path / "w", tmp_path)
    with pytest.raises(
        ValueError, match="4 latent channels at 8x downsampling, but the config states 16 at 8x"
    ):
        build("flux-vae", tmp_path / "w")


def test_the_domain_autoencoder_is_trained_once_and_reconstructs_the_domain(tmp_path, tiny_cfg):
    from trainer.config import TrainConfig
    from trainer.data.synthetic import SyntheticShapes
    from trainer.factors.tokenizer import build_tokenizer

    over = {"tokenizer": {"kind": "domain-ae", "steps": 300}, "model": {"preset": "tiny", "patch_size": 1}}
    cfg = TrainConfig.model_validate({**tiny_cfg, **over})
    tok = build_tokenizer(cfg.tokenizer, cfg.data, torch.device("cpu"), None, tmp_path)
    (saved,) = tmp_path.glob("domain-ae-*.pt")
    renders = SyntheticShapes(cfg.data, 0, 16)
    x = torch.stack([renders[i]["image"] for i in range(16)])  # held-in renders it never trained on
    lat = tok.moments(x)
    assert lat.std is None and lat.mean.shape == (16, 4, 8, 8)  # deterministic, 2x down, 4 channels
    assert 0.5 < lat.mean.std().item() < 2.0  # normalised for the denoiser
    assert torch.mean((tok.decode(lat.mean) - x) ** 2).item() < 0.01  # it reconstructs the domain
    again = build_tokenizer(
        cfg.tokenizer, cfg.data, torch.device("cpu"), None, tmp_path
    )  # loaded, not trained
    assert list(tmp_path.glob("domain-ae-*.pt")) == [saved] and torch.equal(again.moments(x).mean, lat.mean)
    with pytest.raises(ValueError, match="tokenizer 'domain-ae' is trained on the synthetic-shapes domain"):
        TrainConfig.model_validate(
            {
                **tiny_cfg,
                **over,
                "data": {"kind": "parquet", "path": "x.parquet", "caption": "c", "resolution": 16},
            }
        )


@pytest.mark.parametrize("kind", ["pixel", "flux-vae", "repa-e-vae", "flux2-ae", "dc-ae"])
def test_the_stated_grid_is_the_encoded_one_so_sampling_needs_no_encode(kind, weights):
    tok = TOKENIZERS.build(config("pixel"), torch.device("cpu")) if kind == "pixel" else build(kind, weights)
    side = 32
    assert tuple(tok.encode(images(1, side)).shape[1:]) == (
        tok.channels,
        side // tok.downsample,
        side // tok.downsample,
    )
