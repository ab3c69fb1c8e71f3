"""Caption cleaning before the text encoder: `prx` is what PRX's `TextTower.clean_text` does.

PRX (prx/models/text_tower.py, on by default) cleans every caption the way DeepFloyd IF's T5
front end does before tokenising it, the empty caption and the eval prompts included; the encoder
therefore never sees case, URLs, @handles, HTML entities, file names or product codes. The rules
are regular expressions over the standard library, reproduced here in PRX's order, with one part
approximated: PRX calls `ftfy.fix_text` midway, and only its deterministic fixes are done here
(`_fix_text`); ftfy's mojibake repair (text decoded with the wrong codec) is not, so a caption
whose curly quotes were mis-decoded ("â€œquoted…") keeps its garbled letters where PRX restores
the quotes (tested). Most mojibake is lowercased or hit by the punctuation rule before ftfy runs
in PRX, and no longer repairable there either ("CafÃ©" gives "cafã" in both). Well-formed
captions clean identically (tested against outputs of PRX's function).
"""

from __future__ import annotations

import html
import html.entities
import re
import unicodedata
import urllib.parse
from collections.abc import Callable
from typing import Literal

# -- the ftfy.fix_text part (ftfy 6, default settings, minus its encoding repair) -----------------
_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_C1 = re.compile("[\x80-\x9f]")
_LINE_BREAK = re.compile("\r\n?|[\u2028\u2029\x85]")
_TERMINAL_ESCAPE = re.compile(r"\x1b\[[\d;]*[a-zA-Z]")
# Latin ligatures → letters; half- and full-width forms (and the ideographic space) → normal width;
# curly quotes and the modifier apostrophe → ASCII quotes.
_CHARS = {ord(c): unicodedata.normalize("NFKC", c) for c in "ĲĳŉǄǅǆǇǈǉǊǋǌǱǲǳﬀﬁﬂﬃﬄﬆ"}
_CHARS |= {ord("ﬅ"): "ſt", 0x3000: " "}
_CHARS |= {i: unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0)}
_CHARS |= {i: "'" for i in (0x02BC, *range(0x2018, 0x201C))} | {i: '"' for i in range(0x201C, 0x2020)}
_CHARS = {i: s for i, s in _CHARS.items() if s != chr(i)}
# control characters nobody means to type (C0 but tab and line breaks, DEL, deprecated format
# characters, the byte order mark, interlinear annotation)
_CONTROL = dict.fromkeys([*range(0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF])
_CONTROL |= dict.fromkeys(range(0xFFF9, 0xFFFD))


def _entity(match: re.Match) -> str:
    """One `&name;` / `&#n;` entity → its character, when it is unambiguously one."""
    text = match.group()
    if text.startswith("&#"):
        out = html.unescape(text)
        return text if ";" in out else out
    return html.entities.html5.get(text[1:], text)


def _c1_as_windows_1252(match: re.Match) -> str:
    try:
        return match.group().encode("latin-1").decode("cp1252")
    except UnicodeDecodeError:  # 0x81, 0x8d, 0x8f, 0x90, 0x9d: undefined there, kept
        return match.group()


def _fix_text(text: str) -> str:
    """ftfy.fix_text without its mojibake repair: line by line, until nothing changes, unescape HTML
    entities (until a line has a '<': then in no later line either, as ftfy does), read stray C1
    controls as Windows-1252, normalise ligatures, widths and quotes, unify line breaks, drop
    terminal escapes and control characters, NFC."""
    out, unescape = [], True
    for line in text.split("\n"):
        unescape = unescape and "<" not in line
        while True:
            before = line
            if unescape:
                line = _ENTITY.sub(_entity, line)
            line = _C1.sub(_c1_as_windows_1252, line).translate(_CHARS)
            line = _TERMINAL_ESCAPE.sub("", _LINE_BREAK.sub("\n", line)).translate(_CONTROL)
            line = unicodedata.normalize("NFC", line)
            if line == before:
                break
        out.append(line)
    return "\n".join(out)


# -- PRX's rules, in its order ----------------------------------------------------------------------
_URL = (  # a scheme; or a host with one of these TLDs and its path (so "https://a.io/b" leaves "a.io/b")
    r"\b((?:https?|www):(?:/{1,3}|[a-zA-Z0-9%])"
    r"|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b/?(?!@))"
)
_DASHES = "\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030\u30a0\ufe31\ufe32\ufe58\ufe63\uff0d"
_FILE_TYPES = "png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4"
_BEFORE_FTFY = [
    (r"<person>", "person"),
    (_URL, ""),
    (r"@[\w\d]+\b", ""),  # @handles
    (r"[\u31c0-\u9fff]+", ""),  # CJK strokes, symbols, enclosed letters, unified ideographs
    (f"[{_DASHES}]+", "-"),  # every dash → "-"
    (r"[`´«»“”¨]", '"'),
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),  # article ids
    (r"\\n", " "),  # a literal backslash-n
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (rf"[\S]+\.(?:{_FILE_TYPES})", ""),  # file names
    (r"[\"']{2,}", '"'),
    (r"[\.]{2,}", " "),
    (r"[#®•©™&@·º½¾¿¡§~)(\]\[}{|\\/*]+", " "),  # stray punctuation
    (r"\s+\.\s+", " "),
]
_AFTER_FTFY = [
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # product codes: jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (rf"\b(?:{_FILE_TYPES})(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes: 1920x1080
    (r"\b\s+\:\s+", ": "),
    (r"(\D[,\./])\b", r"\1 "),  # a space after punctuation
    (r"\s+", " "),
]
_ENDS = [  # on the stripped caption
    (r"^[\"']([\w\W]+)[\"']$", r"\1"),  # surrounding quotes
    (r"^['_,\-:;]", ""),
    (r"['_,\-:\-+]$", ""),
    (r"^\.\S+$", ""),
]
_BEFORE_FTFY, _AFTER_FTFY, _ENDS = (
    [(re.compile(p), r) for p, r in rules] for rules in (_BEFORE_FTFY, _AFTER_FTFY, _ENDS)
)


