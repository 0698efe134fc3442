"""Augmented image views (extract --image-views, train --image-aug-views), the internal test split
(--test-ratio) and caches as an ablation axis (ablate --cache a.h5,b.h5)."""
from __future__ import annotations

import io
import json
import os

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from conftest import build_synthetic_cache
from featcache.sources.augment import ViewMaker, get_aug_spec
from featcache.extract.config import ExtractConfig
from featcache.extract.engine import extract
from featcache.cache.store import CacheReader, feature_signature
from heads.ablate import AblateConfig, ablate, expand
from heads.config import TrainConfig
from heads.data.cache import DataError, load_cache
from heads.data.splits import SplitConfig, split_labelled
from heads.train.stage1 import train
from mvsa_fixtures import pattern, require_mvsa

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FAST = {"epochs": 3, "hidden": 16, "patience": 0, "plots": False}


def _extract(out, **kw):
    console = Console(file=io.StringIO(), width=1000)
    return extract(ExtractConfig(data=str(require_mvsa()), out=str(out), workers=0, **kw), progress=False,
                   console=console)


def _arrays(path, names):
    with h5py.File(path, "r") as f:
        guids = [g.decode() if isinstance(g, bytes) else g for g in f["samples/guid"][:]]
        return guids, {n: f[n][:] for n in names}


@pytest.fixture(scope="module")
def views_cache(tmp_path_factory):
    """The first 24 rows of each label file (48 rows), with 2 weak views per image."""
    return _extract(tmp_path_factory.mktemp("v") / "views.h5", limit=24, batch_size=16, image_views=2)


@pytest.fixture(scope="module")
def clean_cache(tmp_path_factory):
    """The same rows with --clean-text and no views."""
    return _extract(tmp_path_factory.mktemp("c") / "clean.h5", limit=24, batch_size=16, clean_text=True)


# ----------------------------------------------------------------------------------------- the policy
def test_view_policy_is_seeded_by_guid_and_keeps_the_size():
    img = Image.fromarray(pattern(3, (96, 80)))
    weak = ViewMaker(3, "weak", seed=0)
    a, b = weak(img, "101"), weak(img, "101")
    assert [np.asarray(v).tobytes() for v in a] == [np.asarray(v).tobytes() for v in b]  # repeatable
    assert all(v.size == img.size and v.mode == "RGB" for v in a)
    assert len({np.asarray(v).tobytes() for v in a}) == 3  # three different views
    assert np.asarray(weak(img, "102")[0]).tobytes() != np.asarray(a[0]).tobytes()  # per guid
    assert np.asarray(ViewMaker(1, "weak", seed=1)(img, "101")[0]).tobytes() != np.asarray(a[0]).tobytes()
    strong = ViewMaker(1, "strong", seed=0)(img, "101")[0]
    assert np.asarray(strong).tobytes() != np.asarray(a[0]).tobytes()
    state = torch.random.get_rng_state()
    weak(img, "103")
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is untouched
    with pytest.raises(ValueError, match="valid: weak, strong"):
        get_aug_spec("medium")


# ----------------------------------------------------------------------------------------- extraction
def test_views_stored_next_to_unchanged_clean_features(views_cache, clean_cache, tmp_path):
    names = ["image/pooled", "image/tokens", "image_views/pooled", "image_views/tokens"]
    guids, a = _arrays(views_cache, names)
    assert a["image_views/tokens"].shape == (48, 2) + a["image/tokens"].shape[1:]
    assert a["image_views/tokens"].dtype == np.float16 and a["image_views/pooled"].dtype == np.float32
    clean, v = a["image/pooled"], a["image_views/pooled"]
    assert np.abs(v[:, 0] - clean).mean() > 0.01 and np.abs(v[:, 1] - v[:, 0]).mean() > 0.01
    # The clean features are exactly those of a cache without views (clean-text changes the text only) ...
    _, b = _arrays(clean_cache, ["image/pooled", "image/tokens"])
    assert np.array_equal(clean, b["image/pooled"]) and np.array_equal(a["image/tokens"], b["image/tokens"])
    with CacheReader(views_cache) as r:
        meta = r.meta
    assert meta["preprocessing"]["image_views"] == 2 and meta["preprocessing"]["image_aug"] == "weak"
    # the views were timed; the value is rounded to 0.01 s, so on a fast machine it may well read 0.0
    assert 0.0 <= meta["timings"]["views_s"] <= meta["timings"]["total_s"]
    # ... and a head trained with views applies to caches without them (same features, same signature).
    no_views = _extract(tmp_path / "nv.h5", limit=24, batch_size=16)
    with CacheReader(no_views) as r:
        assert feature_signature(r.meta) == feature_signature(meta) and r.meta["key"] != meta["key"]
    # Views depend on (seed, guid, view) only: another batch size and fewer rows give the same views.
    small = _extract(tmp_path / "s.h5", limit=4, batch_size=3, image_views=2)
    g_small, s = _arrays(small, ["image_views/pooled", "image_views/tokens"])
    rows = [guids.index(g) for g in g_small]
    assert np.array_equal(s["image_views/tokens"], a["image_views/tokens"][rows])
    assert np.array_equal(s["image_views/pooled"], a["image_views/pooled"][rows])


