"""`heads ablate` / `heads report` on small synthetic caches: the summary agrees with the runs, an interrupted
ablation resumes, grids parse strictly, K-fold splits partition the data (the paired bootstrap: test_report.py)."""
from __future__ import annotations

import csv
import glob
import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import build_synthetic_cache
from heads.ablate import AblateConfig, ablate, expand, load_grid_toml, parse_axis

FAST = ["--set", "epochs=2", "--set", "hidden=16", "--set", "patience=0"]
FAST_BASE = {"plots": False, "epochs": 2, "hidden": 16, "patience": 0}
C = ["negative", "neutral", "positive"]


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load(path: str):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # Small and noisy: quick to train, and validation is not trivially perfect (differences are non-zero).
    return build_synthetic_cache(str(tmp_path_factory.mktemp("cache") / "c.h5"), n_train=150, noise=3.0)


@pytest.fixture(scope="module")
def cli_ablation(cache, tmp_path_factory):
    """One CLI ablation shared by the tests that only read its outputs: 2 fusions x 3 modalities x 2 seeds
    + probes."""
    from cli import heads_app
    out = str(tmp_path_factory.mktemp("abl") / "a")
    r = CliRunner().invoke(heads_app, ["ablate", "--cache", cache, "--out", out, "--fusion", "concat,gmu",
                                       "--modality", "both,text,image", "--seeds", "0,1", "--probe",
                                       "--no-progress", *FAST])
    assert r.exit_code == 0, r.output
    return out


