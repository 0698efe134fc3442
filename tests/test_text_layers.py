"""`featcache add-text-layers` and featcache.text_tower, without heads: the added states equal those of
`extract --text-layers`, nothing else in the cache changes, an older cache's metadata is brought to today's form,
and other weights are refused before anything is written. (Stage 2 itself is tested in test_finetune.py.)"""
from __future__ import annotations

import json
import os
import shutil

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import tiny_models as tm
from featcache.backbones.weights import ENV_DIR
from featcache.cache.store import CacheError, CacheReader
from featcache.digest import file_sha256
from featcache.extract.config import ExtractConfig
from featcache.extract.engine import extract
from featcache.extract.text_layers import add_text_layers
from featcache.text_tower import check_tokens, load_text_backbone, tokenize_cache

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Tiny RoBERTa + tiny CLIP image tower: {"plain", "extracted" (--text-layers 1), "added" (plain + add 1)}."""
    root = tmp_path_factory.mktemp("text_layers")
    tm.make_tiny_roberta(str(root / "weights" / "roberta-base"))
    tm.make_tiny_clip(str(root / "weights" / "clip-vit-b32"))
    data = tm.make_mvsa(str(root / "mvsa"), n=12, n_test=4)
    paths = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv(ENV_DIR, str(root / "weights"))
        for kind, layers in (("plain", 0), ("extracted", 1)):
            paths[kind] = extract(ExtractConfig(data=data, backbone="roberta-base+clip-vit-b32", text_layers=layers,
                                                out=str(root / f"{kind}.h5"), workers=0, batch_size=8,
                                                max_text_len=24), progress=False)
        paths["added"] = str(root / "added.h5")
        shutil.copyfile(paths["plain"], paths["added"])
        add_text_layers(paths["added"], 1, batch_size=5, progress=False)
        yield paths


def test_added_states_equal_extracted_ones(caches):
    with CacheReader(caches["added"]) as a, CacheReader(caches["extracted"]) as e, \
            CacheReader(caches["plain"]) as p:
        mask = a.array("text/mask")
        assert a.start_layer == e.start_layer == a.meta["text"]["num_layers"] - 1 and p.start_layer is None
        assert a.meta["text_hidden"]["text_layers"] == 1 and a.meta["text_hidden"]["start_layer"] == a.start_layer
        np.testing.assert_allclose(a.array("text_hidden/states")[mask].astype(np.float32),
                                   e.array("text_hidden/states")[mask].astype(np.float32), atol=1e-2, rtol=1e-2)
        for k in ("text/tokens", "text/pooled", "image/tokens"):  # features untouched, key unchanged
            assert np.array_equal(a.array(k), p.array(k))
        assert a.meta["key"] == p.meta["key"] and a.meta["preprocessing"] == p.meta["preprocessing"]
    assert not os.path.exists(caches["added"] + ".addon.partial")


def test_text_tower_reproduces_the_cached_tokens(caches):
    with CacheReader(caches["plain"]) as r:
        text = load_text_backbone(r.meta)
        batch = tokenize_cache(r, text)  # the masks must equal the cached ones exactly
        with torch.no_grad():
            out = text.forward_features(batch)
        cached = torch.from_numpy(r.array("text/tokens"))
        check_tokens(out["tokens"].half(), cached, batch["attention_mask"], r.path)
        with pytest.raises(CacheError, match="wrong weights"):
            check_tokens(out["tokens"].half() + 1, cached, batch["attention_mask"], r.path)


def test_an_older_cache_is_brought_to_todays_metadata(caches, tmp_path):
    """A cache written before text.start_layer existed (text.hidden_start_layer): the states are added and
    the metadata names them once, with today's name."""
    path = str(tmp_path / "old.h5")
    shutil.copyfile(caches["plain"], path)
    with h5py.File(path, "r+") as f:
        meta = json.loads(f.attrs["meta"])
        meta["text"]["hidden_start_layer"] = meta["text"].pop("start_layer")
        meta.pop("classes")
        f.attrs["meta"] = json.dumps(meta)
    with CacheReader(path) as r:
        assert r.start_layer is None and r.classes == ["negative", "neutral", "positive"]
    add_text_layers(path, 1, progress=False)
    with h5py.File(path, "r") as f:
        text = json.loads(f.attrs["meta"])["text"]
    assert "hidden_start_layer" not in text and text["start_layer"] == text["num_layers"] - 1


def test_other_weights_are_refused_before_writing(caches, tmp_path):
    path = str(tmp_path / "c.h5")
    shutil.copyfile(caches["plain"], path)
    other = tm.make_tiny_roberta(str(tmp_path / "other-roberta"), seed=1)
    with h5py.File(path, "r+") as f:  # recorded weights now point at another model (with its own sha)
        meta = json.loads(f.attrs["meta"])
        meta["weights"]["text"].update(location=other, sha256=file_sha256(other))
        f.attrs["meta"] = json.dumps(meta)
    before = file_sha256(path)
    with pytest.raises(CacheError, match="wrong weights"):
        add_text_layers(path, 1, progress=False)
    assert file_sha256(path) == before and not os.path.exists(path + ".addon.partial")
    from cli import featcache_app
    r = CliRunner().invoke(featcache_app, ["add-text-layers", path, "--layers", "3"])
    assert r.exit_code == 2 and "has 2 layers" in r.output and "Traceback" not in r.output
