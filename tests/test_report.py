"""`heads report` extras: group-by and correlation agree with hand computations from the run files, the top-k
LaTeX table is escaped and well-formed, summary.html is self-contained with one embedded PNG per figure,
option mistakes are clear errors, and the head parameter count is recorded and recoverable. Reports read
config.json flat (today) or nested, take class names from metrics.json, and heads.report stays in layers."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from heads.config import TrainConfig
from heads.report.compare import holm, paired_bootstrap
from heads.report.tables import latex_escape
from heads.train.metrics import compute_metrics
from test_ablate import cache, cli_ablation, load, read_csv  # noqa: F401  (fixtures reused)


@pytest.fixture(scope="module")
def ablation(cli_ablation):
    """test_ablate's CLI ablation: concat,gmu x both,text,image x seeds 0,1, plus one probe per seed."""
    return cli_ablation


def report(*args):
    from cli import heads_app
    return CliRunner().invoke(heads_app, ["report", *map(str, args)])


def runs_on_disk(out: str) -> list[tuple[dict | None, dict]]:
    """(train config or None for a probe, metrics) of every run directory, read straight from the files."""
    runs = []
    for name in sorted(os.listdir(os.path.join(out, "runs"))):
        d = os.path.join(out, "runs", name)
        runs.append((load(os.path.join(d, "config.json")).get("train"), load(os.path.join(d, "metrics.json"))))
    return runs


def test_group_by_equals_hand_computation(ablation, tmp_path):
    r = report(ablation, "--out", tmp_path, "--group-by", "fusion")
    assert r.exit_code == 0, r.output
    assert "# macro-F1 by fusion" in r.output  # printed, not only written
    rows = {row["fusion"]: row for row in read_csv(tmp_path / "groupby_fusion.csv")}
    runs = runs_on_disk(ablation)
    assert set(rows) == {"concat", "gmu", "logreg-probe"}
    for fusion, row in rows.items():
        members = [(t, m) for t, m in runs if (t["fusion"] if t else "logreg-probe") == fusion]
        f1 = np.array([m["macro_f1"] for _, m in members])
        assert int(row["runs"]) == len(members) == (2 if fusion == "logreg-probe" else 6)
        assert float(row["mean"]) == pytest.approx(f1.mean(), abs=1e-12)
        assert float(row["std"]) == pytest.approx(f1.std(ddof=1), abs=1e-12)
        assert float(row["best_run"]) == pytest.approx(f1.max(), abs=1e-12)
        if fusion != "logreg-probe":  # best configuration = best modality by its mean over the 2 seeds
            by_mod = {mod: np.mean([m["macro_f1"] for t, m in members if t["modality"] == mod])
                      for mod in ("both", "text", "image")}
            best = max(by_mod, key=by_mod.get)
            assert int(row["configs"]) == 3
            assert float(row["best_config_mean"]) == pytest.approx(by_mod[best], abs=1e-12)
            assert row["best_config"] == f"fusion={fusion},modality={best}"

    # Two keys and another metric; train_s would pick the fastest, accuracy the highest.
    r = report(ablation, "--out", tmp_path, "--group-by", "modality,fusion", "--metric", "accuracy")
    assert r.exit_code == 0, r.output
    rows = read_csv(tmp_path / "groupby_modality_fusion.csv")
    assert len(rows) == 3 * 2 + 1 and rows[-1]["modality"] == "logreg-probe"
    for row in rows[:-1]:
        acc = [m["accuracy"] for t, m in runs if t and (t["modality"], t["fusion"]) == (row["modality"], row["fusion"])]
        assert int(row["runs"]) == 2 and int(row["configs"]) == 1
        assert float(row["mean"]) == pytest.approx(np.mean(acc), abs=1e-12)
        assert float(row["best_run"]) == pytest.approx(max(acc), abs=1e-12)
    r = report(ablation, "--out", tmp_path, "--group-by", "fusion", "--metric", "train_s")
    fastest = {row["fusion"]: float(row["best_run"]) for row in read_csv(tmp_path / "groupby_fusion.csv")}
    assert fastest["gmu"] == pytest.approx(min(m["timing"]["train_s"] for t, m in runs if t and t["fusion"] == "gmu"))


