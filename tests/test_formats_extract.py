"""`featcache extract --format auto` end to end on tiny synthetic data of every format (the real default
backbones, ~6 rows each): detection, class names, splits and row counts in the cache and in `featcache info
--json`; --strict stops on any reader's problem before a model loads; Twitter's shared images are encoded once
and copied to every row naming them; a target is the text's second segment; `featcache formats`."""
from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

import featcache.extract.engine as fx
import featcache.extract.forward as ff
from featcache.backbones import DEFAULT_BACKBONE, parse_backbone
from mvsa_fixtures import good_row, jpeg_bytes, make_dataset
from reader_fixtures import images_for, meme, tw_row, write_csv, write_memes, write_release, write_twitter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.slow

SMALL = ["--batch-size", "4", "--workers", "0", "--no-progress"]
MULTI = "ID\ttext,image\ttext,image\ttext,image"


def _cli(*args):
    from cli import featcache_app
    return CliRunner().invoke(featcache_app, [str(a) for a in args])


def _twitter(root):
    """Six rows over four images: 10.jpg is named by train-0, train-1 (the same tweet, two targets), dev-0 and
    test-1. train-0/train-1's sentence has no $T$: their texts are equal, only the targets differ."""
    files = {"train": [tw_row(0, 2, "10.jpg", "what a match tonight", "Korea"),
                       tw_row(1, 0, "10.jpg", "what a match tonight", "Japan"),
                       tw_row(2, 1, "11.jpg", "$T$ at the airport", "Bob")],
             "dev": [tw_row(0, 1, "10.jpg", "$T$ again", "Korea")],
             "test": [tw_row(0, 2, "12.jpg", "go $T$", "Ann"), tw_row(1, 0, "10.jpg", "$T$ lost", "Japan")]}
    return write_twitter(root / "absa" / "tw15", files, images_for(["10.jpg", "11.jpg", "12.jpg"]))


def _datasets(root) -> dict[str, tuple[str, list[str], dict[str, int]]]:
    """{format: (path, classes, split counts)} of six-row datasets in every layout."""
    rows = [good_row(str(g), g, tag) for g, tag in ((1, "positive"), (2, "neutral"), (3, "negative"),
                                                    (4, "positive"))]
    rows += [good_row("5", 5, split="test"), good_row("6", 6, split="test")]
    tri = ["negative", "neutral", "positive"]
    memes = {"train.jsonl": [meme(1, "img/01.png", "a", 0), meme(2, "img/02.png", "b", 1), meme(3, "img/03.png",
                                                                                              "c", 0)],
             "dev_seen.jsonl": [meme(4, "img/04.png", "d", 1), meme(5, "img/05.png", "e", 0)],
             "test_unseen.jsonl": [meme(6, "img/06.png", "f")]}
    csv_rows = [[f"r{k}", f"row {k} text", f"pics/{k}.jpg", lab, split] for k, (lab, split) in
                enumerate([("cat", "train"), ("dog", "train"), ("bird", "train"), ("cat", "val"), ("dog", "val"),
                           ("", "test")])]
    return {
        "mvsa": (str(make_dataset(root / "mvsa", rows)), tri, {"train": 4, "test": 2}),
        "mvsa-single": (str(write_release(root / "single", [f"{k}\t{t},{i}" for k, (t, i) in enumerate(
            [("positive", "neutral"), ("negative", "negative"), ("neutral", "neutral"), ("positive", "positive"),
             ("negative", "neutral"), ("positive", "negative")], start=1)])), tri, {"train": 6}),
        "mvsa-multiple": (str(write_release(root / "multi", [f"{k}\t" + "\t".join([pair] * 3) for k, pair in enumerate(
            ["positive,neutral", "negative,negative", "neutral,neutral", "positive,positive", "neutral,neutral",
             "negative,neutral"], start=1)], header=MULTI)), tri, {"train": 6}),
        "twitter": (str(_twitter(root)), tri, {"train": 3, "dev": 1, "test": 2}),
        "hateful-memes": (str(write_memes(root / "hm", memes, images_for(
            [f"img/0{k}.png" for k in range(1, 7)], png=True))), ["not-hateful", "hateful"],
            {"train": 3, "dev_seen": 2, "test_unseen": 1}),
        "manifest": (str(write_csv(root / "man" / "data.csv", ["id", "text", "image", "label", "split"], csv_rows,
                                   images_for([f"pics/{k}.jpg" for k in range(6)]))), ["bird", "cat", "dog"],
                     {"train": 3, "val": 2, "test": 1}),
    }


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """Every format extracted once through the CLI: {format: (cache path, classes, splits, CLI output)}."""
    root = tmp_path_factory.mktemp("formats")
    out = {}
    for fmt, (path, classes, splits) in _datasets(root).items():
        cache = root / f"{fmt}.h5"
        res = _cli("extract", "--data", path, "--format", "auto", "--out", cache, *SMALL)
        assert res.exit_code == 0, (fmt, res.output)
        out[fmt] = (str(cache), classes, splits, res.output)
    return out


