"""Using a trained run on new posts (issue 18): `heads predict --data` (raw data extracted as the run's cache
was), the Python API (`heads.load_run`) and `featcache.extract(...)`.

One tiny extraction (tiny RoBERTa + tiny CLIP image tower, with the states of the top text layer) trains a
stage-1 run, a stage-2 run, a cross-fit run and an ensemble; for each, the three routes (`predict --cache` on
that cache, `predict --data` on the raw folder, the API on the same pairs given as paths, bytes and PIL
images) must give the same labels and probabilities to fp16 tolerance. Also: weights whose sha256 is not the
recorded one are refused with both checksums named, and bad input rows keep their place with the fallback label.
"""
from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import featcache
import tiny_models as tm
from cli import featcache_app, heads_app
from featcache.backbones.weights import ENV_DIR
from featcache.digest import file_sha256
from featcache.extract import engine
from featcache.extract.config import ExtractConfig
from featcache.extract.engine import extract
from heads import load_run
from heads.config import FinetuneConfig, TrainConfig
from heads.ensemble import build_ensemble
from heads.train.crossfit import train_crossfit
from heads.train.stage1 import train
from heads.train.stage2 import finetune

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
BACKBONE = "roberta-base+clip-vit-b32"
FAST = dict(epochs=3, patience=0, hidden=16, plots=False)
PROBA_ATOL = 2e-3  # the features are stored in fp16; the same rows in other batches round alike to ~1e-3


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pd")
    weights = root / "weights"
    tm.make_tiny_roberta(str(weights / "roberta-base"))
    tm.make_tiny_clip(str(weights / "clip-vit-b32"))
    data = tm.make_mvsa(str(root / "mvsa"), n=30, n_test=6)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv(ENV_DIR, str(weights))
        cache = extract(ExtractConfig(data=data, backbone=BACKBONE, text_layers=1, out=str(root / "train.h5"),
                                      workers=0, batch_size=8, max_text_len=24), progress=False)
        runs = {"stage1": train(TrainConfig.from_flat(**FAST, fusion="concat"), cache, str(root / "s1")).run_dir,
                "stage2": finetune(FinetuneConfig.from_flat(text_layers=1, fusion="concat", **FAST), cache,
                                   str(root / "s2")).run_dir,
                "crossfit": train_crossfit(TrainConfig.from_flat(**FAST, fusion="film", folds=2), cache,
                                           str(root / "cv")).run_dir}
        build_ensemble([runs["stage1"], runs["crossfit"]], str(root / "ens"))
        runs["ensemble"] = str(root / "ens")
        yield {"root": root, "data": data, "weights": weights, "cache": cache, "runs": runs}


def cli(*args) -> tuple[int, str]:
    res = CliRunner().invoke(heads_app, [str(a) for a in args])
    return res.exit_code, res.output


