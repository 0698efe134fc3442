"""What `heads predict` writes, checked against what the run's head computes in memory, and what `heads show`
prints, checked against metrics.json (issue 20).

The cache has invalid rows in the MIDDLE of the test split (not only the last one), so tags written by position
instead of by mask would misalign guids and tags; the run has a tuned bias.json whose offsets change some
decisions, so applying them with the wrong sign (or not at all) changes tags. Expected tags are computed here
from the in-memory head's logits plus the stored offsets, with numpy: not by calling predict's own code.
"""
from __future__ import annotations

import csv
import json
import os
import warnings

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import build_synthetic_cache
from heads.api import load_run
from heads.config import TrainConfig
from heads.data.cache import load_cache
from heads.infer import infer
from heads.train.crossfit import train_crossfit
from heads.train.stage1 import train

FAST = dict(epochs=3, patience=0, hidden=32, plots=False)
N_TRAIN, N_TEST = 150, 30
MIDDLE_INVALID = (N_TRAIN + 4, N_TRAIN + 11)  # test rows 4 and 11 of 30 (the last one is invalid too)
OFFSETS = [0.0, 1.5, -1.5]  # stored in bias.json: large enough to move many decisions


def heads_cli(*args):
    from cli import heads_app
    return CliRunner().invoke(heads_app, [str(a) for a in args])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return build_synthetic_cache(str(tmp_path_factory.mktemp("pred") / "c.h5"), n_train=N_TRAIN, n_test=N_TEST,
                                 noise=3.0, extra_invalid=MIDDLE_INVALID)


@pytest.fixture(scope="module")
def biased(cache, tmp_path_factory):
    """(run dir, expected tag per test guid (None: invalid), the head's logits on the valid test rows, data): a
    run trained with --tune-bias whose bias.json is then set to OFFSETS, so that the sign of the offsets
    matters for sure (asserted: not a vacuous check)."""
    run = str(tmp_path_factory.mktemp("biased") / "run")
    res = train(TrainConfig.from_flat(**FAST, fusion="concat", tune_bias=True), cache, run)
    with open(os.path.join(run, "bias.json")) as f:
        stored = json.load(f)
    stored["offsets"] = OFFSETS
    with open(os.path.join(run, "bias.json"), "w") as f:
        json.dump(stored, f)
    data = load_cache(cache)
    test = data.rows("test")
    ok = data.valid[test]
    logits = infer(res.model, data, test[ok])["logits"]
    tuned, flipped, raw = ((logits + s * np.asarray(OFFSETS)).argmax(1) for s in (1, -1, 0))
    assert (tuned != flipped).sum() >= 3 and (tuned != raw).sum() >= 3, "offsets too small to test their sign"
    expect = dict.fromkeys(data.guids[r] for r in test)
    for r, k in zip(test[ok], tuned):
        expect[data.guids[r]] = data.classes[k]
    return run, expect, logits, data