def test_summary_equals_run_metrics(cli_ablation):
    out = cli_ablation
    runs = sorted(os.listdir(os.path.join(out, "runs")))
    assert len(runs) == 2 * 3 * 2 + 2
    assert "fusion=gmu,modality=text,epochs=2,hidden=16,patience=0,seed=1" in runs
    by_config: dict[str, list[dict]] = {}
    for name in runs:
        m = load(os.path.join(out, "runs", name, "metrics.json"))
        label = "logreg-probe" if name.startswith("probe") else f"fusion={m['fusion']},modality={m['modality']}"
        by_config.setdefault(label, []).append(m)
    rows = read_csv(os.path.join(out, "summary.csv"))
    assert {r["config"] for r in rows} == set(by_config) and len(rows) == 7
    for row in rows:
        ms = by_config[row["config"]]
        assert int(row["n"]) == len(ms) == 2
        for key, get in (("accuracy", lambda m: m["accuracy"]), ("macro_f1", lambda m: m["macro_f1"]),
                         ("weighted_f1", lambda m: m["weighted_f1"]),
                         ("neutral_f1", lambda m: m["per_class"]["neutral"]["f1"]),
                         ("train_s", lambda m: m["timing"]["train_s"])):
            values = [get(m) for m in ms]
            assert float(row[f"{key}_mean"]) == pytest.approx(np.mean(values), abs=1e-12), (row["config"], key)
            assert float(row[f"{key}_std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    f1 = [float(r["macro_f1_mean"]) for r in rows]
    assert f1 == sorted(f1, reverse=True)
    best = load(os.path.join(out, "best.json"))
    assert best["config"] == next(r["config"] for r in rows if r["config"] != "logreg-probe")
    assert best["train_config"]["fusion"] in ("concat", "gmu")
    assert os.path.getsize(os.path.join(out, "comparison.png")) > 1000
    # The probe is a run like the others: same metric keys, same split as the head runs of its seed.
    probe = os.path.join(out, "runs", "probe=logreg,seed=0")
    head = os.path.join(out, "runs", "fusion=concat,modality=both,epochs=2,hidden=16,patience=0,seed=0")
    assert load(os.path.join(probe, "split.json"))["val"] == load(os.path.join(head, "split.json"))["val"]
    assert set(load(os.path.join(head, "metrics.json"))) - {"best_epoch", "epochs_run"} <= \
        set(load(os.path.join(probe, "metrics.json")))

    # Paired: gmu vs concat for each modality; the observed difference is the difference of summary means.
    paired = read_csv(os.path.join(out, "paired.csv"))
    assert len(paired) == 3
    means = {r["config"]: float(r["macro_f1_mean"]) for r in rows}
    for p in paired:
        assert p["baseline"] == p["config"].replace("gmu", "concat") and int(p["pairs"]) == 2
        assert float(p["diff"]) == pytest.approx(means[p["config"]] - means[p["baseline"]], abs=1e-12)
        assert float(p["ci_lo"]) <= float(p["diff"]) <= float(p["ci_hi"])
    modality = open(os.path.join(out, "modality.md")).read()
    assert "| fusion=concat,modality=both | 2 |" in modality and "| fusion=gmu,modality=both | 2 |" in modality


def sklearn_summary(out: str) -> dict[str, dict[str, tuple[float, float]]]:
    """config -> metric -> (mean, std over seeds), recomputed with sklearn from each run's val_predictions.csv:
    an expectation independent of heads' metrics and summary code."""
    from sklearn.metrics import accuracy_score, f1_score
    per: dict[str, dict[str, list]] = {}
    for name in sorted(os.listdir(os.path.join(out, "runs"))):
        d = os.path.join(out, "runs", name)
        if name.startswith("probe"):
            label = "logreg-probe"
        else:
            flat = load(os.path.join(d, "config.json"))["train"]
            label = f"fusion={flat['fusion']},modality={flat['modality']}"
        rows = read_csv(os.path.join(d, "val_predictions.csv"))
        y, p = [r["label"] for r in rows], [r["pred"] for r in rows]
        scores = {"accuracy": accuracy_score(y, p),
                  "macro_f1": f1_score(y, p, labels=C, average="macro", zero_division=0),
                  "weighted_f1": f1_score(y, p, labels=C, average="weighted", zero_division=0)}
        for k, v in scores.items():
            per.setdefault(label, {}).setdefault(k, []).append(v)
    return {c: {k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0) for k, v in m.items()}
            for c, m in per.items()}


def assert_summary_is_sklearns(out: str) -> None:
    want = sklearn_summary(out)
    rows = read_csv(os.path.join(out, "summary.csv"))
    assert {r["config"] for r in rows} == set(want)
    for r in rows:
        for key, (mean, std) in want[r["config"]].items():
            assert float(r[f"{key}_mean"]) == pytest.approx(mean, abs=1e-6), (r["config"], key)
            if int(r["n"]) > 1:
                assert float(r[f"{key}_std"]) == pytest.approx(std, abs=1e-6), (r["config"], key)


def test_report_rebuilds_identical_summaries(cli_ablation, tmp_path):
    from cli import heads_app
    before = {n: open(os.path.join(cli_ablation, n), "rb").read() for n in ("summary.csv", "summary.md",
                                                                              "paired.csv", "best.json")}
    for n in before:
        os.remove(os.path.join(cli_ablation, n))
    r = CliRunner().invoke(heads_app, ["report", cli_ablation])
    assert r.exit_code == 0, r.output
    for n, content in before.items():
        assert open(os.path.join(cli_ablation, n), "rb").read() == content, n
    assert_summary_is_sklearns(cli_ablation)  # and what it rebuilt is right, not only the same
    r = CliRunner().invoke(heads_app, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "no finished run directories" in r.output


def test_interrupted_ablation_resumes(cache, tmp_path, monkeypatch):
    import heads.train.stage1
    real_train = heads.train.stage1.train
    calls = []

    def interrupted(cfg, data, out_dir=None, console=None):
        calls.append(out_dir)
        if len(calls) == 3:  # dies mid-run: config written, no metrics
            os.makedirs(out_dir, exist_ok=True)
            open(os.path.join(out_dir, "config.json"), "w").write("{}")
            raise KeyboardInterrupt
        return real_train(cfg, data, out_dir, console)

    grid = {"fusion": ["concat", "gmu"], "modality": ["both", "text"]}
    cfg = AblateConfig(cache=cache, out=str(tmp_path / "a"), grid=grid, seeds=[0], base=FAST_BASE, progress=False,
                       workers=1)  # in order, in this process: the call list above sees every run
    monkeypatch.setattr(heads.train.stage1, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ablate(cfg)
    first = [os.path.join(d, "metrics.json") for d in calls[:2]]
    mtimes = [os.stat(p).st_mtime_ns for p in first]

    calls.clear()
    monkeypatch.setattr(heads.train.stage1, "train", lambda *a, **k: (calls.append(a[2]), real_train(*a, **k))[1])
    res = ablate(cfg)
    assert (res.trained, res.skipped) == (2, 2) and len(calls) == 2
    assert [os.stat(p).st_mtime_ns for p in first] == mtimes  # not retrained

    whole = ablate(AblateConfig(**{**cfg.__dict__, "out": str(tmp_path / "b")}))
    assert whole.trained == 4
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("train_s")} for r in rows]  # noqa: E731
    assert strip(read_csv(tmp_path / "a" / "summary.csv")) == strip(read_csv(tmp_path / "b" / "summary.csv"))
    assert_summary_is_sklearns(str(tmp_path / "a"))
    for name in os.listdir(tmp_path / "b" / "runs"):  # each resumed run predicts what the uninterrupted one did
        assert read_csv(tmp_path / "a" / "runs" / name / "val_predictions.csv") == \
            read_csv(tmp_path / "b" / "runs" / name / "val_predictions.csv"), name
    # A finished run whose config changed is retrained, not silently reused.
    changed = ablate(AblateConfig(**{**cfg.__dict__, "base": {**FAST_BASE, "lr": 5e-3}}))
    assert changed.trained == 4


def test_resume_is_by_cache_key_not_path(cache, tmp_path):
    """The same --out with another cache trains anew (before, a one-cache ablation took the runs of whatever
    cache had filled it as finished: other data's metrics under this cache's name); a copy of the same cache
    at another path (a node-local one) resumes."""
    import shutil
    cfg = AblateConfig(cache=cache, out=str(tmp_path / "a"), grid={"fusion": ["concat"]}, seeds=[0],
                       base=FAST_BASE, progress=False, probe=True, workers=1, n_boot=50)
    assert ablate(cfg).trained == 2  # the head and the probe
    copy = shutil.copy(cache, tmp_path / "copy.h5")
    assert (ablate(AblateConfig(**{**cfg.__dict__, "cache": str(copy)}))).skipped == 2
    other = build_synthetic_cache(str(tmp_path / "other.h5"), n_train=150, noise=3.0, seed=1, key="other-key")
    res = ablate(AblateConfig(**{**cfg.__dict__, "cache": other}))
    assert (res.trained, res.skipped) == (2, 0)
    for name in os.listdir(tmp_path / "a" / "runs"):
        assert load(tmp_path / "a" / "runs" / name / "cache.json")["key"] == "other-key", name


def test_parallel_ablation_resumes_and_matches_itself(cache, tmp_path, monkeypatch):
    import heads.train.stage1
    real_train = heads.train.stage1.train

    def dies_on_gmu_text(cfg, data, out_dir=None, console=None):  # runs in a forked worker
        if cfg.head.fusion == "gmu" and cfg.head.modality == "text":
            raise RuntimeError("worker died")
        return real_train(cfg, data, out_dir, console)

    grid = {"fusion": ["concat", "gmu"], "modality": ["both", "text"]}
    cfg = AblateConfig(cache=cache, out=str(tmp_path / "a"), grid=grid, seeds=[0], base=FAST_BASE, progress=False,
                       workers=2)
    monkeypatch.setattr(heads.train.stage1, "train", dies_on_gmu_text)
    with pytest.raises(RuntimeError, match="worker died"):
        ablate(cfg)
    finished = sorted(glob.glob(str(tmp_path / "a" / "runs" / "*" / "metrics.json")))
    assert finished and not any("fusion=gmu,modality=text" in p for p in finished)
    mtimes = [os.stat(p).st_mtime_ns for p in finished]

    monkeypatch.setattr(heads.train.stage1, "train", real_train)
    res = ablate(cfg)
    assert res.skipped == len(finished) and res.trained == 4 - len(finished)
    assert [os.stat(p).st_mtime_ns for p in finished] == mtimes  # finished runs were not retrained
    for d in res.run_dirs:  # each parallel run recorded the one thread it used
        assert json.load(open(os.path.join(d, "config.json")))["train"]["threads"] == 1
    again = ablate(AblateConfig(**{**cfg.__dict__, "out": str(tmp_path / "b")}))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("train_s")} for r in rows]  # noqa: E731
    assert strip(read_csv(tmp_path / "a" / "summary.csv")) == strip(read_csv(tmp_path / "b" / "summary.csv"))
    assert again.trained == 4


