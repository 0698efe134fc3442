"""Text decoding (UTF-8 / GBK / BOM / CRLF), cleaning, the empty-text placeholder, and the encodings
found over the real MVSA-Single texts."""
from __future__ import annotations

import pytest

from featcache.sources.base import read_dataset, summarize
from featcache.sources.mvsa import MVSA
from featcache.sources.text import EMPTY_TEXT, clean_text, decode_bytes, prepare_text
from mvsa_fixtures import Row, jpeg_bytes, make_dataset, require_mvsa


# ------------------------------------------------------------------------------------------- decode_bytes
def test_decode_utf8():
    assert decode_bytes("héllo wörld ✓ 😀 中文".encode("utf-8")) == ("héllo wörld ✓ 😀 中文", "utf-8")
    assert decode_bytes(b"plain ascii") == ("plain ascii", "utf-8")
    assert decode_bytes(b"") == ("", "utf-8")


def test_decode_gbk_bytes_are_not_latin1_mojibake():
    # '\xa1\xad' is an ellipsis in GBK; '\xa1\xaf' a right single quote. Neither is valid UTF-8.
    raw = "It’s over… 中文".encode("gb18030")
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    assert decode_bytes(raw) == ("It’s over… 中文", "gb18030")


def test_decode_fallbacks_cp1252_then_latin1():
    # b'\xe9' at the end is an incomplete GB18030 sequence, but 'é' in cp1252.
    assert decode_bytes(b"caf\xe9") == ("café", "cp1252")
    # 0x81 is undefined in cp1252 and incomplete in GB18030: latin-1 always decodes.
    text, enc = decode_bytes(b"x\x81")
    assert (text, enc) == ("x\x81", "latin-1")


def test_decode_bom_is_dropped():
    assert decode_bytes(b"\xef\xbb\xbfhello") == ("hello", "utf-8")
    assert decode_bytes("\ufeff中文".encode("utf-8")) == ("中文", "utf-8")
    # A BOM in front of GBK bytes (an editor that added one) must not force UTF-8.
    assert decode_bytes(b"\xef\xbb\xbf" + "…".encode("gb18030")) == ("…", "gb18030")


def test_decode_crlf_cr_and_nul():
    assert decode_bytes(b"line one\r\nline two\rline three\n") == ("line one\nline two\nline three\n", "utf-8")
    assert decode_bytes(b"a\x00b") == ("ab", "utf-8")
    assert decode_bytes("行一\r\n行二".encode("gb18030")) == ("行一\n行二", "gb18030")


def test_decode_real_gbk_files():
    root = require_mvsa()
    text, enc = decode_bytes((root / "data" / "2922.txt").read_bytes())
    assert enc == "gb18030"
    assert "PanicAtTheDisco\u2019s" in text  # a real right single quote, not 'â€™' or '¡¯'
    text, enc = decode_bytes((root / "data" / "1832.txt").read_bytes())
    assert enc == "gb18030"
    assert "#oi\u2026" in text and "\r" not in text and "\xa1" not in text


# ------------------------------------------------------------------------------------------- cleaning
@pytest.mark.parametrize("raw, cleaned", [
    ("RT @AltPress: .@PanicAtTheDisco’s new album http://t.co/abc123 #music",
     ". ’s new album music"),
    ("Loving this #sunset   at the #beach!! https://example.com/x?y=1", "Loving this sunset at the beach!!"),
    ("check www.example.org now", "check now"),
    ("RT: hello", "hello"),
    ("RTE news is not a retweet", "RTE news is not a retweet"),
    ("  multiple\n\nlines\tand   spaces  ", "multiple lines and spaces"),
    ("@only @mentions http://t.co/x", ""),
    ("中文 #标签 测试", "中文 标签 测试"),
])
def test_clean_text(raw, cleaned):
    assert clean_text(raw) == cleaned


def test_prepare_text_placeholder_and_whitespace():
    assert prepare_text("  a \n b  ", clean=False) == ("a b", False)
    assert prepare_text("http://t.co/x @bob", clean=False) == ("http://t.co/x @bob", False)
    assert prepare_text("http://t.co/x @bob", clean=True) == (EMPTY_TEXT, True)
    assert prepare_text("", clean=False) == (EMPTY_TEXT, True)
    assert prepare_text(" \n\t ", clean=False) == (EMPTY_TEXT, True)


def test_empty_texts_get_placeholder_and_are_counted(tmp_path):
    img = jpeg_bytes(0)
    rows = [Row("1", "positive", "train", b"", img),
            Row("2", "negative", "train", b"  \r\n \t", img),
            Row("3", "neutral", "train", b"@someone http://t.co/abc", img),  # empty only once cleaned
            Row("4", "null", "test", "fine text…".encode("gb18030"), img)]
    root = make_dataset(tmp_path / "d", rows)
    ds = read_dataset("mvsa", str(root))
    assert [s.text for s in ds.samples] == [EMPTY_TEXT, EMPTY_TEXT, "@someone http://t.co/abc", "fine text…"]
    assert ds.empty_texts == 2
    assert all(s.valid for s in ds.samples) and not ds.problems  # an empty text is not a problem
    assert ds.encodings == {"utf-8": 3, "gb18030": 1}
    cleaned = read_dataset("mvsa", str(root), clean_text=True)
    assert cleaned.empty_texts == 3
    assert cleaned.samples[2].text == EMPTY_TEXT
    assert cleaned.samples[2].raw_text == "@someone http://t.co/abc"  # raw text kept for the cache
    assert summarize(cleaned)["empty_texts"] == 3


# ------------------------------------------------------------------------------------------- real dataset
def test_real_dataset_counts_and_encodings():
    root = require_mvsa()
    ds = read_dataset("mvsa", str(root))
    s = summarize(ds)
    assert s["samples"] == 3710 and s["train"] == 3199 and s["test"] == 511
    assert s["labels"] == {"positive": 1910, "negative": 954, "neutral": 335}
    assert dict(ds.encodings) == {"utf-8": 2840, "gb18030": 870}
    assert s["text_encodings"] == {"utf-8": 2840, "gb18030": 870}
    assert s["invalid"] == 0 and ds.problems == []
    assert all(s.label == -1 for s in ds.samples if s.split == "test")
    assert all(0 <= s.label < len(MVSA.classes) for s in ds.samples if s.split == "train")
    by_guid = {s.guid: s for s in ds.samples}
    assert "PanicAtTheDisco\u2019s" in by_guid["2922"].raw_text
    assert "\u2026" in by_guid["1832"].raw_text
    # No text decoded by a last-resort codec, and none of the GBK ones shows UTF-8/latin-1 mojibake.
    assert not any(ch in smp.raw_text for smp in ds.samples for ch in ("\ufffd", "â€"))
