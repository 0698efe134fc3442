"""Tweet text: decoding bytes of unknown encoding, optional cleaning, the empty-text placeholder.

MVSA's text files are mostly UTF-8, but about a quarter of MVSA-Single was saved as GBK (GB18030):
'\xa1\xad' is an ellipsis there, not two Latin-1 letters. Decoding order matters: UTF-8 is strict and
rarely decodes non-UTF-8 by accident, GB18030 is tried next, and cp1252 / latin-1 are last resorts
(latin-1 never fails, so every file gets *some* text, and the counts say how it was obtained).
"""
from __future__ import annotations

import re

# Tried in order; the first that decodes without error wins. latin-1 maps every byte, so it never fails.
ENCODINGS = ("utf-8", "gb18030", "cp1252", "latin-1")
EMPTY_TEXT = "[empty]"

_URL = re.compile(r"https?://\S+|www\.\S+")
_USER = re.compile(r"@\w+")
_HASH = re.compile(r"#(\w+)")
_SPACE = re.compile(r"\s+")


def decode_bytes(raw: bytes) -> tuple[str, str]:
    """Return (text, encoding used). A UTF-8 BOM is dropped; CRLF becomes LF."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    for enc in ENCODINGS:
        try:
            text = raw.decode(enc)
            break
        except UnicodeDecodeError:
            continue
    # Stray NULs come from binary junk; they would end a C string in the tokenizer.
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", ""), enc


def clean_text(text: str) -> str:
    """Remove URLs and @user mentions, keep the word of a #hashtag, collapse whitespace.

    The hashtag word is kept because it often carries the sentiment (#blessed, #fail); only the '#' goes.
    A leading retweet marker 'RT' is removed too: it is present in a third of MVSA and says nothing.
    """
    text = _URL.sub(" ", text)
    text = _USER.sub(" ", text)
    text = _HASH.sub(r"\1", text)
    text = re.sub(r"^\s*RT\b:?", " ", text)
    return _SPACE.sub(" ", text).strip(" :")


def append_captions(texts: list[str], captions: list[str], tokenizer=None) -> list[str]:
    """`text [SEP] caption` (--caption-mode append), with the tokenizer's own separator when it has one.

    Extraction and stage 2 (which rebuilds the texts from the cache) both call this: the strings must match."""
    sep = getattr(tokenizer, "sep_token", None) or "."
    return [f"{t} {sep} {c}" if c else t for t, c in zip(texts, captions)]


def prepare_text(raw_text: str, clean: bool) -> tuple[str, bool]:
    """The text a backbone sees, and whether it was empty (and so replaced by the placeholder)."""
    text = clean_text(raw_text) if clean else _SPACE.sub(" ", raw_text).strip()
    if not text:
        return EMPTY_TEXT, True
    return text, False
