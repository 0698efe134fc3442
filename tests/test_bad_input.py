"""Every kind of bad input: a named problem (guid + file), the sample marked invalid (fatal) or repaired,
both when reading (the mvsa reader / scan_images) and through a real extraction with the default backbones;
--strict refuses before any model is loaded; random bytes never crash the reader."""
from __future__ import annotations

import io
import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

import featcache.extract.engine as fx
from featcache.extract.config import ExtractConfig
from featcache.extract.engine import StrictError, extract
from featcache.sources.base import read_dataset, scan_images, summarize
from featcache.sources.images import load_rgb
from featcache.cache.store import CacheReader, partial_path
from mvsa_fixtures import (BAD_BY_NAME, BAD_CASES, HUGE_LIMIT, LABEL_FILE, Row, bad_corpus, cmyk_jpeg_bytes,
                           expected_problems, good_row, gray16_png_bytes, jpeg_bytes, make_dataset,
                           palette_png_bytes, png_bytes, rgba_png_bytes)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _quiet_console():
    return Console(file=io.StringIO(), width=1000, force_terminal=False)


def _run(data, out, **kw):
    console = _quiet_console()
    cfg = ExtractConfig(data=str(data), out=str(out), max_image_pixels=HUGE_LIMIT, **kw)
    path = extract(cfg, progress=False, console=console)
    return path, console.file.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return bad_corpus(tmp_path_factory.mktemp("bad") / "mvsa")


@pytest.fixture(scope="module")
def extracted(corpus, tmp_path_factory):
    """The bad corpus (decoded in a worker process) and a dataset of only its valid samples, both extracted."""
    tmp = tmp_path_factory.mktemp("bad_extract")
    bad, log = _run(corpus.root, tmp / "bad.h5", batch_size=4, workers=1)
    clean_root = make_dataset(tmp / "clean", corpus.valid_rows())
    clean, _ = _run(clean_root, tmp / "clean.h5", batch_size=5, workers=0)
    return {"bad": bad, "clean": clean, "log": log}


def _label_line(root, case_name, rows, guid):
    """Line number (1-based) of the label line a problem must point at."""
    case = BAD_BY_NAME[case_name]
    split = rows[-1].split if rows else "train"
    for split_name, opts in case.label_opts.get("extra_lines", {}).items():
        lines = (root / LABEL_FILE[split_name]).read_bytes().decode("utf-8-sig").splitlines()
        return lines.index(opts[0]) + 1
    lines = (root / LABEL_FILE[split]).read_text().splitlines()
    return max(i for i, line in enumerate(lines) if line.startswith(f"{guid},")) + 1


def _check_problems(problems, case, guid, root, rows):
    """Exactly the expected problems, each naming the guid and the file, with the right fatality."""
    expected = expected_problems(case, guid)
    assert len(problems) == len(expected), [str(p) for p in problems]
    for want_guid, kind, file, fatal in expected:
        match = [p for p in problems if p.kind == kind]
        assert len(match) == 1, (kind, [str(p) for p in problems])
        p = match[0]
        assert p.guid == want_guid and p.fatal == fatal
        if file.endswith(":"):  # a label-file line: the exact line number
            assert p.file == f"{file}{_label_line(root, case.name, rows, guid)}", str(p)
        else:
            assert p.file == file, str(p)
        text = str(p)
        assert p.file in text and ("invalid" if fatal else "repaired") in text and p.message in text
        if not case.file_level:
            assert f"guid {guid}" in text
        assert len(p.message) > 15


