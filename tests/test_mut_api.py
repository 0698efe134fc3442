"""The Python API (`heads.load_run`) against the CLI, on backbones that cost nothing: tests/word_tower.py's
text tower and a pure-torch pixel tower registered for the test, so a real `featcache extract` of a small
manifest folder (and the API's own extraction of raw pairs) takes a fraction of a second. The API's labels and
probabilities equal `heads predict --data` / `--cache` on the same rows; bad rows keep their place with the
run's fallback label, NaN probabilities and a problem naming the position; input mistakes are user errors.
Written for `make mutate` (TESTING.md); tests/test_predict_data.py does the same with real (tiny) models."""
from __future__ import annotations

import contextlib
import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import word_tower as wt
from cli import heads_app
from featcache.backbones import BACKBONES
from featcache.backbones.base import ImageEncoder
from featcache.backbones.registry import Alias, BackboneSpec, Family
from featcache.backbones.weights import WeightsSource
from featcache.errors import ConfigError
from featcache.extract.config import ExtractConfig
from featcache.extract.engine import extract
from heads import load_run
from heads.config import TrainConfig
from heads.ensemble import build_ensemble
from heads.predict import fallback_tag
from heads.train.stage1 import train

IMAGE = "mut-pixel-tower"
COLORS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])  # the image of a class: its colour, plus noise
N_TRAIN, N_TEST = 45, 9
FAST = dict(patience=0, hidden=16, plots=False)


class PixelTower(ImageEncoder):
    """An 8x8 RGB image -> 4 patch tokens (a 4x4 stride-4 conv) and their mean; fixed weights."""

    token_dim = pooled_dim = 6
    num_patches, image_size = 4, 8

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 4, stride=4)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))

    def transform(self, img):
        return pixels(img)

    def pixel_transform(self):
        return pixels

    def forward_features(self, x):
        tokens = self.conv(x).flatten(2).transpose(1, 2)
        return {"tokens": tokens, "pooled": tokens.mean(1)}


