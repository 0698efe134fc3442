"""Compatibility is a policy: a cache and run directories written by an older release keep working.

The old artefacts are not committed: the test rebuilds them from a pinned recipe, the code of release 0.1.0
(git revision PINNED, taken from this repository's history with `git archive`) run on a slice of the shared
MVSA data. Today's code must then read that cache, apply those runs (stage 1 and stage 2) with the same
predictions the old code wrote, continue from them, report on them, and treat a cache it extracts itself with
the same settings as interchangeable (same feature signature, same arrays).
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from mvsa_fixtures import require_mvsa

ROOT = Path(__file__).resolve().parent.parent
PINNED = "3fba5823dcb441594ba2971aba9ebbde0b746f10"  # release 0.1.0: schema 1, flat config.json


def _cli(src: Path, cwd: Path, app: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    code = f"import sys; sys.argv[0] = {app!r}; import cli; cli.{app}_app()"
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{app} {' '.join(args)} (code at {src}) failed:\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def old(tmp_path_factory):
    """A cache, stage-1 runs (film with a tuned bias, cross-attn, co-attn) and a stage-2 run written by the code of
    release 0.1.0."""
    data = require_mvsa()
    archive = subprocess.run(["git", "archive", PINNED, "cli.py", "featcache", "heads"], cwd=ROOT,
                             capture_output=True)
    if archive.returncode != 0:  # a shallow clone without the pinned commit
        pytest.skip(f"git revision {PINNED[:7]} is not in this clone's history: {archive.stderr.decode()[:200]}")
    work = tmp_path_factory.mktemp("compat")
    src = work / "src-0.1.0"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(src, filter="data")
    _cli(src, work, "featcache", "extract", "--data", str(data), "--limit", "40", "--text-layers", "1",
         "--out", "old.h5", "--no-progress")
    _cli(src, work, "heads", "train", "--cache", "old.h5", "--tune-bias", "--epochs", "3", "--no-plots",
         "--out", "old-run")
    _cli(src, work, "heads", "finetune", "--cache", "old.h5", "--unfreeze-text", "1", "--init", "old-run",
         "--epochs", "1", "--no-plots", "--out", "old-ft")
    for fusion in ("cross-attn", "co-attn"):  # heads rebuilt since (2026-12-07): their runs load the old layers
        _cli(src, work, "heads", "train", "--cache", "old.h5", "--fusion", fusion, "--epochs", "2", "--no-plots",
             "--out", f"old-{fusion}")
    for run in ("old-run", "old-ft", "old-cross-attn", "old-co-attn"):
        _cli(src, work, "heads", "predict", "--run", run, "--cache", "old.h5", "--split", "test",
             "--out", f"{run}/old_predictions.txt")
    return work


def _new(cwd: Path, monkeypatch, app: str, *args: str) -> str:
    """Today's code, in this process (typer's CliRunner): the same entry points users run."""
    from typer.testing import CliRunner

    import cli

    monkeypatch.chdir(cwd)
    r = CliRunner().invoke(getattr(cli, f"{app}_app"), list(args))
    assert r.exit_code == 0, f"{app} {' '.join(args)} failed:\n{r.output}\n{r.exception!r}"
    return r.output


def test_old_cache_reads(old, monkeypatch):
    out = _new(old, monkeypatch, "featcache", "info", "old.h5")
    assert "minilm-l6" in out and "80" in out  # 40 train + 40 test rows


@pytest.mark.parametrize("run", ["old-run", "old-ft", "old-cross-attn", "old-co-attn"])
def test_old_runs_predict_as_they_did(old, run, monkeypatch):
    _new(old, monkeypatch, "heads", "predict", "--run", run, "--cache", "old.h5", "--split", "test",
         "--out", f"{run}/new_predictions.txt")
    before = (old / run / "old_predictions.txt").read_text()
    assert (old / run / "new_predictions.txt").read_text() == before
    assert len(before.splitlines()) >= 40


def test_old_runs_show_and_continue(old, monkeypatch):
    assert "macro_f1" in _new(old, monkeypatch, "heads", "show", "old-run")
    assert "macro_f1" in _new(old, monkeypatch, "heads", "show", "old-ft")
    _new(old, monkeypatch, "heads", "finetune", "--cache", "old.h5", "--unfreeze-text", "1", "--init", "old-run",
         "--epochs", "1", "--no-plots", "--out", "new-ft")
    assert (old / "new-ft" / "metrics.json").exists()


def test_new_extraction_is_interchangeable_with_the_old_cache(old, monkeypatch):
    data = require_mvsa()
    # The old revision's default pair, named: the default has since become efficientnet-lite0-tf (other features).
    _new(old, monkeypatch, "featcache", "extract", "--data", str(data), "--limit", "40", "--text-layers", "1",
         "--backbone", "minilm-l6+efficientnet-lite0", "--out", "new.h5", "--no-progress")
    # The old run accepts the new cache (same feature signature) and predicts the same tags from it.
    _new(old, monkeypatch, "heads", "predict", "--run", "old-run", "--cache", "new.h5", "--split", "test",
         "--out", "old-run/on_new_cache.txt")
    assert (old / "old-run" / "on_new_cache.txt").read_text() == (old / "old-run" / "old_predictions.txt").read_text()
    with h5py.File(old / "old.h5", "r") as a, h5py.File(old / "new.h5", "r") as b:
        for name in ("text/tokens", "text/mask", "text/pooled", "image/tokens", "image/pooled",
                     "text_hidden/states", "samples/label", "samples/valid"):
            assert np.array_equal(a[name][()], b[name][()]), name