def test_info_shows_views(views_cache):
    from cli import featcache_app
    res = CliRunner().invoke(featcache_app, ["info", str(views_cache)])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "image views: 2 x weak (seed 0)" in out and "per view" in out and "image_views/tokens" in out


# ----------------------------------------------------------------------------------------- training
def _with_views(path, k=2):
    """A synthetic cache in memory with k random views per row (distinct from the clean features)."""
    data = load_cache(build_synthetic_cache(path))
    g = torch.Generator().manual_seed(1)
    data.views = {name: torch.randn((len(data), k) + data.features[name].shape[1:], generator=g)
                  .to(data.features[name].dtype) for name in ("image_tokens", "image_pooled")}
    return data


def test_training_draws_views_and_evaluation_uses_clean(tmp_path, monkeypatch):
    data = _with_views(str(tmp_path / "s.h5"))
    seen = []  # (views given?, rows, image_pooled) of every batch
    real = type(data).batch

    def spy(self, idx, device="cpu", keys=None, views=None, **kw):
        out = real(self, idx, device, keys, views, **kw)
        seen.append((views is not None, np.asarray(idx).copy(), out["image_pooled"].clone()))
        return out
    monkeypatch.setattr(type(data), "batch", spy)
    res = train(TrainConfig.from_flat(fusion="concat", seed=0, **FAST), data)
    assert res.metrics["image_views_used"] == 2
    clean = data.features["image_pooled"].float()
    candidates = torch.cat([clean[:, None], data.views["image_pooled"].float()], 1)  # (N, 3, D)
    drawn = {}  # row -> set of view indices it got during training
    for is_train, rows, feats in seen:
        if not is_train:  # evaluation: always the clean view
            assert torch.equal(feats, clean[rows])
            continue
        for r, f in zip(rows, feats):
            match = [k for k in range(3) if torch.equal(f, candidates[r, k])]
            assert len(match) == 1
            drawn.setdefault(int(r), set()).update(match)
    assert any(len(v) > 1 for v in drawn.values())  # a row saw different features across epochs
    assert set().union(*drawn.values()) == {0, 1, 2}
    # Off: every training batch is clean, and the run says so.
    seen.clear()
    res = train(TrainConfig.from_flat(fusion="concat", seed=0, image_aug_views=False, **FAST), data)
    assert res.metrics["image_views_used"] == 0
    assert all(torch.equal(feats, clean[rows]) for _, rows, feats in seen)


# ----------------------------------------------------------------------------------------- --test-ratio
def test_test_ratio_holds_out_a_stratified_split(tmp_path):
    data = load_cache(build_synthetic_cache(str(tmp_path / "s.h5")))
    plain = split_labelled(data, SplitConfig(0.2), seed=3)
    split = split_labelled(data, SplitConfig(0.2, test_ratio=0.25), seed=3)
    usable = np.flatnonzero((data.labels >= 0) & data.valid)
    parts = [set(split.train), set(split.val), set(split.test)]
    assert set().union(*parts) == set(usable) and sum(map(len, parts)) == len(usable)  # a partition
    assert len(split.test) == round(0.25 * len(usable)) and split.counts["test"] == len(split.test)
    share = np.bincount(data.labels[split.test], minlength=3) / len(split.test)
    assert np.allclose(share, np.bincount(data.labels[usable], minlength=3) / len(usable), atol=0.05)
    assert np.array_equal(split_labelled(data, SplitConfig(0.2, test_ratio=0.25), 3).test, split.test)  # seeded
    assert len(plain.test) == 0 and "test" not in plain.counts  # off by default
    k = split_labelled(data, SplitConfig(0.2, test_ratio=0.25, folds=3, fold=1), seed=3)
    assert np.array_equal(k.test, split.test)  # folds split the rest, the test rows stay put
    with pytest.raises(DataError, match="test_ratio"):
        split_labelled(data, SplitConfig(0.2, test_ratio=1.0), 3)

    run = tmp_path / "run"
    res = train(TrainConfig.from_flat(fusion="concat", test_ratio=0.25, **FAST), data, str(run))
    assert {"accuracy", "macro_f1", "weighted_f1", "confusion_matrix"} <= set(res.metrics["test"])
    assert sum(map(sum, res.metrics["test"]["confusion_matrix"])) == len(res.split.test)
    assert all("test" not in k for row in res.history for k in row)  # selection never saw it
    saved = json.loads((run / "split.json").read_text())
    assert set(saved["test"]) == {data.guids[i] for i in res.split.test}
    assert not set(saved["test"]) & (set(saved["train"]) | set(saved["val"]))


