"""Tiny random-init models of every pretrained component, installed into a weights folder.

Each is an instance of the real class (diffusers autoencoders, transformers T5Gemma, DINOv2,
DINOv3), saved with `save_pretrained` and placed in the HF cache layout under the real repo id,
so the trainer loads it through exactly the path it uses for the real weights.
(A module with a unique name: test files import it directly.)
"""

from __future__ import annotations

from pathlib import Path

import torch

KL = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 8, 8),
    layers_per_block=1,
    norm_num_groups=4,
)
DC = dict(
    latent_channels=32,
    attention_head_dim=4,
    encoder_block_types="ResBlock",
    decoder_block_types="ResBlock",
    encoder_block_out_channels=(8, 8, 8, 8, 16, 32),
    decoder_block_out_channels=(8, 8, 8, 8, 16, 32),
    encoder_layers_per_block=(1,) * 6,
    decoder_layers_per_block=(1,) * 6,
    encoder_qkv_multiscales=((),) * 6,
    decoder_qkv_multiscales=((),) * 6,
    scaling_factor=0.41407,
)
BN_MEAN = torch.linspace(-1, 1, 128)
BN_VAR = torch.linspace(0.5, 4, 128)
T5GEMMA_DIM = 32


def tiny_autoencoder(kind: str, **over):
    from diffusers import AutoencoderDC, AutoencoderKL, AutoencoderKLFlux2

    torch.manual_seed(0)
    if kind in ("flux-vae", "repa-e-vae"):
        scale = {"flux-vae": (0.3611, 0.1159), "repa-e-vae": (0.5, -0.2)}[kind]
        return AutoencoderKL(
            **{
                **KL,
                "latent_channels": 16,
                "scaling_factor": scale[0],
                "shift_factor": scale[1],
                "use_quant_conv": False,
                "use_post_quant_conv": False,
                **over,
            }
        )
    if kind == "flux2-ae":
        vae = AutoencoderKLFlux2(**{**KL, "latent_channels": 32, **over})
        vae.bn.running_mean.copy_(BN_MEAN)
        vae.bn.running_var.copy_(BN_VAR)
        return vae
    if kind == "dc-ae":
        return AutoencoderDC(**{**DC, **over})
    raise ValueError(kind)


def tiny_t5gemma():
    from transformers import (
        ByT5Tokenizer,
        T5GemmaConfig,
        T5GemmaForConditionalGeneration,
        T5GemmaModuleConfig,
    )

    tok = ByT5Tokenizer()
    module = dict(
        vocab_size=len(tok),
        hidden_size=T5GEMMA_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    )
    config = T5GemmaConfig(
        encoder=T5GemmaModuleConfig(**module), decoder=T5GemmaModuleConfig(**module), vocab_size=len(tok)
    )
    torch.manual_seed(0)
    return T5GemmaForConditionalGeneration(config), tok


def tiny_teacher(spec):
    """One-layer ViT with the teacher's width, patch and registers (what the loader checks)."""
    import transformers

    common = dict(
        hidden_size=spec.width,
        num_hidden_layers=1,
        num_attention_heads=spec.width // 64,
        intermediate_size=64,
        patch_size=spec.patch_size,
    )
    if spec.model_class == "DINOv3ViTModel":
        cfg = transformers.DINOv3ViTConfig(**common, num_register_tokens=spec.registers)
    elif spec.model_class == "Dinov2WithRegistersModel":
        cfg = transformers.Dinov2WithRegistersConfig(**common, num_register_tokens=spec.registers)
    else:
        cfg = transformers.Dinov2Config(**common)
    torch.manual_seed(0)
    return getattr(transformers, spec.model_class)(cfg)


def install_everything(weights_dir: Path, scratch: Path) -> Path:
    """A weights folder with a tiny model under every repo id the trainer can load."""
    from core.weights import HFWeights, install
    from trainer.factors.repa import HF_TEACHERS
    from trainer.factors.text import T5GemmaConfig
    from trainer.factors.tokenizer import TOKENIZERS

    def put(model, spec, *extra):
        src = scratch / f"src-{len(list(scratch.iterdir()))}"
        model.save_pretrained(src)
        for e in extra:
            e.save_pretrained(src)
        install(spec, src, weights_dir)

    for kind in ("flux-vae", "repa-e-vae", "flux2-ae", "dc-ae"):
        put(tiny_autoencoder(kind), TOKENIZERS.config_type(kind).MODEL)
    model, tok = tiny_t5gemma()
    put(model, HFWeights(T5GemmaConfig().repo), tok)
    for spec in HF_TEACHERS.values():
        put(tiny_teacher(spec), HFWeights(spec.repo_id))
    return weights_dir
