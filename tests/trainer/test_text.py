"""The t5gemma text encoder on a tiny random-init T5Gemma saved like the real checkpoint.

The real `google/t5gemma-2b-2b-ul2` is a `T5GemmaForConditionalGeneration` checkpoint (weights
under `model.encoder.*` / `model.decoder.*`); the tiny one is saved the same way, with the
byte-level `ByT5Tokenizer` standing in for the Gemma tokenizer (both load via AutoTokenizer).
"""

import pytest
import torch
from tiny_weights import tiny_t5gemma
from transformers import ByT5Tokenizer, T5GemmaForConditionalGeneration

from core.weights import HFWeights, MissingWeightsError, install
from trainer.factors.text import TEXT, T5GemmaConfig

REPO = "test/tiny-t5gemma"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    model, tok = tiny_t5gemma()
    src = tmp_path_factory.mktemp("src")
    model.save_pretrained(src)
    tok.save_pretrained(src)
    d = tmp_path_factory.mktemp("weights")
    install(HFWeights(REPO), src, d)
    return d


def build(weights, **fields):
    cfg = T5GemmaConfig(repo=REPO, **{"dim": 32, "max_length": 16, **fields})
    return TEXT.build(cfg, torch.device("cpu"), weights_dir=str(weights))


def reference(weights, ids, mask, dtype=torch.bfloat16):
    """The encoder half of the full encoder-decoder model, as PRX loads it."""
    full = T5GemmaForConditionalGeneration.from_pretrained(
        REPO, cache_dir=str(weights), local_files_only=True, dtype=dtype
    )
    with torch.no_grad():
        return full.model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state


def test_defaults_are_the_study_encoder():
    cfg = T5GemmaConfig()
    assert (cfg.repo, cfg.dim, cfg.max_length, cfg.dtype) == (
        "google/t5gemma-2b-2b-ul2",
        2304,
        256,
        "bfloat16",
    )
    assert cfg.weights() == [("google/t5gemma-2b-2b-ul2", None)]


def test_encodes_padded_with_mask_equal_to_the_encoder_decoder_encoder(weights):
    text = build(weights)
    captions = ["a red circle", "", "x" * 40]  # short, empty, truncated
    emb, mask = text(captions)
    assert emb.shape == (3, 16, 32) and emb.dtype == torch.float32
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == [13, 1, 16]  # bytes + </s>; </s>; cut at 16
    tok = ByT5Tokenizer()(captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    assert torch.equal(mask, tok.attention_mask.bool())
    assert torch.equal(emb, reference(weights, tok.input_ids, tok.attention_mask).float())
    # the encoder is frozen, in bf16
    enc = text.encoder
    assert (
        not any(p.requires_grad for p in enc.parameters()) and next(enc.parameters()).dtype == torch.bfloat16
    )
    assert not hasattr(enc, "decoder") and text.dtype == torch.bfloat16


def test_empty_is_the_encoded_empty_string(weights):
    text = build(weights)
    emb, mask = text.empty()
    ref_emb, ref_mask = text([""])
    assert torch.equal(emb, ref_emb) and torch.equal(mask, ref_mask)
    assert mask.shape == (1, 16) and mask.sum() == 1 and emb.abs().sum() > 0  # not zeros


def test_autocast_is_off_inside(weights):
    text = build(weights, dtype="float32")
    plain, _ = text(["a blue square"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under, _ = text(["a blue square"])
    assert torch.equal(plain, under)


def test_wrong_dim_names_the_fix(weights):
    with pytest.raises(ValueError, match="is 32-d but text_encoder.dim=2304; set text_encoder.dim: 32"):
        build(weights, dim=2304)


def test_missing_weights_is_one_line_naming_the_repo(tmp_path):
    with pytest.raises(
        MissingWeightsError, match=f"^{REPO} not in weights folder .*ablate weights download SWEEP --dir"
    ):
        build(tmp_path)


def test_hashed_words_gives_each_word_one_fixed_vector_and_masks_padding():
    from trainer.factors.text import HashedWordsConfig

    words = TEXT.build(HashedWordsConfig(dim=16, max_length=6), torch.device("cpu"))
    emb, mask = words(["large red circle, top left", "RED", ""])
    assert emb.shape == (3, 6, 16) and mask.tolist() == [
        [True] * 5 + [False],
        [True] + [False] * 5,
        [False] * 6,
    ]
    assert torch.equal(emb[0, 1], emb[1, 0])  # "red" is "red" wherever it stands, whatever its case
    assert torch.equal(emb[2], torch.zeros(6, 16))  # padding embeds to zero; the empty caption is all padding
    again = TEXT.build(HashedWordsConfig(dim=16, max_length=6), torch.device("cpu"))
    assert torch.equal(
        again(["large red circle"])[0], words(["large red circle"])[0]
    )  # same table in every arm