def _read(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cache_has_invalid_rows_in_the_middle_of_the_test_split(cache):
    data = load_cache(cache)
    test = data.rows("test")
    bad = np.flatnonzero(~data.valid[test]).tolist()
    assert bad == [4, 11, N_TEST - 1]


def test_cli_predict_applies_stored_offsets_and_keeps_guids_aligned(biased, cache, tmp_path):
    run, expect, logits, data = biased
    out = tmp_path / "p.csv"
    r = heads_cli("predict", "--run", run, "--cache", cache, "--out", out, "--proba")
    assert r.exit_code == 0, r.output
    rows = _read(out)
    assert [row["guid"] for row in rows] == list(expect)  # every test guid, in cache order
    from heads.predict import fallback_tag
    fallback = fallback_tag(run, data.classes)
    for row in rows:
        assert row["tag"] == (expect[row["guid"]] or fallback), row["guid"]
    invalid = [g for g, t in expect.items() if t is None]
    assert len(invalid) == 3
    for row in rows:  # invalid rows: empty probability cells; valid rows: the softmax of the raw logits
        cells = [row[f"p_{c}"] for c in data.classes]
        assert (cells == ["", "", ""]) == (row["guid"] in invalid)
    got = np.array([[float(row[f"p_{c}"]) for c in data.classes] for row in rows if row["guid"] not in invalid])
    want = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(got, want / want.sum(1, keepdims=True), atol=2e-6)
    flat = " ".join(r.output.split())
    counts = {t: sum(row["tag"] == t for row in rows) for t in data.classes}
    tags = ", ".join(f"{t} {n}" for t, n in sorted(counts.items()) if n)
    assert f"wrote {N_TEST} predictions ({tags}) to {out}" in flat
    assert f"3 invalid sample(s) written with the fallback tag '{fallback}': {', '.join(invalid)}" in flat


def test_cli_predict_without_proba_is_the_label_file_format(biased, cache, tmp_path):
    run, expect, _, data = biased
    out = tmp_path / "p.txt"
    r = heads_cli("predict", "--run", run, "--cache", cache, "--out", out, "--split", "test", "--device", "cpu")
    assert r.exit_code == 0, r.output
    lines = open(out).read().splitlines()
    assert lines[0] == "guid,tag"
    from heads.predict import fallback_tag
    fallback = fallback_tag(run, data.classes)
    assert lines[1:] == [f"{g},{t or fallback}" for g, t in expect.items()]


def test_api_predict_cache_applies_offsets_and_nan_for_invalid_rows(biased, cache):
    run, expect, logits, data = biased
    clf = load_run(run, device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pred = clf.predict_cache(cache, split="test")
    assert pred.ids == list(expect)
    assert list(pred) == [t or clf.fallback for t in expect.values()]
    invalid = [k for k, t in enumerate(expect.values()) if t is None]
    assert np.isnan(pred.proba[invalid]).all() and not np.isnan(np.delete(pred.proba, invalid, 0)).any()
    assert set(pred.problems) == {g for g, t in expect.items() if t is None}
    assert any("3 input row(s) got the fallback label" in str(w.message) for w in caught)
    np.testing.assert_allclose(np.log(np.delete(pred.proba, invalid, 0)),
                               logits - np.log(np.exp(logits).sum(1, keepdims=True)), atol=1e-4)


# ------------------------------------------------------------------------------------------------ heads show
def _shown(metrics: dict, key: str) -> str:
    return f"{metrics[key]:.4f}"


def test_show_a_missing_run_is_a_user_error(tmp_path):
    r = heads_cli("show", tmp_path / "nope")
    assert r.exit_code == 2 and "Traceback" not in r.output
    flat = " ".join(r.output.split())
    assert f"{tmp_path / 'nope'} has no metrics.json: not a finished run directory" in flat
    os.makedirs(tmp_path / "half")  # an unfinished run: config written, metrics.json not yet
    (tmp_path / "half" / "config.json").write_text("{}")
    r = heads_cli("show", tmp_path / "half")
    assert r.exit_code == 2 and "has no metrics.json" in r.output and "Traceback" not in r.output


def test_show_a_single_run_prints_its_metrics(biased):
    run = biased[0]
    m = json.load(open(os.path.join(run, "metrics.json")))
    r = heads_cli("show", run)
    assert r.exit_code == 0, r.output
    out = r.output
    assert f"concat · both · best epoch {m['best_epoch']} of {m['epochs_run']} · validation metrics" in out
    for key in ("accuracy", "macro_f1", "weighted_f1"):  # tuned and untuned columns, metrics.json's values
        line = next(ln for ln in out.splitlines() if f" {key} " in ln)
        assert _shown(m["untuned"], key) in line and _shown(m, key) in line, line
    for c in m["classes"]:
        line = next(ln for ln in out.splitlines() if f"F1 {c}" in ln)
        assert f"{m['per_class'][c]['f1']:.4f}" in line and f"{m['untuned']['per_class'][c]['f1']:.4f}" in line
    flat = " ".join(out.split())
    n = m["counts"]
    assert f"train {n['train']} · val {n['val']}" in flat and f"invalid excluded {n['invalid_excluded']}" in flat
    assert f"run directory: {run}" in flat


def test_show_a_crossfit_run_prints_out_of_fold_metrics(cache, tmp_path):
    run = str(tmp_path / "cv")
    train_crossfit(TrainConfig.from_flat(**{**FAST, "epochs": 2}, fusion="concat", folds=2), cache, run)
    m = json.load(open(os.path.join(run, "metrics.json")))
    r = heads_cli("show", run)
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    epochs = ", ".join(str(e) for e in m["folds"]["best_epoch"])
    assert f"2-fold cross-fit · best epochs {epochs} · out-of-fold metrics" in flat
    assert "out of fold" in r.output and "tuned bias" not in r.output
    for key in ("accuracy", "macro_f1", "weighted_f1"):
        line = next(ln for ln in r.output.splitlines() if f" {key} " in ln)
        assert _shown(m, key) in line, line
    f = m["folds"]["macro_f1"]
    assert f"per fold macro_f1 {f['mean']:.4f} ± {f['std']:.4f}" in flat
    assert f"{m['counts']['train']} labelled rows, each scored by the head that did not train on it" in flat
