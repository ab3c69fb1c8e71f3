"""Text encoders: captions → (embeddings (B, L, D), mask (B, L)); frozen, never trained.

`tiny-t5` needs no downloaded file (a seeded random-init T5 encoder over a byte-level
tokenizer): the same seed gives every arm the same encoder, so arms stay comparable.
`t5gemma` is the study's encoder: the encoder half of `google/t5gemma-2b-2b-ul2` (2304-d),
captions padded to 256 tokens with the mask kept, bf16 weights, autocast off inside.

Every caption is cleaned (`clean`, trainer/factors/captions.py) inside `TextEncoder`, the one place captions
are encoded: training, caption dropout's empty caption, the eval prompts and `ablate cache` alike.
"""

from __future__ import annotations

import hashlib
import re
from types import SimpleNamespace
from typing import Literal

import torch
from pydantic import Field

from core.weights import HFWeights, load_pretrained
from trainer.factors.captions import CLEANERS, Cleaning
from trainer.identity import TRAINS, mark
from trainer.registry import Config, Registry

TEXT = Registry("text_encoder")


def clean_option(default: Cleaning):
    return Field(
        default,
        description="caption cleaning before tokenising: prx = PRX's (DeepFloyd IF's: lowercase, no URLs, "
        "@handles, HTML entities, file names, …), none = captions as written",
        json_schema_extra=mark(TRAINS, neutral="none"),  # added after hashes existed: no cleaning before
    )