@pytest.mark.parametrize("fmt", ["mvsa", "mvsa-single", "mvsa-multiple", "twitter", "hateful-memes", "manifest"])
def test_extract_every_format(extracted, fmt):
    cache, classes, splits, _ = extracted[fmt]
    res = _cli("info", cache, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["format"] == fmt and info["classes"] == classes
    assert {s: v["samples"] for s, v in info["splits"].items()} == splits
    assert info["samples"] == sum(splits.values()) == sum(v["samples"] for v in info["splits"].values())
    assert (info["backbones"]["text"], info["backbones"]["image"]) == parse_backbone(DEFAULT_BACKBONE)
    assert info["texts"] is True
    with h5py.File(cache, "r") as f:
        meta = json.loads(f.attrs["meta"])
        assert meta["classes"] == classes and meta["dataset"]["format"] == fmt
        assert meta["dataset"]["splits"] == splits
        assert f["image/pooled"].shape[0] == f["text/pooled"].shape[0] == sum(splits.values())
        labels, valid = f["samples/label"][:], f["samples/valid"][:]
        assert ("samples/target" in f) == (fmt == "twitter")
    assert info["invalid"] == int((~valid).sum())
    per_class = {c: int((labels == k).sum()) for k, c in enumerate(classes)}
    assert info["labels"] == per_class and sum(per_class.values()) == int((labels >= 0).sum())


def test_label_rules_reach_the_cache(extracted):
    """mvsa-single: positive vs negative (row 6) is dropped: invalid, counted in info's invalid and problems."""
    info = json.loads(_cli("info", extracted["mvsa-single"][0], "--json").output)
    assert info["invalid"] == 1 and info["problems"] == {"label_conflict": 1}
    assert info["labels"] == {"negative": 2, "neutral": 1, "positive": 2}


def test_twitter_shared_images_and_targets(extracted):
    with h5py.File(extracted["twitter"][0], "r") as f:
        guids = [g.decode() for g in f["samples/guid"][:]]
        tokens, pooled = f["image/tokens"][:], f["image/pooled"][:]
        text = f["text/pooled"][:]
        targets = [t.decode() for t in f["samples/target"][:]]
        texts = [t.decode() for t in f["samples/text"][:]]
    row = {g: k for k, g in enumerate(guids)}
    same = [row[g] for g in ("train-0", "train-1", "dev-0", "test-1")]  # all name 10.jpg
    for k in same[1:]:  # copied from the one decode, in the batch or from the file (test-1 is in batch 2)
        assert np.array_equal(tokens[k], tokens[same[0]]) and np.array_equal(pooled[k], pooled[same[0]])
    assert not np.allclose(pooled[row["train-2"]], pooled[same[0]], atol=1e-3)
    assert targets[:2] == ["Korea", "Japan"] and texts[0] == texts[1] == "what a match tonight"
    # The same text with another target is another input: the target is the second segment.
    assert not np.allclose(text[0], text[1], atol=1e-3)


def test_shared_images_run_once_and_match_a_per_row_extraction(tmp_path, monkeypatch):
    """Counted image-tower rows: one per distinct image; and the arrays equal those of the same data whose rows
    each have their own copy of the image (a per-row extraction), to fp16 noise."""
    seen = []
    real = ff._image_features

    def counting(model, images, micro, device):
        seen.append(images.shape[0])
        return real(model, images, micro, device)
    monkeypatch.setattr(ff, "_image_features", counting)
    shared = _twitter(tmp_path / "a")
    assert _cli("extract", "--data", shared, "--out", tmp_path / "a.h5", "--overlap", "off", *SMALL).exit_code == 0
    assert sum(seen) == 3  # 10.jpg, 11.jpg, 12.jpg: six rows, three images
    own = tmp_path / "b" / "absa" / "tw15"
    own.mkdir(parents=True)
    images = own.parent / "twitter2015_images"
    images.mkdir()
    for split in ("train", "dev", "test"):  # every row its own file (same bytes)
        lines = (shared / f"{split}.tsv").read_text().splitlines()
        for k, line in enumerate(lines[1:], start=1):
            f = line.split("\t")
            (images / f"{split}{k}.jpg").write_bytes((shared.parent / "twitter2015_images" / f[2]).read_bytes())
            lines[k] = "\t".join(f[:2] + [f"{split}{k}.jpg"] + f[3:])
        (own / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    seen.clear()
    assert _cli("extract", "--data", own, "--out", tmp_path / "b.h5", "--overlap", "off", *SMALL).exit_code == 0
    assert sum(seen) == 6
    with h5py.File(tmp_path / "a.h5", "r") as a, h5py.File(tmp_path / "b.h5", "r") as b:
        for name in ("image/tokens", "image/pooled", "text/tokens", "text/pooled"):
            np.testing.assert_allclose(a[name][:].astype(np.float32), b[name][:].astype(np.float32),
                                       atol=2e-2, rtol=2e-2, err_msg=name)


def _boom(*a, **k):
    raise AssertionError("a backbone was loaded")


@pytest.mark.parametrize("fmt", ["mvsa", "mvsa-single", "mvsa-multiple", "twitter", "hateful-memes", "manifest"])
def test_strict_stops_every_reader_before_a_model_loads(tmp_path, monkeypatch, fmt):
    """One corrupt image per format: --strict names it (exit 1) and no backbone is built."""
    path = _datasets(tmp_path)[fmt][0]
    victim = {"mvsa": "data/1.jpg", "mvsa-single": "data/1.jpg", "mvsa-multiple": "data/1.jpg",
              "twitter": "../twitter2015_images/11.jpg", "hateful-memes": "img/01.png", "manifest": "pics/0.jpg"}
    base = path if os.path.isdir(path) else os.path.dirname(path)
    with open(os.path.join(base, victim[fmt]), "wb") as f:
        f.write(jpeg_bytes(1)[:200])  # a truncated image: found only by decoding it
    monkeypatch.setattr(fx, "create_text", _boom)
    monkeypatch.setattr(fx, "create_image", _boom)
    res = _cli("extract", "--data", path, "--strict", "--out", tmp_path / "x.h5", *SMALL)
    assert res.exit_code == 1, res.output
    flat = " ".join(res.output.split())
    assert "--strict:" in flat and "nothing was extracted" in flat and os.path.basename(victim[fmt]) in flat
    assert not os.path.exists(tmp_path / "x.h5")


def test_format_options_are_checked(tmp_path):
    path = _datasets(tmp_path)["mvsa"][0]
    res = _cli("extract", "--data", path, "--images", tmp_path, "--out", tmp_path / "x.h5", *SMALL)
    assert res.exit_code == 2 and "format 'mvsa' has no option 'images'" in " ".join(res.output.split())
    res = _cli("extract", "--data", tmp_path / "nothing-here", "--out", tmp_path / "x.h5", *SMALL)
    assert res.exit_code == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _cli("extract", "--data", empty, "--out", tmp_path / "x.h5", *SMALL)
    assert res.exit_code == 2 and "--format NAME" in " ".join(res.output.split())


def test_manifest_column_options_on_the_cli(tmp_path):
    path = write_csv(tmp_path / "m.csv", ["key", "caption", "file", "y"],
                     [["a", "one", "1.jpg", "x"], ["b", "two", "2.jpg", "y"], ["c", "three", "3.jpg", "x"]],
                     images_for(["1.jpg", "2.jpg", "3.jpg"]))
    res = _cli("extract", "--data", path, "--id-column", "key", "--text-column", "caption", "--image-column",
               "file", "--label-column", "y", "--classes", "y,x", "--out", tmp_path / "m.h5", *SMALL)
    assert res.exit_code == 0, res.output
    info = json.loads(_cli("info", tmp_path / "m.h5", "--json").output)
    assert info["format"] == "manifest" and info["classes"] == ["y", "x"] and info["labels"] == {"y": 1, "x": 2}


def test_formats_lists_every_reader():
    res = CliRunner().invoke(__import__("cli").featcache_app, ["formats"], terminal_width=200)
    assert res.exit_code == 0
    from featcache.sources import READERS
    for name, reader in READERS.items():
        assert name in res.output
    flat = "".join(res.output.split())
    assert "fromthedata" in flat and "--images" in flat and "--text-column" in flat and "not-hateful" in flat


def test_converted_mvsa_extracts_to_the_same_samples_and_arrays(tmp_path):
    """examples/convert_mvsa.py writes ../shared/mvsa as a manifest and as a raw MVSA-Single release; extracting
    the original folder, the manifest and the release gives the same guids, labels and feature arrays (the
    release holds the labelled train rows only: compared on those; whole batches of them, so the batches match)."""
    from mvsa_fixtures import require_mvsa
    data = require_mvsa()
    import importlib.util
    spec = importlib.util.spec_from_file_location("convert_mvsa", os.path.join(
        os.path.dirname(__file__), "..", "examples", "convert_mvsa.py"))
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    convert.main([str(tmp_path / "out"), "--data", str(data), "--limit", "8"])
    paths = {"mvsa": (data, ["--limit", "8"]), "manifest": (tmp_path / "out" / "manifest", []),
             "mvsa-single": (tmp_path / "out" / "mvsa-single", [])}
    got = {}
    for fmt, (path, extra) in paths.items():
        res = _cli("extract", "--data", path, "--out", tmp_path / f"{fmt}.h5", *SMALL, *extra)
        assert res.exit_code == 0, res.output
        got[fmt] = h5py.File(tmp_path / f"{fmt}.h5", "r")
    try:
        ref = got["mvsa"]
        assert json.loads(got["manifest"].attrs["meta"])["dataset"]["format"] == "manifest"
        assert json.loads(got["mvsa-single"].attrs["meta"])["dataset"]["format"] == "mvsa-single"
        n_train = int(sum(s == b"train" for s in ref["samples/split"][:]))
        assert n_train == 8
        for fmt, rows in (("manifest", slice(None)), ("mvsa-single", slice(0, n_train))):
            f = got[fmt]
            assert f["samples/guid"].shape[0] == ref["samples/guid"][rows].shape[0]
            for name in ("samples/guid", "samples/label", "samples/split", "samples/valid", "text/tokens",
                         "text/mask", "text/pooled", "image/tokens", "image/pooled"):
                assert np.array_equal(f[name][:], ref[name][rows]), (fmt, name)
    finally:
        for f in got.values():
            f.close()


def test_info_json_of_an_older_cache_has_the_documented_defaults(make_synthetic_cache):
    """A cache from before formats and class names: format mvsa, MVSA's classes, counts from the arrays."""
    path = make_synthetic_cache(n_train=20, n_test=4, n_invalid=2)
    res = _cli("info", path, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["format"] == "mvsa" and info["classes"] == ["negative", "neutral", "positive"]
    assert info["samples"] == 24 and info["invalid"] == 3 and info["texts"] is True
    assert info["splits"]["train"]["samples"] == 20 and info["splits"]["test"]["unlabelled"] == 4
    assert info["splits"]["train"]["invalid"] == 2 and sum(info["labels"].values()) == 20
    assert info["backbones"]["text"] == "synthetic-text" and info["problems"] == {}


def test_targets_join_like_captions_without_pair_input():
    """CLIP has no pair input: `sentence . target`, as captions are appended; HF text encoders take pairs."""
    from featcache.text_tower import text_inputs

    class NoPairs:
        pair_input = False

    class Pairs:
        pair_input = True

    assert text_inputs(["a b", "a b"], ["X", "Y"], NoPairs()) == ["a b . X", "a b . Y"]
    assert text_inputs(["a b", "c"], ["X", ""], Pairs()) == [("a b", "X"), ("c", "")]
    assert text_inputs(["a b"], None, Pairs()) == ["a b"]


def test_a_failed_shared_image_fails_every_row_naming_it(tmp_path):
    """10.jpg is truncated: its four rows are invalid, each reported; the other rows are kept."""
    root = _twitter(tmp_path)
    (root.parent / "twitter2015_images" / "10.jpg").write_bytes(jpeg_bytes(1)[:200])
    res = _cli("extract", "--data", root, "--out", tmp_path / "t.h5", *SMALL)
    assert res.exit_code == 0, res.output
    with h5py.File(tmp_path / "t.h5", "r") as f:
        guids = [g.decode() for g in f["samples/guid"][:]]
        valid = dict(zip(guids, f["samples/valid"][:]))
        meta = json.loads(f.attrs["meta"])
        zeros = [not f["image/pooled"][k].any() for k in range(len(guids))]
    assert {g for g, v in valid.items() if not v} == {"train-0", "train-1", "dev-0", "test-1"}
    assert zeros == [not v for v in valid.values()]
    reported = [p for p in meta["problems"] if "10.jpg" in p]
    assert len(reported) == 4 and sum("decoded once for both" in p for p in reported) == 3
    assert meta["dataset"]["invalid"] == 4


def test_twitter_shards_give_the_single_process_cache(tmp_path):
    """Shared images across shard boundaries (10.jpg is named by rows of both shards): the merged shards hold
    the single-process arrays."""
    data = _twitter(tmp_path)
    args = ["--data", data, "--batch-size", "2", "--workers", "0", "--no-progress"]
    ref = tmp_path / "ref.h5"
    assert _cli("extract", *args, "--out", ref).exit_code == 0
    out = tmp_path / "sh.h5"
    for i in range(2):
        r = _cli("extract", *args, "--out", out, "--shard", f"{i}/2")
        assert r.exit_code == 0, r.output
    merged = tmp_path / "merged.h5"
    r = _cli("merge", tmp_path / "sh.manifest.json", "--out", merged)
    assert r.exit_code == 0, r.output
    with h5py.File(ref, "r") as a, h5py.File(merged, "r") as b:
        for name in ("samples/guid", "samples/target", "samples/valid", "text/tokens", "text/pooled",
                     "image/tokens", "image/pooled"):
            assert np.array_equal(a[name][()], b[name][()]), name
        assert np.abs(b["image/pooled"][()]).sum(1).min() > 0  # every row got its image's features


def test_twitter_resume_copies_shared_images_from_the_file(tmp_path, monkeypatch):
    """Interrupted after the first batch, a resumed Twitter extraction copies 10.jpg's features (computed in the
    first run) from the partial file to the later rows naming it: the single-process arrays, bit for bit."""
    import featcache.cache.store as fs
    from featcache.extract.config import ExtractConfig
    from featcache.extract.engine import extract

    data = _twitter(tmp_path)
    ref = tmp_path / "ref.h5"
    assert _cli("extract", "--data", data, "--batch-size", "2", "--workers", "0", "--no-progress",
                "--out", ref).exit_code == 0
    out = tmp_path / "r.h5"
    cfg = ExtractConfig(data=str(data), out=str(out), batch_size=2, workers=0)
    real_write, calls = fs.CacheWriter.write, []

    def interrupting_write(self, start, *a, **k):
        calls.append(start)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(self, start, *a, **k)
    monkeypatch.setattr(fs.CacheWriter, "write", interrupting_write)
    with pytest.raises(KeyboardInterrupt):
        extract(cfg, progress=False)
    monkeypatch.undo()
    assert extract(cfg, resume=True, progress=False) == str(out)
    with h5py.File(ref, "r") as a, h5py.File(out, "r") as b:
        for name in ("samples/valid", "text/tokens", "image/tokens", "image/pooled"):
            assert np.array_equal(a[name][()], b[name][()]), name