@pytest.mark.parametrize("case", BAD_CASES, ids=[c.name for c in BAD_CASES])
def test_bad_input_kind(case, tmp_path, corpus, extracted):
    # --- alone with one good sample, through the reader (+ scan_images when it takes decoding to see it)
    guid = "500"
    rows = case.rows(guid, 7)
    root = make_dataset(tmp_path / "d", [good_row("1", 0)] + rows + [good_row("2", 1, split="test")],
                        **case.label_opts)
    ds = read_dataset("mvsa", str(root))
    if case.decoded:
        assert [p for p in ds.problems if p.guid == guid] == [], "image problems need decoding to be found"
        scan_images(ds, HUGE_LIMIT)
    _check_problems(ds.problems, case, guid, root, rows)
    valid = {s.guid: s.valid for s in ds.samples}
    assert valid["1"] and valid["2"]
    if not case.file_level:
        assert valid[guid] is (not case.fatal)
        assert [s.guid for s in ds.samples].count(guid) == 1  # duplicates never make two rows
    assert summarize(ds)["invalid"] == int(case.fatal)

    # --- through the real extraction of the whole bad corpus
    cguid = corpus.guids[case.name]
    with CacheReader(extracted["bad"]) as r:
        guids, flags, meta = r.strings("samples/guid"), r.array("samples/valid"), r.meta
        img = r.array("image/pooled")
    for want_guid, kind, file, fatal in expected_problems(case, cguid):
        lines = [p for p in meta["problems"] if p.startswith(f"[{kind}] guid {want_guid} ({file}")]
        assert len(lines) == 1, (kind, want_guid, file, meta["problems"])
        assert lines[0].endswith("-> invalid" if fatal else "-> repaired")
        assert f"[{kind}] guid {want_guid} ({file}" in extracted["log"]  # the end-of-run summary too
    if not case.file_level:
        row = guids.index(cguid)
        assert bool(flags[row]) is (not case.fatal)
        assert bool(np.abs(img[row]).sum() == 0) is case.fatal


def test_valid_flags_rows_and_counts(corpus, extracted):
    expected = corpus.expected_valid()
    with CacheReader(extracted["bad"]) as r:
        guids, flags, meta = r.strings("samples/guid"), r.array("samples/valid"), r.meta
        done, labels, splits = r.array("samples/done"), r.array("samples/label"), r.strings("samples/split")
    assert sorted(guids) == sorted(expected) and len(set(guids)) == len(guids)
    assert {g: bool(v) for g, v in zip(guids, flags)} == expected
    assert done.all()
    n_invalid = sum(not v for v in expected.values())
    assert meta["dataset"]["invalid"] == n_invalid == 9
    assert meta["dataset"]["samples"] == len(expected)
    row = dict(zip(guids, range(len(guids))))
    assert splits[row[corpus.guids["duplicate_same_null_tag"]]] == "test"
    assert labels[row[corpus.guids["duplicate_same_tag"]]] == 1  # neutral
    counts = meta["dataset"]["problems"]
    assert counts["missing"] == 2 and counts["duplicate"] == 3 and counts["unknown_tag"] == 2
    assert counts["format"] == 4 and counts["mode"] == 4
    assert all(counts[k] == 1 for k in ("empty", "truncated", "corrupt", "too_large", "bom", "crlf", "bad_line"))


def test_meta_problems_name_every_bad_guid(corpus, extracted):
    with CacheReader(extracted["bad"]) as r:
        problems = r.meta["problems"]
    text = "\n".join(problems)
    for name, guid in corpus.guids.items():
        if not BAD_BY_NAME[name].file_level:
            assert f"guid {guid} (" in text, name
    for r in corpus.good:
        assert f"guid {r.guid} " not in text
    assert len(problems) == sum(len(c.expect) for c in BAD_CASES)


def test_invalid_rows_have_zero_image_features(extracted):
    with CacheReader(extracted["bad"]) as r:
        flags = r.array("samples/valid")
        tokens, pooled = r.array("image/tokens"), r.array("image/pooled")
        text_pooled = r.array("text/pooled")
    assert (~flags).sum() == 9
    assert not tokens[~flags].any() and not pooled[~flags].any()
    assert (np.abs(pooled[flags]).sum(axis=1) > 0).all()
    assert np.isfinite(tokens.astype(np.float32)).all() and np.isfinite(pooled).all()
    assert (np.abs(text_pooled).sum(axis=1) > 0).all()  # text features exist for every row


def test_valid_rows_equal_a_clean_run(corpus, extracted):
    """Good and repaired samples get the same features whatever bad samples share their batches."""
    with CacheReader(extracted["bad"]) as bad, CacheReader(extracted["clean"]) as clean:
        bad_row = {g: i for i, g in enumerate(bad.strings("samples/guid"))}
        clean_guids = clean.strings("samples/guid")
        assert clean.meta["dataset"]["invalid"] == 0
        arrays = {name: (bad.array(name), clean.array(name))
                  for name in ("image/pooled", "text/pooled", "image/tokens", "text/mask")}
    assert len(clean_guids) == 13
    for j, guid in enumerate(clean_guids):
        i = bad_row[guid]
        for name, (a, b) in arrays.items():
            if name == "text/mask":
                assert np.array_equal(a[i], b[j])
            else:
                np.testing.assert_allclose(a[i].astype(np.float32), b[j].astype(np.float32),
                                           atol=1e-3 if "pooled" in name else 1e-2, err_msg=f"{guid} {name}")


