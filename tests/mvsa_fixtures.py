"""Helpers for tests that need MVSA-layout data: the real dataset (read in place, never copied) and tiny
generated datasets with every kind of bad input.

    make_dataset(root, samples)   writes DIR/train.txt, DIR/test_without_label.txt (with the `guid,tag`
                                  header) and DIR/data/GUID.txt|jpg for a list of `Row`s.
    BAD_CASES                     one generator per bad-input kind: rows to write + the problem expected.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

MVSA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "mvsa"
LABEL_FILE = {"train": "train.txt", "test": "test_without_label.txt"}


def require_mvsa() -> Path:
    """The real MVSA-Single folder (../shared/mvsa next to the repo), or skip the test."""
    if not (MVSA_DIR / "train.txt").exists() or not (MVSA_DIR / "data").is_dir():
        pytest.skip(f"real MVSA-Single dataset not found at {MVSA_DIR} (expected train.txt and data/)")
    return MVSA_DIR


# ----------------------------------------------------------------------------------------- image bytes
def pattern(seed: int, size: tuple[int, int] = (64, 64)) -> np.ndarray:
    """A smooth, seed-dependent RGB picture (uint8 HxWx3): different seeds give clearly different features."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    chans = [np.sin(2 * np.pi * (rng.uniform(0.5, 3) * xx + rng.uniform(0.5, 3) * yy + rng.uniform()))
             for _ in range(3)]
    return ((np.stack(chans, -1) * 0.5 + 0.5) * 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (64, 64), quality: int = 90) -> bytes:
    return encode(Image.fromarray(pattern(seed, size)), "JPEG", quality=quality)


def noise_jpeg_bytes(seed: int = 0, size: tuple[int, int] = (128, 128)) -> bytes:
    """Incompressible content, so half of the file is clearly half of the scan data."""
    a = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    return encode(Image.fromarray(a), "JPEG", quality=90)


