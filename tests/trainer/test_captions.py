"""Caption cleaning: `clean_prx` against outputs of PRX's own `TextTower.clean_text`, and where it applies."""

import pytest
import torch
from trainer_testing import merge

from trainer.config import TrainConfig
from trainer.factors.captions import clean_prx
from trainer.factors.text import TEXT, HashedWordsConfig, T5GemmaConfig, TinyT5Config

# (caption, what PRX's TextTower.clean_text returns for it: Photoroom/PRX 1a052fd with ftfy 6.3.1)
PRX_OUTPUTS = [
    ("A Photo of a CAT sitting on a mat.", "a photo of a cat sitting on a mat."),
    ("Check https://www.example.com/path/to/page and www.foo.org now", "check and now"),
    ("see https://foo.io/bar for more", "see foo. io bar for more"),  # only the listed TLDs go whole
    ("<p>Hello &amp; welcome</p> &lt;b&gt;", "<p>hello ; welcome< p> lt;b gt;"),  # '&' is punctuation first
    ("Follow @john_doe99 on twitter! #123 #45678 1234567", "follow on twitter!"),
    ("IMG_1234.jpg — a sunset   over\tthe   sea…", "a sunset over the sea…"),
    ("“Curly” ‘quotes’ «guillemets»", "curly\" 'quotes' \"guillemets"),
    ("this-is-my-cute-cat-photo", "this is my cute cat photo"),
    ("Free shipping! Download free wallpaper 1920x1080 png images page 12", "! wallpaper"),
    ("Product jc6640 and 6640vc231", "product and"),
    ("ＬＯＵＤ\u3000ＮＯＩＳＥＳ ﬁne ﬂour", "loud noises fine flour"),  # widths and ligatures (ftfy)
    ("a+b%20c", "a b c"),  # URL-unquoted first
    ("'a quoted caption'", "a quoted caption"),
    ("- leading dash, trailing comma,", "leading dash, trailing comma"),
    (
        "server 192.168.0.1 text with \\n literal and\nreal newline",
        "server text with literal and real newline",
    ),
    ("中文 mixed 漢字 text", "mixed text"),
    ("word...word ***stars*** [brackets] a|b a/b", "word word stars brackets a b a b"),
    ("<person> walks a dog", "person walks a dog"),
    ("", ""),
]


def test_clean_prx_gives_what_prx_gives():
    assert [clean_prx(caption) for caption, _ in PRX_OUTPUTS] == [out for _, out in PRX_OUTPUTS]
    # the one part left out: ftfy's mojibake repair (PRX: "quoted"), see trainer/factors/captions.py
    assert clean_prx("â€œquotedâ€\x9d") == "â€œquotedâ€\x9d"


def test_the_encoder_cleans_every_caption_it_encodes():
    """One place: the training captions, the empty caption (dropout, CFG) and the eval prompts all go
    through TextEncoder.forward, as do the captions `ablate cache` stores."""

    def encoder(clean):
        return TEXT.build(TinyT5Config(d_model=32, max_length=48, clean=clean), torch.device("cpu"))

    raw = ["A CAT, see https://example.com/cat.jpg", "  Two  DOGS @shelter  "]
    cleaned, plain = encoder("prx"), encoder("none")
    for got, want in zip(cleaned(raw), plain([clean_prx(c) for c in raw]), strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(cleaned(raw)[0], plain(raw)[0])
    assert all(torch.equal(a, b) for a, b in zip(cleaned.empty(), plain.empty(), strict=True))


def test_defaults_and_a_bad_value(tiny_cfg):
    assert T5GemmaConfig().clean == "prx"  # the study's encoder cleans as PRX does
    assert TinyT5Config().clean == HashedWordsConfig().clean == "none"  # tests' and demo's: unchanged
    with pytest.raises(ValueError, match=r"text_encoder\.tiny-t5\.clean\s+Input should be 'prx' or 'none'"):
        TrainConfig.model_validate(merge(tiny_cfg, {"text_encoder": {"clean": "deepfloyd"}}))