def test_grid_parsing(tmp_path):
    assert parse_axis("label_smoothing=0,0.1") == ("label_smoothing", [0.0, 0.1])
    key, values = parse_axis("rdrop=0,1")
    assert values == [0.0, 1.0] and all(type(v) is float for v in values)
    assert parse_axis("epochs=3,5") == ("epochs", [3, 5])
    assert parse_axis("tune-bias=true,no") == ("tune_bias", [True, False])
    with pytest.raises(ValueError, match="not a valid int"):
        parse_axis("epochs=3.5")
    with pytest.raises(ValueError, match="unknown grid axis 'nope'.*valid: fusion, modality, "):
        parse_axis("nope=1")
    with pytest.raises(ValueError, match="unknown grid axis 'folds'"):
        parse_axis("folds=2")

    toml = tmp_path / "grid.toml"
    toml.write_text('fusion = ["concat", "film"]\nlabel_smoothing = [0, 0.1]\nepochs = 3\n')
    grid = load_grid_toml(str(toml))
    assert grid == {"fusion": ["concat", "film"], "label_smoothing": [0.0, 0.1], "epochs": [3]}
    runs = expand(AblateConfig(cache="c.h5", out="o", grid=grid).validate())
    assert len(runs) == 2 * 2 * 3 and len({r.name for r in runs}) == 12
    assert runs[1].name == "fusion=concat,label_smoothing=0.0,epochs=3,seed=1"
    assert runs[1].train.loss.label_smoothing == 0.0 and runs[1].train.optim.epochs == 3 and runs[1].train.seed == 1
    toml.write_text('epochs = ["3"]\n')
    with pytest.raises(ValueError, match="expected int"):
        load_grid_toml(str(toml))

    default = expand(AblateConfig(cache="c.h5", out="o"))
    assert len(default) == 45 and default[0].name == "fusion=concat,modality=both,seed=0"
    two = expand(AblateConfig(cache="x/a.h5,y/b.h5", out="o", grid=grid).validate())
    assert len(two) == 24 and two[12].name == "cache=b,fusion=concat,label_smoothing=0.0,epochs=3,seed=0"