def test_option_mistakes_are_clear_errors(ablation, tmp_path):
    r = report(ablation, "--out", tmp_path / "x", "--group-by", "fusion,nope")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "unknown --group-by key 'nope'" in r.output and "valid:" in r.output
    assert all(k in r.output for k in ("fusion", "label_smoothing", "lr", "seed"))
    assert not os.path.exists(tmp_path / "x" / "summary.md")  # refused before anything was written
    r = report(ablation, "--out", tmp_path / "x", "--metric", "f2")
    assert r.exit_code == 2 and "unknown report metric 'f2'; valid: accuracy, macro_f1" in r.output
    r = report(ablation, "--out", tmp_path / "x", "--export", "md,docx")
    assert r.exit_code == 2 and "unknown export format 'docx'; valid: md, latex" in r.output
    assert not os.path.exists(tmp_path / "x" / "summary.md")


def fake_run(root, name: str, f1: float, history: list[float] | None = None, **train) -> None:
    """A finished run directory written by hand: config.json and metrics.json (+ history.json)."""
    from heads.rundir import save_json
    d = os.path.join(root, "runs", name)
    os.makedirs(d)
    per_class = {c: {"precision": f1, "recall": f1, "f1": f1, "support": 10} for c in ("negative", "neutral",
                                                                                        "positive")}
    save_json(os.path.join(d, "config.json"), {"train": TrainConfig.from_flat(fusion="film", **train).flat()})
    if history is not None:
        save_json(os.path.join(d, "history.json"), [{"epoch": e + 1, "macro_f1": v} for e, v in enumerate(history)])
    save_json(os.path.join(d, "metrics.json"), {"accuracy": f1, "macro_f1": f1, "weighted_f1": f1,
                                                "per_class": per_class, "timing": {"train_s": 1.0}})


def test_correlation_sign_and_curves_on_a_constructed_case(tmp_path):
    # macro-F1 rises with lr and falls with label smoothing; hidden is constant, seed is not a hyperparameter.
    lrs, smoothing = [1e-4, 1e-3, 1e-2, 1e-2], [0.2, 0.1, 0.0, 0.0]
    f1s = [0.40, 0.50, 0.55, 0.60]
    for k, (lr, ls, f1) in enumerate(zip(lrs, smoothing, f1s)):
        fake_run(tmp_path, f"r{k}", f1, lr=lr, label_smoothing=ls, seed=k,
                 history=[0.1, 0.2, 0.3] if k == 2 else [0.3, 0.4] if k == 3 else None)
    r = report(tmp_path)
    assert r.exit_code == 0, r.output
    rows = {row["key"]: row for row in read_csv(tmp_path / "correlation.csv")}
    assert set(rows) == {"lr", "label_smoothing"}
    assert float(rows["lr"]["pearson"]) == pytest.approx(np.corrcoef(lrs, f1s)[0, 1])
    assert float(rows["lr"]["pearson"]) > 0
    assert float(rows["label_smoothing"]["pearson"]) < 0
    assert float(rows["lr"]["spearman"]) > 0.9 and float(rows["label_smoothing"]["spearman"]) < -0.9
    assert rows["lr"]["n"] == "4" and rows["lr"]["values"] == "3"
    assert "| lr | 4 | 3 | +" in r.output  # printed too

    from heads.report.page import mean_curves
    from heads.report.runs import find_run_dirs, label_runs, load_run
    runs = [load_run(d) for d in find_run_dirs([str(tmp_path)])]
    label_runs(runs)
    curves = mean_curves(runs, "macro_f1")
    # r2 and r3 share a configuration; r3 stopped after 2 epochs, so epoch 3 is r2 alone.
    (config,) = {r.config for r in runs if r.dir.endswith(("r2", "r3"))}
    assert set(curves) == {config} and np.allclose(curves[config], [0.2, 0.3, 0.3])
    assert os.path.exists(tmp_path / "summary.html")  # runs without history or head weights still get a page

    # The top-k table splits the configuration into its varying keys; their names need escaping in LaTeX.
    r = report(tmp_path, "--export", "latex")
    assert r.exit_code == 0, r.output
    rows = check_latex(open(tmp_path / "top10.tex").read(), 3)  # r2 and r3 are one configuration
    assert rows[0].startswith(r"rank & label\_smoothing & lr & macro-F1")
    assert rows[1].startswith("1 & 0.0 & 0.01 & $0.575 \\pm 0.035$")  # mean, std (ddof=1) of 0.55 and 0.60
    assert not os.path.exists(tmp_path / "top10.md")  # only the formats asked for
    assert report(tmp_path, "--top", "2").exit_code == 0  # --top alone: Markdown
    assert os.path.exists(tmp_path / "top2.md") and not os.path.exists(tmp_path / "top2.tex")
    r = report(tmp_path, "--top", "-1")
    assert r.exit_code == 2 and "--top must be a positive number" in r.output