class TextEncoder(torch.nn.Module):
    """Wraps a tokenizer and a frozen encoder; `dim` is the width the denoiser conditions on."""

    def __init__(
        self,
        tokenizer,
        encoder: torch.nn.Module,
        max_length: int,
        dim: int,
        dtype: torch.dtype = torch.float32,
        clean: Cleaning = "none",
    ):
        super().__init__()
        self.tokenizer, self.encoder = tokenizer, encoder.eval().requires_grad_(False)
        self.max_length, self.dim = max_length, dim
        self.dtype = dtype  # the encoder's output dtype: embeddings cached in it are stored losslessly
        self.clean = CLEANERS[clean]
        self._empty: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.clean is not None:
            captions = [self.clean(c) for c in captions]
        device = next(self.encoder.parameters()).device
        tok = self.tokenizer(
            captions, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).to(device)
        with torch.autocast(device.type, enabled=False):
            emb = self.encoder(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
        return emb.float(), tok.attention_mask.bool()  # (B, L, D), (B, L)

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoded empty string (the unconditional input, also used for caption dropout)."""
        if self._empty is None:
            self._empty = self([""])
        return self._empty  # (1, L, D), (1, L)


class TinyT5Config(Config):
    kind: Literal["tiny-t5"] = "tiny-t5"
    d_model: int = Field(64, ge=8, description="encoder width = the denoiser's context_in_dim")
    num_layers: int = Field(2, ge=1, description="encoder layers")
    num_heads: int = Field(4, ge=1, description="attention heads")
    max_length: int = Field(64, ge=4, description="tokens (bytes) per caption, padded, mask kept")
    seed: int = Field(0, description="init seed; keep it equal across arms")
    clean: Cleaning = clean_option("none")  # a test stand-in: its golden losses predate cleaning

    @property
    def dim(self) -> int:
        return self.d_model

    def weights(self) -> list[HFWeights]:
        return []


@TEXT.register(TinyT5Config)
def build_tiny_t5(cfg: TinyT5Config, device: torch.device, weights_dir: str | None = None) -> TextEncoder:
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tokenizer = ByT5Tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=cfg.d_model,
        d_kv=cfg.d_model // cfg.num_heads,
        d_ff=2 * cfg.d_model,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
    )
    with torch.random.fork_rng(devices=[]):  # don't disturb the trainer's RNG stream
        torch.manual_seed(cfg.seed)
        encoder = T5EncoderModel(config)
    return TextEncoder(tokenizer, encoder.to(device), cfg.max_length, cfg.d_model, clean=cfg.clean)


class HashedWordsConfig(Config):
    kind: Literal["hashed-words"] = "hashed-words"
    dim: int = Field(64, ge=8, description="embedding width = the denoiser's context_in_dim")
    max_length: int = Field(16, ge=1, description="words per caption, padded, mask kept")
    buckets: int = Field(4096, ge=16, description="hash buckets (word ids); collisions are rare below it")
    seed: int = Field(0, description="init seed; keep it equal across arms")
    clean: Cleaning = clean_option("none")  # the demo's words are lower-case attribute names already

    def weights(self) -> list[HFWeights]:
        return []


class HashedWordTokenizer:
    """Lower-cased words → bucket ids by a stable hash (1..buckets; 0 pads), with the HF call interface."""

    def __init__(self, buckets: int):
        self.buckets = buckets

    def word_id(self, word: str) -> int:
        return (
            1
            + int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little") % self.buckets
        )

    def __call__(self, captions: list[str], max_length: int, **_: object):
        from transformers import BatchEncoding

        ids = torch.zeros(len(captions), max_length, dtype=torch.long)
        for row, caption in enumerate(captions):
            words = [self.word_id(w) for w in re.findall(r"[a-z0-9]+", caption.lower())][:max_length]
            ids[row, : len(words)] = torch.tensor(words, dtype=torch.long)
        return BatchEncoding({"input_ids": ids, "attention_mask": (ids > 0).long()})


class WordEmbedding(torch.nn.Module):
    """A frozen random embedding per word: the text encoder of the CPU demo, where every caption word
    names one attribute value (a byte-level encoder spends most of its tokens spelling them)."""

    def __init__(self, buckets: int, dim: int):
        super().__init__()
        self.table = torch.nn.Embedding(buckets + 1, dim, padding_idx=0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return SimpleNamespace(last_hidden_state=self.table(input_ids))  # (B, L, D)


@TEXT.register(HashedWordsConfig)
def build_hashed_words(
    cfg: HashedWordsConfig, device: torch.device, weights_dir: str | None = None
) -> TextEncoder:
    with torch.random.fork_rng(devices=[]):  # the same table in every arm, the trainer's RNG untouched
        torch.manual_seed(cfg.seed)
        encoder = WordEmbedding(cfg.buckets, cfg.dim)
    return TextEncoder(
        HashedWordTokenizer(cfg.buckets), encoder.to(device), cfg.max_length, cfg.dim, clean=cfg.clean
    )


class T5GemmaConfig(Config):
    kind: Literal["t5gemma"] = "t5gemma"
    repo: str = Field(
        "google/t5gemma-2b-2b-ul2",
        description="HF repo of a T5Gemma encoder-decoder; its encoder and tokenizer are used",
    )
    dim: int = Field(2304, ge=1, description="encoder width = the denoiser's context_in_dim; checked on load")
    max_length: int = Field(256, ge=1, description="tokens per caption, padded, mask kept")
    dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="encoder weights (autocast is off inside)"
    )
    clean: Cleaning = clean_option("prx")  # as PRX's text tower (its default)

    def weights(self) -> list[HFWeights]:
        return [HFWeights(self.repo)]


@TEXT.register(T5GemmaConfig)
def build_t5gemma(cfg: T5GemmaConfig, device: torch.device, weights_dir: str | None = None) -> TextEncoder:
    import logging

    from transformers import AutoTokenizer, T5GemmaEncoderModel

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]
    tokenizer = load_pretrained(AutoTokenizer, HFWeights(cfg.repo), weights_dir)
    # Only the encoder is instantiated (is_encoder_decoder=False): the checkpoint's decoder weights are
    # skipped, so transformers' load report listing them as unexpected is silenced; a missing encoder
    # weight is still an error below.
    report = logging.getLogger("transformers.modeling_utils")
    level = report.level
    report.setLevel(logging.ERROR)
    try:
        encoder, info = load_pretrained(
            T5GemmaEncoderModel,
            HFWeights(cfg.repo),
            weights_dir,
            is_encoder_decoder=False,
            dtype=dtype,
            output_loading_info=True,
        )
    finally:
        report.setLevel(level)
    if info["missing_keys"]:
        raise ValueError(
            f"text_encoder 't5gemma': {cfg.repo} lacks encoder weights {sorted(info['missing_keys'])[:5]}; "
            "is it a T5Gemma checkpoint?"
        )
    width = encoder.config.encoder.hidden_size
    if width != cfg.dim:
        raise ValueError(
            f"text_encoder 't5gemma': {cfg.repo} is {width}-d but text_encoder.dim={cfg.dim}; "
            f"set text_encoder.dim: {width}"
        )
    return TextEncoder(tokenizer, encoder.to(device), cfg.max_length, cfg.dim, dtype, clean=cfg.clean)