def test_cli_grid_errors(cache, tmp_path):
    from cli import heads_app
    runner = CliRunner()
    base = ["ablate", "--cache", cache, "--out", str(tmp_path / "x")]
    r = runner.invoke(heads_app, base + ["--set", "warp=1,2"])
    assert r.exit_code == 2 and "valid: fusion" in r.output and "Traceback" not in r.output
    r = runner.invoke(heads_app, base + ["--fusion", "concat,nope"])
    assert r.exit_code == 2 and "valid: concat" in r.output
    r = runner.invoke(heads_app, base + ["--baseline", "nope"])
    assert r.exit_code == 2 and "valid: concat" in r.output
    r = runner.invoke(heads_app, base + ["--fusion", "concat", "--baseline", "loss=ce"])
    assert r.exit_code == 2 and "'loss' is not an axis" in " ".join(r.output.split())
    r = runner.invoke(heads_app, base + ["--baseline", "fusion="])
    assert r.exit_code == 2 and "KEY=VALUE" in r.output
    assert not os.path.exists(tmp_path / "x" / "runs")  # refused before anything ran


def test_folds_make_each_config_one_crossfit_run(cache, tmp_path):
    """--folds K: each configuration and seed is ONE cross-fit run, the code and result of `heads train
    --folds K` (its folds partition the labelled rows); summaries and the paired comparison use its
    out-of-fold predictions, and the probe is cross-fitted on the same folds. (Before, --folds K trained the K
    folds as K separate runs, each scored on its own fold only.)"""
    from heads.config import TrainConfig
    from heads.data.cache import load_cache
    from heads.train.crossfit import train_crossfit
    cfg = AblateConfig(cache=cache, out=str(tmp_path / "f"), grid={"fusion": ["concat", "gmu"]}, seeds=[0], folds=3,
                       base=FAST_BASE, progress=False, probe=True, workers=1, n_boot=50)
    res = ablate(cfg)
    names = sorted(os.path.basename(d) for d in res.run_dirs)
    assert res.trained == 3 and names == ["fusion=concat,seed=0,folds=3", "fusion=gmu,seed=0,folds=3",
                                          "probe=logreg,seed=0,folds=3"]
    run = os.path.join(cfg.out, "runs", "fusion=gmu,seed=0,folds=3")
    s = load(os.path.join(run, "split.json"))
    vals = [set(v) for v in s["fold_val"]]
    assert len(vals) == 3 and all(not (a & b) for i, a in enumerate(vals) for b in vals[i + 1:])
    data = load_cache(cache)
    usable = {g for g, y, v in zip(data.guids, data.labels, data.valid) if y >= 0 and v}
    assert set().union(*vals) == usable and s["folds"] == 3
    same = train_crossfit(TrainConfig.from_flat(**FAST_BASE, fusion="gmu", seed=0, folds=3), cache,
                          str(tmp_path / "cv"))  # `heads train --folds 3` with the same settings
    assert read_csv(os.path.join(run, "val_predictions.csv")) == read_csv(os.path.join(same.run_dir,
                                                                                      "val_predictions.csv"))
    assert load(os.path.join(run, "metrics.json"))["macro_f1"] == same.metrics["macro_f1"]
    probe = load(os.path.join(cfg.out, "runs", "probe=logreg,seed=0,folds=3", "metrics.json"))
    assert probe["crossfit"] == 3 and probe["counts"]["val"] == len(usable)
    rows = {r["config"]: r for r in read_csv(os.path.join(cfg.out, "summary.csv"))}
    assert rows["fusion=gmu"]["n"] == "1" and float(rows["fusion=gmu"]["macro_f1_mean"]) == \
        pytest.approx(same.metrics["macro_f1"])
    paired = read_csv(os.path.join(cfg.out, "paired.csv"))
    assert len(paired) == 1 and paired[0]["pairs"] == "1" and paired[0]["samples"] == str(len(usable))
    assert ablate(cfg).trained == 0  # resumes: the cross-fit runs are found finished

def test_longest_runs_start_first(tmp_path):
    """With several workers the token-level runs go first (a long run taken last idles the other workers), the
    cost proxy follows each run's modality, and equal runs keep the grid's order."""
    from heads.parallel import longest_first
    cfg = AblateConfig(cache="c.h5", out=str(tmp_path), seeds=[0, 1],
                       grid={"fusion": ["concat", "film", "cross-attn"], "modality": ["both", "text", "image"]})
    jobs = [(spec, spec.name) for spec in expand(cfg)]
    order = [name for _, name in longest_first(jobs)]
    assert sorted(order) == sorted(name for _, name in jobs)
    first = [n for n in order if n.startswith("fusion=cross-attn,modality=both")]
    assert order[:2] == first == ["fusion=cross-attn,modality=both,seed=0", "fusion=cross-attn,modality=both,seed=1"]
    # one token array: film on images, cross-attn with one modality; then the rest (film on text reads none)
    assert set(order[2:10]) == {f"fusion={f},modality={m},seed={s}" for f, m in
                                [("film", "both"), ("film", "image"), ("cross-attn", "text"), ("cross-attn", "image")]
                                for s in (0, 1)}
    assert order[10:] == [n for _, n in jobs if n not in order[:10]]  # stable: the grid's own order