def test_top_k_markdown_and_latex(ablation, tmp_path):
    r = report(ablation, "--out", tmp_path, "--top", "3", "--export", "md,latex")
    assert r.exit_code == 0, r.output
    summary = sorted(read_csv(tmp_path / "summary.csv"), key=lambda s: -float(s["macro_f1_mean"]))[:3]
    md = open(tmp_path / "top3.md").read().splitlines()
    table = [line for line in md if line.startswith("| ") and not line.startswith("| rank")]
    assert len(table) == 3
    for line, s in zip(table, summary):
        assert f"{float(s['macro_f1_mean']):.4f} ± {float(s['macro_f1_std']):.4f}" in line

    tex = open(tmp_path / "top3.tex").read()
    rows = check_latex(tex, 3)
    for line, s in zip(rows[1:], summary):
        assert f"${float(s['macro_f1_mean']):.3f} \\pm {float(s['macro_f1_std']):.3f}$" in line
        keys = ["logreg-probe", ""] if s["config"] == "logreg-probe" else \
            s["config"].replace("fusion=", "").split(",modality=")
        assert line.split(" & ")[1:3] == keys  # the configuration split into a fusion and a modality column


def check_latex(tex: str, n: int) -> list[str]:
    """Asserts the table is well-formed LaTeX with booktabs and n body rows; returns header + body rows."""
    assert "\\usepackage{booktabs}" in tex.splitlines()[0]  # the comment says what the preamble needs
    body = re.sub(r"\\[{}$&%#_]", "", tex)  # escaped specials are text, not syntax
    assert body.count("{") == body.count("}")
    assert re.findall(r"\\begin\{(\w+)\}", tex) == list(reversed(re.findall(r"\\end\{(\w+)\}", tex)))
    assert tex.index(r"\toprule") < tex.index(r"\midrule") < tex.index(r"\bottomrule")
    spec = re.search(r"\\begin\{tabular\}\{(\w+)\}", tex).group(1)
    rows = [line for line in tex.splitlines() if line.endswith(r"\\")]
    assert len(rows) == 1 + n  # header + body
    for line in rows:
        assert len(re.findall(r"(?<!\\)&", line)) == len(spec) - 1  # every row has every column
        assert len(re.findall(r"(?<!\\)\$", line)) % 2 == 0  # math mode closed
    for line in tex.splitlines()[1:]:
        assert not re.search(r"(?<!\\)[_#%]", line), line  # no unescaped special outside the comment
    return rows


def test_latex_escape():
    assert latex_escape("a_b & 50% #1 $x$ {y} ~ ^ \\") == \
        r"a\_b \& 50\% \#1 \$x\$ \{y\} \textasciitilde{} \textasciicircum{} \textbackslash{}"
    assert latex_escape(0.001) == "0.001"