def truncated_jpeg_bytes(seed: int = 0) -> bytes:
    data = noise_jpeg_bytes(seed)
    return data[: len(data) // 2]


def cmyk_jpeg_bytes(seed: int = 0) -> bytes:
    return encode(Image.fromarray(pattern(seed)).convert("CMYK"), "JPEG", quality=90)


def palette_png_bytes(seed: int = 0) -> bytes:
    """Mode P with a transparent palette entry (a GIF-style logo)."""
    img = Image.fromarray(pattern(seed)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(img, "PNG", transparency=0)


def rgba_png_bytes(seed: int = 0) -> bytes:
    a = pattern(seed)
    alpha = np.full(a.shape[:2], 255, np.uint8)
    alpha[:, : a.shape[1] // 2] = 0  # left half fully transparent
    return encode(Image.fromarray(np.dstack([a, alpha]), mode="RGBA"), "PNG")


def gray16_png_bytes(seed: int = 0) -> bytes:
    a = pattern(seed)[..., 0].astype(np.uint16) * 257
    img = Image.fromarray(a)  # uint16 -> mode I;16
    assert img.mode == "I;16", img.mode
    return encode(img, "PNG")


def png_bytes(seed: int = 0) -> bytes:
    return encode(Image.fromarray(pattern(seed)), "PNG")


def corrupt_bytes(seed: int = 0) -> bytes:
    return b"this is not a picture at all " + np.random.default_rng(seed).bytes(300)


# ----------------------------------------------------------------------------------------- datasets
@dataclass
class Row:
    """One line of a label file, and (when `files`) the sample's data/GUID.txt and data/GUID.jpg.

    text / image None: that file is not written (a missing file). files=False: a label line only
    (e.g. a duplicate guid), the data files are left as they are."""
    guid: str
    tag: str = "positive"
    split: str = "train"
    text: bytes | None = None
    image: bytes | None = None
    files: bool = True


def good_row(guid: str, seed: int, tag: str = "positive", split: str = "train") -> Row:
    return Row(guid, tag if split == "train" else "null", split,
               text=f"tweet number {guid}: a fine day #{tag} http://t.co/x{seed}".encode(),
               image=jpeg_bytes(seed))


def make_dataset(root, samples: list[Row], *, bom: dict | None = None, crlf: dict | None = None,
                 extra_lines: dict | None = None) -> Path:
    """Write a tiny MVSA-Single layout dataset under `root` and return its path.

    bom / crlf: {"train": True, ...} writes that label file with a UTF-8 BOM / CRLF line endings.
    extra_lines: {"train": ["garbage line"]} appended verbatim to that label file."""
    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    bom, crlf, extra_lines = bom or {}, crlf or {}, extra_lines or {}
    for split, fname in LABEL_FILE.items():
        lines = ["guid,tag"] + [f"{r.guid},{r.tag}" for r in samples if r.split == split]
        lines += extra_lines.get(split, [])
        eol = "\r\n" if crlf.get(split) else "\n"
        raw = (eol.join(lines) + eol).encode()
        if bom.get(split):
            raw = b"\xef\xbb\xbf" + raw
        (root / fname).write_bytes(raw)
    for r in samples:
        if not r.files:
            continue
        if r.text is not None:
            (root / "data" / f"{r.guid}.txt").write_bytes(r.text)
        if r.image is not None:
            (root / "data" / f"{r.guid}.jpg").write_bytes(r.image)
    return root


# ----------------------------------------------------------------------------------------- bad kinds
@dataclass
class BadCase:
    """One kind of bad input. `rows(guid, seed)` makes its label lines and files; `expect` lists the
    problems it must produce as (kind, file, fatal): file is the Problem.file (may be 'train.txt:LINE',
    matched by prefix). `decoded`: only found when images are decoded (scan_images / extraction)."""
    name: str
    rows: Callable[[str, int], list[Row]]
    expect: list[tuple[str, str, bool]]
    decoded: bool = False
    label_opts: dict = field(default_factory=dict)  # make_dataset kwargs (bom / crlf / extra_lines)
    file_level: bool = False  # the problem concerns a label file, not a guid (reported with guid '-')

    @property
    def fatal(self) -> bool:
        return any(f for _, _, f in self.expect)


def _text(guid):
    return f"text of {guid}".encode()


def _img_case(name, make_image, expect_kinds, fatal):
    def rows(guid, seed):
        return [Row(guid, "negative", "train", _text(guid), make_image(seed))]
    return BadCase(name, rows, [(k, "{guid}.jpg", fatal if k not in ("mode", "format") else False)
                                for k in expect_kinds], decoded=True)


BAD_CASES: list[BadCase] = [
    BadCase("missing_image", lambda g, s: [Row(g, "positive", "train", _text(g), None)],
            [("missing", "{guid}.jpg", True)]),
    BadCase("missing_text", lambda g, s: [Row(g, "positive", "train", None, jpeg_bytes(s))],
            [("missing", "{guid}.txt", True)]),
    _img_case("empty_image", lambda s: b"", ["empty"], True),
    _img_case("truncated_jpeg", truncated_jpeg_bytes, ["truncated"], True),
    _img_case("corrupt_jpg", corrupt_bytes, ["corrupt"], True),
    _img_case("cmyk_jpeg", cmyk_jpeg_bytes, ["mode"], False),
    # Every MVSA image is named GUID.jpg, so a PNG is also reported as a misnamed file (repaired as well).
    _img_case("palette_png_transparency", palette_png_bytes, ["format", "mode"], False),
    _img_case("rgba_png", rgba_png_bytes, ["format", "mode"], False),
    _img_case("gray16_png", gray16_png_bytes, ["format", "mode"], False),
    _img_case("png_named_jpg", png_bytes, ["format"], False),
    # 300x300 = 90,000 px: over the limit the tests pass (HUGE_LIMIT), far under the default.
    _img_case("huge_image", lambda s: jpeg_bytes(s, (300, 300)), ["too_large"], True),
    BadCase("duplicate_same_tag",
            lambda g, s: [Row(g, "neutral", "train", _text(g), jpeg_bytes(s)), Row(g, "neutral", "train", files=False)],
            [("duplicate", "train.txt:", False)]),
    BadCase("duplicate_same_null_tag",
            lambda g, s: [Row(g, "null", "test", _text(g), jpeg_bytes(s)), Row(g, "null", "test", files=False)],
            [("duplicate", "test_without_label.txt:", False)]),
    BadCase("duplicate_other_tag",
            lambda g, s: [Row(g, "positive", "train", _text(g), jpeg_bytes(s)), Row(g, "negative", "train", files=False)],
            [("duplicate", "train.txt:", True)]),
    BadCase("unknown_tag", lambda g, s: [Row(g, "happyish", "train", _text(g), jpeg_bytes(s))],
            [("unknown_tag", "train.txt:", True)]),
    BadCase("null_tag_in_train", lambda g, s: [Row(g, "null", "train", _text(g), jpeg_bytes(s))],
            [("unknown_tag", "train.txt:", True)]),
    BadCase("bom_label_file", lambda g, s: [], [("bom", "train.txt", False)],
            label_opts={"bom": {"train": True}}, file_level=True),
    BadCase("crlf_label_file", lambda g, s: [], [("crlf", "test_without_label.txt", False)],
            label_opts={"crlf": {"test": True}}, file_level=True),
    # Square brackets: problem lines are printed through rich, where '[/oops]' would be a markup error.
    BadCase("malformed_label_line", lambda g, s: [], [("bad_line", "train.txt:", False)],
            label_opts={"extra_lines": {"train": ["[/oops],positive,extra"]}}, file_level=True),
]
BAD_BY_NAME = {c.name: c for c in BAD_CASES}
HUGE_LIMIT = 50_000  # max_image_pixels for every generated-dataset extraction: good images are 64x64


def merge_label_opts(cases) -> dict:
    out: dict = {}
    for c in cases:
        for k, v in c.label_opts.items():
            if k == "extra_lines":
                for split, lines in v.items():
                    out.setdefault(k, {}).setdefault(split, []).extend(lines)
            else:
                out.setdefault(k, {}).update(v)
    return out


def expected_problems(case: BadCase, guid: str) -> list[tuple[str, str, str, bool]]:
    """(guid, kind, file, fatal) as the reader should report them ('-' as guid for label-file problems)."""
    return [("-" if case.file_level else guid, kind, file.format(guid=guid), fatal)
            for kind, file, fatal in case.expect]


@dataclass
class Corpus:
    root: Path
    good: list[Row]  # clean samples
    guids: dict[str, str]  # bad case name -> its guid
    rows: dict[str, list[Row]]  # bad case name -> the label lines / files written for it

    def expected_valid(self) -> dict[str, bool]:
        """guid -> valid flag the cache must hold, for every sample."""
        out = {r.guid: True for r in self.good}
        for name, guid in self.guids.items():
            if not BAD_BY_NAME[name].file_level:
                out[guid] = not BAD_BY_NAME[name].fatal
        return out

    def valid_rows(self) -> list[Row]:
        """The label lines and files of every sample that must stay valid (good and repaired ones)."""
        rows = list(self.good)
        for name, case_rows in self.rows.items():
            if not BAD_BY_NAME[name].fatal and not BAD_BY_NAME[name].file_level:
                rows.append(case_rows[0])
        return rows


def bad_corpus(root, n_good: int = 6, first_guid: int = 100) -> Corpus:
    """A dataset with `n_good` clean samples (the last one a test sample) and one guid per bad case."""
    good = [good_row(str(first_guid + k), seed=k, tag=("positive", "negative", "neutral")[k % 3],
                     split="test" if k == n_good - 1 else "train") for k in range(n_good)]
    rows, guids, case_rows = list(good[:-1]), {}, {}
    for j, case in enumerate(BAD_CASES):
        guid = str(first_guid + 100 + j)
        guids[case.name] = guid
        case_rows[case.name] = case.rows(guid, 1000 + j)
        rows += case_rows[case.name]
    rows.append(good[-1])
    path = make_dataset(root, rows, **merge_label_opts(BAD_CASES))
    return Corpus(path, good, guids, case_rows)