def clean_prx(caption: str) -> str:
    """A caption as PRX's text tower cleans it (DeepFloyd IF's cleaning), before tokenising.

    In order: URL-unquote (`+` becomes a space), strip, lowercase, `<person>` → person; remove URLs
    (a scheme, or a host ending in .com/.co/.ru/.net/.org/.edu/.gov/.it with its path), @handles and
    CJK ideographs; every dash → "-", typographic quotes → ASCII, drop `&quot`/`&amp`, IP addresses,
    trailing article ids, literal "\\n", "#123" tags, 6+ digit numbers and file names; repeated
    quotes → one, "..." and stray punctuation (#®•©™&@·º½¾¿¡§~()[]{}|\\/*) → a space; more than three
    "-"/"_" → spaces (slug-like captions); ftfy's text fixes (see the module docstring), HTML
    unescaped twice; remove product codes (jc6640), "free shipping", "download", "click for …",
    file-type words, "page 12", sizes (1920x1080); tidy spaces around ":" and after ",./", collapse
    whitespace; drop surrounding quotes and a leading/trailing quote, "_", ",", "-", ":" (or "+" at
    the end); a lone ".word" becomes empty.
    """
    text = urllib.parse.unquote_plus(str(caption)).strip().lower()
    for pattern, repl in _BEFORE_FTFY:
        text = pattern.sub(repl, text)
    if len(re.findall(r"[-_]", text)) > 3:  # this-is-my-cute-cat
        text = re.sub(r"[-_]", " ", text)
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    for pattern, repl in _AFTER_FTFY:
        text = pattern.sub(repl, text)
    text = text.strip()
    for pattern, repl in _ENDS:
        text = pattern.sub(repl, text)
    return text.strip()


# `text_encoder.clean`: the name of a cleaning step → the function (None: captions as they are)
Cleaning = Literal["prx", "none"]
CLEANERS: dict[str, Callable[[str], str] | None] = {"prx": clean_prx, "none": None}