def test_summary_page_is_self_contained(ablation):
    # Written by `heads ablate` itself (the fixture only ran the ablation).
    html = open(os.path.join(ablation, "summary.html"), encoding="utf-8").read()
    images = re.findall(r'<img alt="(\w+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert [name for name, _ in images] == ["comparison", "cost", "radar", "curves"]
    for _, data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    rest = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:", html)
    assert "src=" in html and "http" not in rest.lower() and "<script" not in rest.lower()
    assert not re.search(r'(src|href)="(?!data:)', rest)  # nothing refers to another file
    # Every configuration is in the page's table, with the head parameter count recorded by its runs.
    for s in read_csv(os.path.join(ablation, "summary.csv")):
        assert f">{s['config']}<" in html
    for _, m in runs_on_disk(ablation):  # probes included: their coefficient count
        assert f"<td>{m['head_params']:,}</td>" in html
    from PIL import Image
    with Image.open(os.path.join(ablation, "summary.png")) as im, \
            Image.open(io.BytesIO(base64.b64decode(images[0][1]))) as panel:
        assert im.width >= panel.width and im.height > panel.height  # the panels tiled into one image


def test_head_params_recorded_and_recovered(ablation):
    from heads.infer import load_head
    from heads.rundir import head_params
    d = os.path.join(ablation, "runs", next(n for n in sorted(os.listdir(os.path.join(ablation, "runs")))
                                          if n.startswith("fusion=gmu")))
    metrics = load(os.path.join(d, "metrics.json"))
    model, _ = load_head(d)
    n = sum(p.numel() for p in model.parameters())
    assert metrics["head_params"] == n > 0
    assert head_params(d, {}) == n  # older runs: counted from head.safetensors' header
    probe = os.path.join(ablation, "runs", "probe=logreg,seed=0")
    assert load(os.path.join(probe, "metrics.json"))["head_params"] == 3 * (16 + 20 + 1)  # 3 x (pooled dims + 1)
    assert head_params(probe, {}) is None  # no record, no weights file: unknown, not a guess


def test_paired_bootstrap():
    rng = np.random.default_rng(1)
    groups = []
    for n in (300, 200):
        y = rng.integers(0, 3, n)
        good = np.where(rng.random(n) < 0.7, y, rng.integers(0, 3, n))
        bad = np.where(rng.random(n) < 0.5, y, rng.integers(0, 3, n))
        groups.append((y, good, bad))
    res = paired_bootstrap(groups, 3, n_boot=500, seed=3)
    C = ["negative", "neutral", "positive"]
    expected = np.mean([compute_metrics(y, a, C)["macro_f1"] - compute_metrics(y, b, C)["macro_f1"]
                        for y, a, b in groups])
    assert res["diff"] == pytest.approx(expected, abs=1e-12)
    assert res["ci_lo"] < res["diff"] < res["ci_hi"] and res["ci_lo"] > 0  # a clearly better model
    assert paired_bootstrap(groups, 3, n_boot=500, seed=3) == res
    assert paired_bootstrap(groups, 3, n_boot=500, seed=4) != res
    same = paired_bootstrap([(y, a, a) for y, a, _ in groups], 3, n_boot=200)
    assert same["diff"] == same["ci_lo"] == same["ci_hi"] == 0.0
    flipped = paired_bootstrap([(y, b, a) for y, a, b in groups], 3, n_boot=500, seed=3)
    assert flipped["diff"] == pytest.approx(-res["diff"]) and flipped["ci_hi"] < 0
    assert res["p"] == pytest.approx(2 / 501) and same["p"] == 1.0  # never 0; no difference: 1


def test_holm_adjustment():
    # Holm by hand: sorted p 0.01, 0.02, 0.03, 0.5 times 4, 3, 2, 1 -> 0.04, 0.06, 0.06 (monotone), 0.5
    np.testing.assert_allclose(holm([0.03, 0.5, 0.01, 0.02]), [0.06, 0.5, 0.04, 0.06])
    assert holm([0.9, 0.8]).tolist() == [1.0, 1.0] and holm([]).size == 0



# ------------------------------------------------------------------------------------------ config shapes
def nest(train: dict, top_level: bool) -> dict:
    """A nested config.json of the same run: head / optim / split sections (+ env and classes, which are not
    parameters); top_level: without the "train" wrapper."""
    head = {k: train[k] for k in ("fusion", "modality", "hidden", "dropout", "attn_heads", "modality_dropout")}
    split = {k: train[k] for k in ("seed", "val_ratio", "test_ratio", "folds", "fold")}
    optim = {k: v for k, v in train.items() if k not in head and k not in split}
    run = {"head": head, "optim": optim, "split": split}
    env = {"python": "3.x", "threads": 99, "git": "abc"}
    return {**run, "env": env, "classes": ["a", "b"]} if top_level else {"train": run, "env": env}


def test_flat_and_nested_config_json_give_the_same_report(tmp_path):
    from heads.report.runs import config_params
    lrs, f1s = [1e-4, 1e-3, 1e-2, 1e-2], [0.40, 0.50, 0.55, 0.60]
    for k, (lr, f1) in enumerate(zip(lrs, f1s)):
        fake_run(tmp_path / "flat", f"r{k}", f1, lr=lr, seed=k % 2)
    flat_cfg = load(tmp_path / "flat" / "runs" / "r0" / "config.json")
    assert config_params(flat_cfg) == flat_cfg["train"]  # today's shape: the train section as it is
    for shape, top_level in (("nested", False), ("toplevel", True)):
        for k in range(4):
            shutil.copytree(tmp_path / "flat" / "runs" / f"r{k}", tmp_path / shape / "runs" / f"r{k}")
            path = tmp_path / shape / "runs" / f"r{k}" / "config.json"
            nested = nest(load(path)["train"], top_level)
            assert config_params(nested) == load(path)["train"]  # leaf names = today's flat names
            with open(path, "w") as f:
                json.dump(nested, f)
    outputs = ("summary.csv", "summary.md", "correlation.csv", "groupby_lr.csv", "groupby_lr.md", "top10.md")
    for shape in ("flat", "nested", "toplevel"):
        r = report(tmp_path / shape, "--group-by", "lr", "--top", "10")
        assert r.exit_code == 0, r.output
    for name in outputs:
        text = open(tmp_path / "flat" / name).read()
        assert open(tmp_path / "nested" / name).read() == open(tmp_path / "toplevel" / name).read() == text, name
    assert "lr=0.01" in open(tmp_path / "nested" / "summary.md").read()
    best = load(tmp_path / "nested" / "best.json")["train_config"]
    assert best == load(tmp_path / "nested" / "runs" / "r2" / "config.json")["train"]  # as written, to retrain
    with pytest.raises(ValueError, match="two different values for 'lr'"):
        config_params({"train": {"optim": {"lr": 0.1}, "head": {"lr": 0.2}}})


# ------------------------------------------------------------------------------------------ class names
def f1_per_class(y, pred, k: int) -> np.ndarray:
    from sklearn.metrics import f1_score
    return f1_score(y, pred, labels=list(range(k)), average=None, zero_division=0)


def class_run(root, name: str, classes: list[str], labels: list[int], preds: list[int], **train) -> None:
    """A finished run with its own class names in metrics.json and val_predictions.csv."""
    from heads.rundir import save_json
    d = os.path.join(root, "runs", name)
    os.makedirs(d)
    f1 = f1_per_class(labels, preds, len(classes))
    m = {"accuracy": float(np.mean(np.equal(labels, preds))), "macro_f1": float(f1.mean()),
         "weighted_f1": float(np.average(f1, weights=np.bincount(labels, minlength=len(classes)))),
         "per_class": {c: {"f1": float(f1[k])} for k, c in enumerate(classes)}, "classes": classes,
         "timing": {"train_s": 1.0}}
    save_json(os.path.join(d, "config.json"), {"train": TrainConfig.from_flat(train).flat()})
    save_json(os.path.join(d, "metrics.json"), m)
    with open(os.path.join(d, "val_predictions.csv"), "w") as f:
        f.write("guid,label,pred\n" + "".join(f"g{i},{classes[y]},{classes[p]}\n"
                                              for i, (y, p) in enumerate(zip(labels, preds))))


def test_class_names_come_from_the_runs(tmp_path):
    classes = ["negative", "neutral", "positive", "mixed"]  # four classes, the legacy three first
    y = [0, 1, 2, 3] * 10
    for seed in (0, 1):
        class_run(tmp_path, f"concat{seed}", classes, y, [3 - v for v in y], fusion="concat", seed=seed)
        class_run(tmp_path, f"gmu{seed}", classes, y, [v if i % 3 else 0 for i, v in enumerate(y)], fusion="gmu",
                  seed=seed)
    r = report(tmp_path)
    assert r.exit_code == 0, r.output
    (paired,) = read_csv(tmp_path / "paired.csv")  # gmu vs concat: macro-F1 over four classes
    f1 = lambda p: f1_per_class(y, p, len(classes)).mean()  # noqa: E731
    assert float(paired["diff"]) == pytest.approx(f1([v if i % 3 else 0 for i, v in enumerate(y)])
                                                  - f1([3 - v for v in y]), abs=1e-12)
    assert float(paired["p_holm"]) == pytest.approx(float(paired["p"]))  # one comparison: nothing to adjust
    assert "Holm p" in open(tmp_path / "paired.md", encoding="utf-8").read()
    html = open(tmp_path / "summary.html", encoding="utf-8").read()
    assert all(f"<th>F1 {c}</th>" in html for c in classes)

    from rich.console import Console

    from heads.report.console import summary_table
    console = Console(record=True, width=100)
    console.print(summary_table(load(tmp_path / "runs" / "gmu0" / "metrics.json")))
    assert "F1 mixed" in console.export_text()

    class_run(tmp_path, "other", ["negative", "neutral", "positive"], [0, 1, 2], [0, 1, 2], fusion="film")
    r = report(tmp_path, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "report runs of one dataset together" in r.output


# ------------------------------------------------------------------------------------------ layers
def test_report_modules_stay_in_layers():
    """heads.report reads run directories only (never training, data or fusion code), its modules import each
    other downwards only (runs <- tables, figures <- compare, groupby, page <- build), imports inside
    functions included."""
    import ast

    import heads.report
    root = os.path.dirname(heads.report.__file__)
    layer = {"runs": 0, "plan": 0, "console": 1, "tables": 1, "figures": 1, "compare": 2, "groupby": 2, "page": 2,
             "build": 3}
    assert {f[:-3] for f in os.listdir(root) if f.endswith(".py")} == {*layer, "__init__"}
    for name, level in layer.items():
        tree = ast.parse(open(os.path.join(root, f"{name}.py")).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert node.module in layer and layer[node.module] < level, (name, node.module)
            elif isinstance(node, ast.ImportFrom) and node.level == 2:
                assert node.module in ("rundir", "probe"), (name, node.module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not any(m == "heads" or m.startswith("heads.") for m in modules), (name, modules)
    assert ast.parse(open(os.path.join(root, "__init__.py")).read()).body[1:] == []  # a docstring only