def read_preds(path) -> tuple[list[str], list[str], np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = [c for c in rows[0] if c.startswith("p_")]
    proba = np.array([[float(r[c]) if r[c] else np.nan for c in cols] for r in rows])
    return [r["guid"] for r in rows], [r["tag"] for r in rows], proba


def test_pairs(env):
    """The test split's pairs of the raw folder as the API takes them: paths, bytes and PIL images mixed."""
    guids = read_preds_guids(env["data"])
    data = os.path.join(env["data"], "data")
    texts = [open(os.path.join(data, f"{g}.txt"), encoding="utf-8").read() for g in guids]
    paths = [os.path.join(data, f"{g}.jpg") for g in guids]
    images = [p if k % 3 == 0 else open(p, "rb").read() if k % 3 == 1 else Image.open(p) for k, p in enumerate(paths)]
    return guids, texts, images


def read_preds_guids(data) -> list[str]:
    with open(os.path.join(data, "test_without_label.txt")) as f:
        return [line.split(",")[0] for line in f.read().split()[1:]]


@pytest.mark.parametrize("kind", ["stage1", "stage2", "crossfit", "ensemble"])
def test_data_api_and_cache_routes_agree(env, tmp_path, kind):
    run = env["runs"][kind]
    code, out = cli("predict", "--run", run, "--cache", env["cache"], "--out", tmp_path / "cache.csv", "--proba")
    assert code == 0, out
    code, out = cli("predict", "--run", run, "--data", env["data"], "--split", "test", "--out", tmp_path / "data.csv",
                    "--proba", "--keep-cache", tmp_path / "kept.h5")
    assert code == 0, out
    guids, tags, proba = read_preds(tmp_path / "cache.csv")
    g2, tags2, proba2 = read_preds(tmp_path / "data.csv")
    assert g2 == guids == read_preds_guids(env["data"]) and tags2 == tags
    np.testing.assert_allclose(proba2, proba, atol=PROBA_ATOL)

    clf = load_run(run)
    _, texts, images = test_pairs(env)
    labels = clf.predict(texts=texts, images=images)
    assert list(labels) == tags and not labels.problems
    np.testing.assert_allclose(clf.predict_proba(texts=texts, images=images), proba, atol=PROBA_ATOL)
    cached = clf.predict_cache(str(tmp_path / "kept.h5"))  # the kept cache holds the test split only
    assert list(cached) == tags and cached.ids == guids


def test_ensemble_of_two_caches_predicts_raw_data_with_one_extraction_each(env, tmp_path, monkeypatch):
    """An ensemble whose members read caches of other preprocessing (here the token limit; in use, another
    text backbone): `--data` extracts one cache per member group, and the three routes agree."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(ENV_DIR, str(env["weights"]))
    short = extract(ExtractConfig(data=env["data"], backbone=BACKBONE, out=str(tmp_path / "short.h5"), workers=0,
                                  batch_size=8, max_text_len=12), progress=False)
    other = train(TrainConfig.from_flat(**FAST, fusion="gmu"), short, str(tmp_path / "gmu")).run_dir
    ens = str(tmp_path / "ens")
    build_ensemble([env["runs"]["crossfit"], other], ens)
    code, out = cli("predict", "--run", ens, "--cache", f"{short},{env['cache']}", "--out", tmp_path / "c.csv",
                    "--proba")
    assert code == 0, out
    code, out = cli("predict", "--run", ens, "--data", env["data"], "--out", tmp_path / "d.csv", "--proba",
                    "--keep-cache", tmp_path / "kept.h5")
    assert code == 0, out
    assert os.path.exists(tmp_path / "kept.h5") and os.path.exists(tmp_path / "kept.1.h5")  # one per backbone
    (gc, tc, pc), (gd, td, pd) = read_preds(tmp_path / "c.csv"), read_preds(tmp_path / "d.csv")
    assert gc == gd == read_preds_guids(env["data"]) and tc == td
    np.testing.assert_allclose(pd, pc, atol=PROBA_ATOL)
    alone = [cli("predict", "--run", r, "--cache", c, "--out", tmp_path / f"{k}.csv", "--proba")[0]
             for k, (r, c) in enumerate([(env["runs"]["crossfit"], env["cache"]), (other, short)])]
    assert alone == [0, 0]
    np.testing.assert_allclose(pc, (read_preds(tmp_path / "0.csv")[2] + read_preds(tmp_path / "1.csv")[2]) / 2,
                               atol=2e-6)
    _, texts, images = test_pairs(env)
    clf = load_run(ens)
    assert list(clf.predict(texts=texts, images=images)) == tc
    loads = []
    monkeypatch.setattr(engine, "create_text", lambda *a, **k: loads.append(a) or pytest.fail("reloaded"))
    assert list(clf.predict(texts=texts, images=images)) == tc and not loads  # both backbones' towers were kept
    assert list(clf.predict_cache([str(tmp_path / "kept.h5"), str(tmp_path / "kept.1.h5")])) == tc


def test_featcache_extract_in_python_then_predict_cache(env, tmp_path):
    res = featcache.extract(env["data"], out=tmp_path / "test.h5", backbone=BACKBONE, max_text_len=24,
                            splits=("test",), workers=0, progress=False)
    assert res.path == str(tmp_path / "test.h5") and os.path.exists(res.path)
    assert res.report["samples"] == 6 and list(res.report["splits"]) == ["test"] and res.report["invalid"] == 0
    code = CliRunner().invoke(featcache_app, ["extract", "--data", env["data"], "--backbone", BACKBONE, "--split",
                                              "test", "--max-text-len", "24", "--out", str(tmp_path / "cli.h5"),
                                              "--workers", "0", "--no-progress"]).exit_code
    assert code == 0 and featcache.extract(env["data"], out=tmp_path / "cli.h5", backbone=BACKBONE, max_text_len=24,
                                           splits=("test",), progress=False).report["key"] == res.report["key"]
    run = env["runs"]["stage1"]
    assert cli("predict", "--run", run, "--cache", res.path, "--out", tmp_path / "a.csv", "--proba")[0] == 0
    assert cli("predict", "--run", run, "--data", env["data"], "--format", "mvsa", "--out", tmp_path / "b.csv",
               "--proba")[0] == 0  # the format named instead of detected: the same rows
    (ga, ta, pa), (gb, tb, pb) = read_preds(tmp_path / "a.csv"), read_preds(tmp_path / "b.csv")
    assert ga == gb and ta == tb
    np.testing.assert_allclose(pa, pb, atol=PROBA_ATOL)


def test_other_weights_are_refused_with_both_checksums(env, tmp_path, monkeypatch):
    other = tmp_path / "weights"
    shutil.copytree(env["weights"] / "clip-vit-b32", other / "clip-vit-b32")
    tm.make_tiny_roberta(str(other / "roberta-base"), seed=1)  # same architecture, other weights
    monkeypatch.setenv(ENV_DIR, str(other))
    recorded, found = file_sha256(str(env["weights"] / "roberta-base")), file_sha256(str(other / "roberta-base"))
    assert recorded != found
    for kind in ("stage1", "stage2"):
        code, out = cli("predict", "--run", env["runs"][kind], "--data", env["data"], "--out", tmp_path / "p.csv",
                        "--keep-cache", tmp_path / "k.h5")
        flat = " ".join(out.split())
        assert code == 2, out
        assert "roberta-base" in flat and recorded in flat and found in flat and "Traceback" not in out
        assert "refusing to extract" in flat  # before extraction, not by the run's check of a finished cache
        assert not os.path.exists(tmp_path / "p.csv") and not os.path.exists(tmp_path / "k.h5.partial")
    with pytest.raises(featcache.errors.UserError, match=found):
        load_run(env["runs"]["stage1"]).predict(texts=["hello"], images=[str(tmp_path / "x.jpg")])


def test_bad_input_rows_keep_their_place_with_the_fallback_label(env, tmp_path):
    run = env["runs"]["stage1"]
    clf = load_run(run)
    _, texts, images = test_pairs(env)
    good = clf.predict(texts=texts[:2], images=images[:2])
    bad_texts = [texts[0], "", texts[1], "fine text", "also fine", None]
    bad_images = [images[0], images[0], images[1], b"not an image at all", str(tmp_path / "missing.jpg"), images[1]]
    with pytest.warns(UserWarning, match="fallback label"):
        labels = clf.predict(texts=bad_texts, images=bad_images)
    proba = labels.proba
    assert len(labels) == 6 and labels.fallback == clf.fallback
    assert sorted(labels.problems) == [1, 3, 4, 5]
    assert "empty text" in labels.problems[1] and "empty text" in labels.problems[5]
    assert "guid 3" in labels.problems[3] and "guid 4" in labels.problems[4]  # extraction's own problem lines
    assert [labels[k] for k in (1, 3, 4, 5)] == [clf.fallback] * 4
    assert [labels[0], labels[2]] == list(good)  # the good rows are unaffected by their bad neighbours
    assert np.isnan(proba[[1, 3, 4, 5]]).all() and np.isfinite(proba[[0, 2]]).all()

    # the same through `predict --data`: a corrupt image in the folder is listed, its row written
    data = tmp_path / "mvsa"
    shutil.copytree(env["data"], data)
    guid = read_preds_guids(str(data))[2]
    (data / "data" / f"{guid}.jpg").write_bytes(b"\xff\xd8 truncated")
    code, out = cli("predict", "--run", run, "--data", data, "--out", tmp_path / "p.csv", "--proba")
    assert code == 0, out
    guids, tags, proba = read_preds(tmp_path / "p.csv")
    assert guids == read_preds_guids(str(data)) and tags[2] == clf.fallback and np.isnan(proba[2]).all()
    assert "1 invalid sample(s)" in out and guid in out


def test_input_mistakes_are_user_errors(env):
    clf = load_run(env["runs"]["stage1"])
    with pytest.raises(featcache.errors.UserError, match="one image per text"):
        clf.predict(texts=["a", "b"], images=["x.jpg"])
    with pytest.raises(featcache.errors.UserError, match="must be a list"):
        clf.predict(texts="a single string", images=["x.jpg"])
    code, out = cli("predict", "--run", env["runs"]["stage1"], "--out", "p.csv")
    assert code == 2 and "exactly one of --cache" in out
    assert json.load(open(os.path.join(env["runs"]["stage1"], "config.json")))["classes"] == clf.classes


def test_api_loads_the_backbones_once(env, monkeypatch):
    clf = load_run(env["runs"]["stage1"])
    _, texts, images = test_pairs(env)
    first = clf.predict(texts=texts, images=images)
    loads = []
    real = engine.create_text
    monkeypatch.setattr(engine, "create_text", lambda *a, **k: loads.append(a) or real(*a, **k))
    assert clf.predict(texts=texts[::-1], images=images[::-1]) == first[::-1] and loads == []
    extract(ExtractConfig(data=env["data"], backbone=BACKBONE, max_text_len=24, splits=("test",), workers=0,
                          out=str(env["root"] / "plain.h5")), progress=False)
    assert len(loads) == 1  # an ordinary extraction loads its own (and drops the kept ones)