def pixels(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB").resize((8, 8)), dtype=np.float32) / 255).permute(2, 0, 1)


@contextlib.contextmanager
def towers():
    """The word tower (text) and the pixel tower (image) as backbones, for the extractions of this module."""
    spec = BackboneSpec(name=IMAGE, modalities=("image",), hub="", description="test pixel tower",
                        family=Family(name="test", locate=lambda *a: WeightsSource("path", "/nowhere/pixel-tower"),
                                      build_image=lambda spec, source: PixelTower()))
    with wt.registered(), pytest.MonkeyPatch.context() as mp:
        mp.setitem(BACKBONES._entries, IMAGE, Alias(IMAGE, "", ("image",), "test pixel tower", own=spec))
        yield


def image(label: int, rng) -> Image.Image:
    a = np.clip(COLORS[label] + rng.normal(0, 25, (8, 8, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A manifest folder (45 labelled train rows, 9 unlabelled test rows whose ids hold commas, one of them with a
    missing image; words and colour carry the label), its cache and a stage-1 run with bias offsets."""
    root = tmp_path_factory.mktemp("mutapi")
    rng = np.random.default_rng(3)
    folder = root / "data"
    folder.mkdir()
    rows, pairs = [], []
    for k in range(N_TRAIN + N_TEST):
        label = int(rng.integers(0, 3))
        text = " ".join(rng.choice(wt.WORDS[label], size=int(rng.integers(2, wt.T + 1))).tolist())
        name = f"{k}.png"
        image(label, rng).save(folder / name)
        test = k >= N_TRAIN
        if k == N_TRAIN + 4:
            name = "gone.png"  # missing: the row is invalid in the cache
        rows.append({"id": f"t,{k}" if test else str(k), "text": text, "image": name,
                     **({} if test else {"label": ["neg", "neu", "pos"][label]})})
        if test:
            pairs.append((text, str(folder / name)))
    with open(folder / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with towers():
        cache = extract(ExtractConfig(data=str(folder), backbone=f"{wt.NAME}+{IMAGE}", out=str(root / "c.h5"),
                                      workers=0, batch_size=16, max_text_len=wt.T), progress=False)
        run = train(TrainConfig.from_flat(fusion="concat", epochs=2, lr=0.05, **FAST), cache, str(root / "run")).run_dir
        with open(os.path.join(run, "bias.json"), "w") as f:  # offsets that change some tags
            json.dump({"labels": ["neg", "neu", "pos"], "offsets": [0.0, 0.3, -0.2]}, f)
        yield {"root": root, "folder": folder, "cache": cache, "run": run, "pairs": pairs}


@pytest.fixture(scope="module")
def ens(env):
    """An ensemble of the run and a second (film) run: only its own test pays for the second training."""
    with towers():
        other = train(TrainConfig.from_flat(fusion="film", epochs=1, lr=0.05, seed=1, **FAST), env["cache"],
                      str(env["root"] / "other")).run_dir
    build_ensemble([env["run"], other], str(env["root"] / "ens"))
    return str(env["root"] / "ens")


def cli_predict(run: str, tmp_path, *source) -> tuple[list[str], list[str], np.ndarray]:
    """`heads predict --proba` on `source` (--cache C or --data D): guids, tags, probabilities (NaN: empty)."""
    out = tmp_path / f"cli-{len(os.listdir(tmp_path))}.csv"
    res = CliRunner().invoke(heads_app, ["predict", "--run", run, *map(str, source), "--out", str(out), "--proba"])
    assert res.exit_code == 0, res.output
    header, *lines = out.read_text(encoding="utf-8").splitlines()
    assert header == "guid,tag,p_neg,p_neu,p_pos"
    cells = [line.rsplit(",", 4) for line in lines]  # the guids hold commas: the last 4 cells are tag and p_*
    proba = np.array([[float(v) if v else np.nan for v in c[2:]] for c in cells])
    return [c[0] for c in cells], [c[1] for c in cells], proba


def warned_at(caught) -> set:
    """The files the fallback warnings point at. Under `make mutate` mutmut wraps every mutated function in a
    trampoline, which adds frames and moves the location: there this check is left to the normal suite."""
    if "MUTANT_UNDER_TEST" in os.environ:
        return {__file__}
    return {w.filename for w in caught if "fallback" in str(w.message)}


def fallback_warning(caught) -> str:
    """The one fallback warning among those caught (extraction may add ResourceWarnings of its own)."""
    (msg,) = [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "fallback" in str(w.message)]
    return msg


@pytest.mark.parametrize("kind", ["run", "ens"])
def test_raw_pairs_predict_as_the_cli_does_on_the_same_rows(env, tmp_path, kind, request):
    """Paths, bytes and PIL images: labels and probabilities equal `heads predict --data` on the folder (a
    single run with bias offsets, an ensemble)."""
    run = env["run"] if kind == "run" else request.getfixturevalue("ens")
    with towers():
        guids, tags, proba = cli_predict(run, tmp_path, "--data", env["folder"], "--split", "test")
        clf = load_run(run, device="cpu")
        assert clf.classes == ["neg", "neu", "pos"] and clf.fallback == fallback_tag(run, clf.classes)
        texts = [t for t, _ in env["pairs"]]
        images = [p if k % 3 == 0 else open(p, "rb").read() if k % 3 == 1 else Image.open(p)
                  for k, (_, p) in enumerate(env["pairs"]) if k != 4]
        texts.pop(4)  # the pair with the missing image: see test_bad_rows
        del guids[4], tags[4]
        proba = np.delete(proba, 4, axis=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # good input: no warning
            labels = clf.predict(texts=texts, images=images)
            got = clf.predict_proba(texts=texts, images=images)
    assert list(labels) == tags and len(set(tags)) >= 2 and labels.problems == {} and clf.problems == {}
    assert labels.ids is None and labels.fallback == clf.fallback
    assert got.shape == (N_TEST - 1, 3) and np.isfinite(got).all()
    # the API extracts its 8 pairs, the CLI the split's 9 rows: other batches may round a stored fp16 feature
    # the other way, so allow more than the written precision (1e-6), far less than any wrong column or row
    np.testing.assert_allclose(got, proba, atol=1e-4, rtol=0)
    np.testing.assert_allclose(labels.proba, proba, atol=1e-4, rtol=0)
    assert guids == [f"t,{N_TRAIN + k}" for k in range(N_TEST) if k != 4]


def test_predict_cache_is_the_cli_on_the_cache(env, tmp_path):
    """Every row of the split by guid (commas in guids kept), invalid rows with the fallback and NaN."""
    guids, tags, proba = cli_predict(env["run"], tmp_path, "--cache", env["cache"])
    clf = load_run(env["run"])
    with pytest.warns(UserWarning, match=r"^1 input row\(s\) got the fallback label '\w+': t,49: invalid in the "
                                         r"cache$") as caught:
        res = clf.predict_cache(env["cache"])
    assert warned_at(caught) == {__file__}  # the user's line
    assert res.ids == guids == [f"t,{k}" for k in range(N_TRAIN, N_TRAIN + N_TEST)]
    assert list(res) == tags and res[4] == clf.fallback and len(set(tags)) >= 2
    assert res.problems == clf.problems == {"t,49": "invalid in the cache"}
    assert np.isnan(res.proba[4]).all() and np.isnan(proba[4]).all()
    np.testing.assert_array_equal(np.delete(res.proba, 4, 0), np.delete(proba, 4, 0))
    train = clf.predict_cache(env["cache"], split="train")  # another split: its rows, no problems
    assert len(train) == N_TRAIN and train.ids == [str(k) for k in range(N_TRAIN)] and train.problems == {}


def test_bad_rows_keep_their_place_with_the_fallback(env, tmp_path):
    (text, path), good_text = env["pairs"][0], env["pairs"][1][0]
    raw = open(path, "rb").read()
    texts = [text, "", "   ", None, 7, good_text, text, text, text, text]
    handle = open(path, "rb")  # an open file is not one of the image types: a bad row, not a crash
    images = [path, path, path, path, path, raw, b"not an image", str(tmp_path / "none.png"), 3.5, handle]
    with towers():
        clf = load_run(env["run"], device="cpu")
        alone = clf.predict(texts=[text, good_text], images=[path, raw])
        with pytest.warns(UserWarning) as caught:
            res = clf.predict(texts=texts, images=images)
    handle.close()
    bad = [1, 2, 3, 4, 6, 7, 8, 9]
    assert sorted(res.problems) == bad and list(res.problems) == bad and clf.problems == res.problems
    assert [res[k] for k in bad] == [clf.fallback] * 8 and [res[0], res[5]] == list(alone)
    assert np.isnan(res.proba[bad]).all() and np.isfinite(res.proba[[0, 5]]).all()
    np.testing.assert_allclose(res.proba[[0, 5]], alone.proba, atol=1e-4, rtol=0)
    assert res.problems[1] == res.problems[2] == res.problems[3] == "empty text: the run's fallback label"
    assert res.problems[4] == "text of type int, not str: the run's fallback label"
    for k in (6, 7, 8, 9):
        assert f"guid {k}" in res.problems[k]  # extraction's own problem line for the image
    assert "not-an-image-8-float" in res.problems[8] and "not-an-image-9-BufferedReader" in res.problems[9]
    msg = fallback_warning(caught)
    assert msg.startswith(f"8 input row(s) got the fallback label {clf.fallback!r}: 1: empty text: the run's "
                          "fallback label; 2: empty text") and "..." not in msg


def test_more_than_ten_problems_are_cut_in_the_warning(env):
    text, path = env["pairs"][0]
    with towers():
        clf = load_run(env["run"])
        with pytest.warns(UserWarning) as caught:
            res = clf.predict(texts=[""] * 11 + [text], images=[path] * 12)
    msg = fallback_warning(caught)
    assert msg.startswith("11 input row(s) got the fallback label") and msg.endswith("9: empty text: the run's "
                                                                                     "fallback label ...")
    assert warned_at(caught) == {__file__}  # the warning points at the user's line, not into heads/api.py
    assert "10: " not in msg and sorted(res.problems) == list(range(11)) and res[11] != "" and len(res) == 12


def test_input_mistakes_are_user_errors_and_no_input_no_rows(env, tmp_path):
    clf = load_run(env["run"])
    assert clf.problems == {}  # before any call
    with pytest.raises(ConfigError, match=r"^give one image per text: 2 texts, 1 images$"):
        clf.predict(texts=["a", "b"], images=["x.png"])
    for texts, kind in (("one post", "str"), (None, "NoneType"), (b"bytes", "bytes"), (iter(["a"]), "list_iterator")):
        with pytest.raises(ConfigError, match=rf"^texts must be a list \(one entry per post\), got {kind}$"):
            clf.predict(texts=texts, images=["x.png"])
    with pytest.raises(ConfigError, match=r"^images must be a list"):
        clf.predict_proba(texts=["a"], images="x.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        empty = clf.predict(texts=(), images=[])
    assert list(empty) == [] and empty.problems == {} and empty.ids == [] and empty.proba.shape == (0, 3)
    assert clf.predict_proba(texts=[], images=[]).shape == (0, 3)
    with pytest.raises(FileNotFoundError):
        load_run(os.path.join(env["run"], "nope"))
    half = tmp_path / "half"  # a config.json alone (a copy cut short) is not a run
    half.mkdir()
    (half / "config.json").write_text(open(os.path.join(env["run"], "config.json")).read())
    with pytest.raises(FileNotFoundError, match=r"half is not a heads run directory \(no cache\.json\)"):
        load_run(str(half))


def test_the_working_directory_is_left_alone(env, tmp_path, monkeypatch):
    """The predictions file and the raw pairs' manifest live in a temporary folder: a user's own p.csv or
    metadata.jsonl in the working directory is neither overwritten nor joined by new files."""
    monkeypatch.chdir(tmp_path)
    mine = {"p.csv": "my own file\n", "metadata.jsonl": "{}\n"}
    for name, text in mine.items():
        (tmp_path / name).write_text(text)
    text, path = env["pairs"][0]
    clf = load_run(env["run"])
    with pytest.warns(UserWarning, match="invalid in the cache"):
        assert len(clf.predict_cache(env["cache"])) == N_TEST
    with towers(), pytest.warns(UserWarning, match="fallback label"):
        assert len(clf.predict(texts=[text, ""], images=[path, open(path, "rb").read()])) == 2
    assert sorted(os.listdir(tmp_path)) == sorted(mine)
    assert all((tmp_path / name).read_text() == text for name, text in mine.items())


def test_the_api_prints_nothing_and_loads_the_backbones_once(env, capfd, monkeypatch):
    """A library call reports through its return value and a warning, not on the terminal; the backbones load
    at the first raw prediction and stay loaded for the next (the extraction engine keeps one set)."""
    from featcache.extract import engine
    text, path = env["pairs"][0]
    loads = []
    real = engine.create_text
    monkeypatch.setattr(engine, "create_text", lambda *a, **k: loads.append(a) or real(*a, **k))
    with towers():
        clf = load_run(env["run"])
        first = clf.predict(texts=[text], images=[path])
        loaded = len(loads)  # 1, or 0 when an earlier test's classifier left the same backbones loaded
        again = clf.predict(texts=[text, text], images=[path, path])
    assert loaded <= 1 and len(loads) == loaded and list(again) == list(first) * 2
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    with towers():  # progress=True: extraction's progress goes to stderr (and only there)
        assert list(load_run(env["run"], progress=True).predict(texts=[text], images=[path])) == list(first)
    out, err = capfd.readouterr()
    assert out == "" and "extract" in err
