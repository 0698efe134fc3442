"""Cached and uncached give the same predictions: every head applied to features computed on the fly by the
real default backbones equals the same head applied to the HDF5 cache (within fp16 tolerance).

This is the contract the whole product rests on: training from the cache is training on the backbones.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from featcache.backbones import create_image, create_text, locate
from featcache.extract.config import ExtractConfig
from featcache.extract.engine import extract
from featcache.sources.images import load_rgb
from heads.data.cache import load_cache
from heads.fusions import HeadConfig, HeadDims, create_fusion, list_fusions
from heads.infer import infer
from mvsa_fixtures import require_mvsa


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    root = require_mvsa()
    out = str(tmp_path_factory.mktemp("parity") / "c.h5")
    extract(ExtractConfig(data=str(root), limit=5, out=out, workers=0, batch_size=4), progress=False)
    return load_cache(out)


@pytest.fixture(scope="module")
def on_the_fly(real_cache):
    """Features for every row, recomputed one sample at a time straight from the dataset files."""
    names = real_cache.meta["backbone"]  # the default pair the cache was extracted with
    text = create_text(names["text"], locate(names["text"]), max_len=real_cache.meta["text"]["max_len"]).eval()
    image = create_image(names["image"], locate(names["image"])).eval()
    texts = [s for s in _strings(real_cache.path, "samples/text")]
    feats = {k: [] for k in ("text_tokens", "text_mask", "text_pooled", "image_tokens", "image_pooled")}
    root = real_cache.meta["dataset"]["root"]
    with torch.inference_mode():
        for guid, t in zip(real_cache.guids, texts):
            tx = text.forward_features(text.tokenize([t]))
            img, _ = load_rgb(f"{root}/data/{guid}.jpg", draft_size=256)
            im = image.forward_features(image.transform(img)[None])
            for k, v in (("text_tokens", tx["tokens"]), ("text_mask", tx["mask"]), ("text_pooled", tx["pooled"]),
                         ("image_tokens", im["tokens"]), ("image_pooled", im["pooled"])):
                feats[k].append(v[0])
    return {k: torch.stack(v) for k, v in feats.items()}


def _strings(path, name):
    from featcache.cache.store import CacheReader
    with CacheReader(path) as r:
        return r.strings(name)


def test_features_match_cache(real_cache, on_the_fly):
    f = real_cache.features
    assert torch.equal(on_the_fly["text_mask"], f["text_mask"])
    m = f["text_mask"]
    # fp16 storage: relative error ~1e-3 of the activation scale
    assert torch.allclose(on_the_fly["text_tokens"][m], f["text_tokens"][m].float(), atol=2e-2, rtol=1e-2)
    assert torch.allclose(on_the_fly["image_tokens"], f["image_tokens"].float(), atol=2e-2, rtol=1e-2)
    assert torch.allclose(on_the_fly["text_pooled"], f["text_pooled"], atol=1e-4)
    assert torch.allclose(on_the_fly["image_pooled"], f["image_pooled"], atol=1e-4)


@pytest.mark.parametrize("fusion", list_fusions())
def test_head_predictions_cached_equal_uncached(real_cache, on_the_fly, fusion):
    torch.manual_seed(0)
    head = create_fusion(HeadConfig(fusion=fusion), HeadDims(**real_cache.dims(), num_classes=3)).eval()
    rows = np.arange(len(real_cache))
    cached = infer(head, real_cache, rows)["logits"]
    with torch.inference_mode():
        live = head({k: v.float() if v.dtype != torch.bool else v for k, v in on_the_fly.items()})["logits"]
    assert np.allclose(cached, live.numpy(), atol=1e-2, rtol=1e-2), np.abs(cached - live.numpy()).max()
    assert (cached.argmax(1) == live.numpy().argmax(1)).all()