# ----------------------------------------------------------------------------------------- cache axis
def test_caches_as_an_axis_share_one_split(tmp_path):
    a = build_synthetic_cache(str(tmp_path / "a.h5"), seed=0)
    b = build_synthetic_cache(str(tmp_path / "b.h5"), seed=0, noise=2.0, key="other-key")
    with h5py.File(b, "r+") as f:  # row 3 is bad in b only: it must leave both caches' splits
        f["samples/valid"][3] = False
    cfg = AblateConfig(cache=f"{a},{b}", out=str(tmp_path / "abl"), grid={"fusion": ["concat"]}, seeds=[0],
                       base=FAST, probe=True, progress=False, workers=1)
    assert [r.name for r in expand(cfg)] == ["cache=a,fusion=concat,seed=0", "cache=b,fusion=concat,seed=0"]
    res = ablate(cfg)
    assert res.trained == 4  # two heads and a probe per cache
    splits = {os.path.basename(d): json.loads(open(os.path.join(d, "split.json")).read()) for d in res.run_dirs}
    assert len({json.dumps([s["train"], s["val"]]) for s in splits.values()}) == 1
    assert "1003" not in splits["cache=a,fusion=concat,seed=0"]["train"] + splits["cache=a,fusion=concat,seed=0"]["val"]
    configs = {row["config"] for row in res.report.rows}
    assert configs == {"cache=a", "cache=b", "logreg-probe,cache=a", "logreg-probe,cache=b"}
    again = ablate(cfg)
    assert again.trained == 0 and again.skipped == 4  # resumable like any ablation
    other = build_synthetic_cache(str(tmp_path / "c.h5"), n_train=200)
    with pytest.raises(DataError, match="do not hold the same dataset"):
        ablate(AblateConfig(cache=f"{a},{other}", out=str(tmp_path / "x"), seeds=[0], base=FAST,
                            progress=False))
    with pytest.raises(ValueError, match="file names must differ"):
        AblateConfig(cache=f"{a},{tmp_path / 'sub' / 'a.h5'}", out="o").validate()


def test_cli_ablation_over_two_real_caches(views_cache, clean_cache, tmp_path):
    """The seeds' clean-text on/off x image views on/off, end to end through the CLI on real caches."""
    from cli import heads_app
    out = tmp_path / "grid"
    res = CliRunner().invoke(heads_app, [
        "ablate", "--cache", f"{views_cache},{clean_cache}", "--out", str(out), "--fusion", "concat",
        "--set", "image_aug_views=on,off", "--set", "epochs=2", "--set", "hidden=16", "--seeds", "0",
        "--no-progress"])
    assert res.exit_code == 0, res.output
    runs = sorted(os.listdir(out / "runs"))
    assert len(runs) == 4 and all(r.startswith(("cache=views,", "cache=clean,")) for r in runs)
    used = {r.replace(",epochs=2,hidden=16", ""): json.loads((out / "runs" / r / "metrics.json").read_text())
            ["image_views_used"] for r in runs}
    assert used["cache=views,fusion=concat,image_aug_views=True,seed=0"] == 2
    assert used["cache=views,fusion=concat,image_aug_views=False,seed=0"] == 0
    assert used["cache=clean,fusion=concat,image_aug_views=True,seed=0"] == 0  # no views in that cache
    assert "cache=views" in res.output and "cache=clean" in res.output
    # Paired against another axis value: each cache=views run vs the cache=clean run of the same other values
    # (the caches share one split by guid, so the pairs are on identical validation samples).
    res = CliRunner().invoke(heads_app, ["report", str(out), "--baseline", "cache=clean"])
    assert res.exit_code == 0, res.output
    paired = (out / "paired.md").read_text()
    assert "# Paired comparison against cache=clean" in paired
    rows = [ln for ln in paired.splitlines() if ln.startswith("| cache=views")]
    assert len(rows) == 2 and all("| cache=clean," in ln for ln in rows)
    res = CliRunner().invoke(heads_app, ["report", str(out), "--baseline", "image_aug_views=off"])
    assert res.exit_code == 0, res.output
    rows = [ln for ln in (out / "paired.md").read_text().splitlines() if ln.startswith("| cache=")]
    assert len(rows) == 2 and all("image_aug_views=True" in ln.split("|")[1] for ln in rows)
