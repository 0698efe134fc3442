"""`heads report` extras: group-by and correlation agree with hand computations from the run files, the top-k
LaTeX table is escaped and well-formed, summary.html is self-contained with one embedded PNG per figure,
option mistakes are clear errors, and the head parameter count is recorded and recoverable."""
from __future__ import annotations

import base64
import io
import os
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from heads.export import latex_escape
from heads.config import TrainConfig
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

    from heads.page import mean_curves
    from heads.summary import find_run_dirs, label_runs, load_run
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
    from heads.rundir import head_params, load_head
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