def test_repaired_images_are_sensible():
    """Alpha is composited on white, palette transparency honoured, 16-bit grey rescaled, CMYK converted."""
    def load(data):
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "x.jpg")
            open(p, "wb").write(data)
            img, notes = load_rgb(p)
            return np.asarray(img), {n.kind for n in notes}
    a, kinds = load(rgba_png_bytes(3))
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3) and (a[:, :32] == 255).all()
    assert kinds == {"mode", "format"}
    a, _ = load(palette_png_bytes(3))
    src = Image.open(io.BytesIO(palette_png_bytes(3)))
    transparent = np.asarray(src) == 0
    assert transparent.any() and (a[transparent] == 255).all()
    a, _ = load(gray16_png_bytes(3))
    assert a.min() == 0 and a.max() == 255 and (a[..., 0] == a[..., 1]).all()
    a, kinds = load(cmyk_jpeg_bytes(3))
    assert kinds == {"mode"} and a.shape == (64, 64, 3)
    a, kinds = load(png_bytes(3))
    assert kinds == {"format"}


# ------------------------------------------------------------------------------------------- --strict
def _no_models(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a backbone was loaded")
    monkeypatch.setattr(fx, "create_text", boom)
    monkeypatch.setattr(fx, "create_image", boom)


def test_strict_cli_refuses_before_any_model(corpus, tmp_path, monkeypatch):
    from cli import featcache_app
    _no_models(monkeypatch)
    out = tmp_path / "strict.h5"
    res = CliRunner().invoke(featcache_app, ["extract", "--data", str(corpus.root), "--out", str(out),
                                             "--strict", "--no-progress", "--max-image-pixels", str(HUGE_LIMIT)])
    assert res.exit_code == 1, res.output
    assert "--strict" in res.output and "nothing was extracted" in res.output
    assert "[/oops],positive,extra" in res.output  # quoted user text is printed literally
    assert "Traceback" not in res.output
    for name, guid in corpus.guids.items():
        if not BAD_BY_NAME[name].file_level:
            assert f"guid {guid} (" in res.output, name
    for kind in ("truncated", "corrupt", "too_large", "duplicate", "unknown_tag", "bom", "crlf", "bad_line"):
        assert f"[{kind}]" in res.output
    assert not out.exists() and not os.path.exists(partial_path(str(out)))
    assert list(tmp_path.iterdir()) == []  # no cache, no partial, no lock


def test_strict_passes_clean_data_then_loads_models(tmp_path, monkeypatch):
    """On clean input --strict lets the run continue: it reaches model loading (stopped here on purpose)."""
    root = make_dataset(tmp_path / "d", [good_row("1", 0), good_row("2", 1, "negative"),
                                          good_row("3", 2, split="test")])
    calls = []

    def stop(*a, **k):
        calls.append(a)
        raise RuntimeError("stop before the model runs")
    monkeypatch.setattr(fx, "create_text", stop)
    with pytest.raises(RuntimeError, match="stop before"):
        extract(ExtractConfig(data=str(root), out=str(tmp_path / "x.h5")), strict=True, progress=False,
                console=_quiet_console())
    assert len(calls) == 1


def test_strict_library_error_lists_problems(tmp_path, monkeypatch):
    _no_models(monkeypatch)
    root = make_dataset(tmp_path / "d", [good_row("1", 0), Row("77", "positive", "train", b"t", b"")])
    with pytest.raises(StrictError, match=r"\[empty\] guid 77 \(77\.jpg\)"):
        extract(ExtractConfig(data=str(root), out=str(tmp_path / "x.h5")), strict=True, progress=False,
                console=_quiet_console())
    assert not (tmp_path / "x.h5").exists()


# ------------------------------------------------------------------------------------------- property
_REAL = [jpeg_bytes(1), png_bytes(2), palette_png_bytes(3), gray16_png_bytes(4), cmyk_jpeg_bytes(5),
         rgba_png_bytes(6)]
_MAGIC = [b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"II*\x00"]

image_bytes = st.one_of(
    st.binary(max_size=1024),
    st.tuples(st.sampled_from(_MAGIC), st.binary(max_size=512)).map(lambda t: t[0] + t[1]),
    # real pictures cut short, with junk appended, or with one byte overwritten
    st.tuples(st.sampled_from(_REAL), st.floats(0, 1), st.binary(max_size=8))
    .map(lambda t: t[0][: int(len(t[0]) * t[1])] + t[2]),
    st.tuples(st.sampled_from(_REAL), st.floats(0, 1), st.integers(0, 255))
    .map(lambda t: (lambda b, i: b[:i] + bytes([t[2]]) + b[i + 1:])(t[0], int((len(t[0]) - 1) * t[1]))),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.binary(max_size=300), image=image_bytes)
def test_random_bytes_never_raise(text, image):
    with tempfile.TemporaryDirectory() as d:
        root = make_dataset(os.path.join(d, "m"), [Row("9", "positive", "train", text, image)])
        ds = read_dataset("mvsa", str(root))
        (s,) = ds.samples
        assert isinstance(s.text, str) and s.text and "\r" not in s.text and "\x00" not in s.text
        img, notes = load_rgb(s.image_path, max_pixels=1_000_000, draft_size=256)
        if img is None:
            assert any(n.fatal for n in notes), notes
            assert all(n.message.startswith("9.jpg: ") for n in notes)
        else:
            assert img.mode == "RGB" and not any(n.fatal for n in notes)
        scan_images(ds, 1_000_000)  # the --strict pass agrees with it
        assert s.valid is (img is not None)


_GOOD = [good_row(str(k), seed=k, tag=("positive", "negative", "neutral")[k % 3]) for k in range(1, 5)]


@pytest.fixture(scope="module")
def clean_good(tmp_path_factory):
    """The four good samples alone, extracted: what they must get whatever junk shares their batches."""
    tmp = tmp_path_factory.mktemp("good-only")
    path, _ = _run(make_dataset(tmp / "m", _GOOD), tmp / "good.h5", batch_size=4, workers=0)
    with CacheReader(path) as r:
        return {name: r.array(name) for name in ("text/pooled", "text/mask", "image/pooled", "image/tokens")}


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(junk=st.lists(st.tuples(st.binary(max_size=300), image_bytes), min_size=3, max_size=9))
def test_random_bytes_corpus_extracts_names_every_bad_sample(junk, clean_good):
    """A real extraction over good samples mixed with random text and image bytes: it finishes, every sample
    whose image cannot be used is invalid and named (guid and file) in the report, and the good samples'
    features equal those of a run without the junk (issue 6)."""
    junk_rows = [Row(str(100 + k), "negative", "train", text, image) for k, (text, image) in enumerate(junk)]
    with tempfile.TemporaryDirectory() as d:
        rows = _GOOD[:2] + junk_rows + _GOOD[2:]  # good rows share batches with junk
        root = make_dataset(os.path.join(d, "m"), rows)
        path, log = _run(root, os.path.join(d, "c.h5"), batch_size=4, workers=0)
        with CacheReader(path) as r:
            guids, valid, problems = r.strings("samples/guid"), r.array("samples/valid"), r.meta["problems"]
            arrays = {name: r.array(name) for name in clean_good}
        for row in junk_rows:
            usable, notes = load_rgb(os.path.join(root, "data", f"{row.guid}.jpg"), HUGE_LIMIT, draft_size=256)
            i = guids.index(row.guid)
            assert bool(valid[i]) is (usable is not None), (row.guid, notes)
            named = [p for p in problems if f"guid {row.guid} (" in p and f"{row.guid}.jpg" in p]
            assert len(named) == len(notes), (row.guid, notes, problems)
            if usable is None:
                assert not arrays["image/pooled"][i].any() and f"guid {row.guid}" in log
        for j, row in enumerate(_GOOD):
            i = guids.index(row.guid)
            assert valid[i]
            assert np.array_equal(arrays["text/mask"][i], clean_good["text/mask"][j])
            for name in ("text/pooled", "image/pooled", "image/tokens"):
                np.testing.assert_allclose(arrays[name][i].astype(np.float32),
                                           clean_good[name][j].astype(np.float32),
                                           atol=1e-3 if "pooled" in name else 1e-2, err_msg=f"{row.guid} {name}")
