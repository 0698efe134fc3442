"""Caches without the posts' texts (`featcache extract --no-text`, `featcache strip-text FILE`), and the texts'
targets through stage 2: a stripped cache keeps features, ids, labels and splits, is what --no-text writes (same
arrays, same key), is rewritten atomically, and the commands that re-tokenize texts refuse it by name; a Twitter
cache's texts + targets re-tokenize to its masks and recompute its tokens (add-text-layers, heads' loader)."""
from __future__ import annotations

import json
import os
import shutil

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

import featcache.extract.strip as strip
from featcache.cache.store import CacheError
from test_formats_extract import SMALL, _twitter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.slow
TEXTS = ("samples/raw_text", "samples/text", "samples/target")


def _cli(*args):
    from cli import featcache_app
    return CliRunner().invoke(featcache_app, [str(a) for a in args])


def _flat(res) -> str:
    return " ".join(res.output.split())


def _arrays(path) -> dict:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[:]) if isinstance(v, h5py.Dataset) else None)
    return out


def _meta(path) -> dict:
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["meta"])


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """A Twitter dataset extracted with texts and with --no-text."""
    root = tmp_path_factory.mktemp("notext")
    data = _twitter(root)
    full, bare = root / "full.h5", root / "bare.h5"
    for out, extra in ((full, []), (bare, ["--no-text"])):
        res = _cli("extract", "--data", data, "--out", out, *SMALL, *extra)
        assert res.exit_code == 0, res.output
    return data, str(full), str(bare)


def test_no_text_keeps_everything_but_the_texts(caches):
    _, full, bare = caches
    a, b = _arrays(full), _arrays(bare)
    assert all(name in a for name in TEXTS) and not any(name in b for name in TEXTS)
    assert set(a) - set(b) == set(TEXTS)
    for name in b:  # features, guids, labels, splits, validity: the same
        assert np.array_equal(a[name], b[name]), name
    assert _meta(bare)["preprocessing"]["no_text"] is True and _meta(bare)["key"] != _meta(full)["key"]
    info = json.loads(_cli("info", bare, "--json").output)
    assert info["texts"] is False and info["samples"] == 6 and info["format"] == "twitter"


def test_strip_text_is_what_no_text_writes(caches, tmp_path):
    data, full, bare = caches
    path = tmp_path / "shared.h5"
    shutil.copyfile(full, path)
    res = _cli("strip-text", path)
    assert res.exit_code == 0 and "removed samples/raw_text, samples/text, samples/target" in _flat(res)
    a, b = _arrays(path), _arrays(bare)
    assert set(a) == set(b) and all(np.array_equal(a[n], b[n]) for n in a)
    assert _meta(path)["key"] == _meta(bare)["key"]  # so extract --no-text reuses it
    res = _cli("extract", "--data", data, "--out", path, "--no-text", *SMALL)
    assert res.exit_code == 0 and "already holds these features" in _flat(res)
    assert "nothing to do" in _flat(_cli("strip-text", path))
    assert not [p for p in os.listdir(tmp_path) if p != "shared.h5"]  # no temp file, no lock left


def test_strip_text_never_leaves_half_a_file(caches, tmp_path, monkeypatch):
    _, full, _ = caches
    path = tmp_path / "c.h5"
    shutil.copyfile(full, path)
    before = open(path, "rb").read()

    def dies(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(strip, "_copy_without", lambda src, dst, skip, meta: (open(dst, "wb").write(b"half"),
                                                                               dies()))
    with pytest.raises(OSError, match="disk full"):
        strip.strip_text(str(path))
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["c.h5"]


def test_commands_that_need_the_texts_say_so(caches, tmp_path):
    _, _, bare = caches
    res = _cli("add-text-layers", bare, "--layers", "1")
    assert res.exit_code == 2
    assert "holds no texts (samples/text, samples/raw_text" in _flat(res) and "add-text-layers" in _flat(res)
    from heads.data.cache import load_cache
    with pytest.raises(CacheError, match=r"holds no texts .*heads finetune --unfreeze-text"):
        load_cache(bare, texts=True)
    data = load_cache(bare)  # everything that does not need the texts loads
    assert len(data) == 6 and data.classes == ["negative", "neutral", "positive"]


def test_twitter_targets_reach_stage_two(caches, tmp_path):
    """The cached texts + targets re-tokenize to the cached masks, and the top layer recomputed on them gives the
    cached tokens (add-text-layers checks both); heads' loader pairs them the same way."""
    _, full, _ = caches
    path = tmp_path / "t.h5"
    shutil.copyfile(full, path)
    res = _cli("add-text-layers", path, "--layers", "1")
    assert res.exit_code == 0, res.output
    from featcache.text_tower import load_text_backbone
    from heads.data.cache import load_cache
    from heads.data.text_layers import _tokenize
    data = load_cache(str(path), texts=True)
    assert data.targets[:2] == ["Korea", "Japan"]
    ids = _tokenize(data, load_text_backbone(data.meta))
    assert not np.array_equal(ids[0].numpy(), ids[1].numpy())  # same text, other target
    data.targets = None  # without the targets the inputs are not the cache's: refused, not silently wrong
    with pytest.raises(CacheError, match="other masks than the cache's text/mask"):
        _tokenize(data, load_text_backbone(data.meta))
