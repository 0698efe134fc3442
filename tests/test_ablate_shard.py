"""`heads ablate --shard I/N` (issue 21): slices partition the grid exactly, share one out folder and its plan
(ablate.json), and together give the summaries of one unsharded ablation; `heads report` says what is missing."""
from __future__ import annotations

import csv
import json
import os

import pytest
from typer.testing import CliRunner

from conftest import build_synthetic_cache
from heads.ablate import AblateConfig, ablate, expand
from heads.shard import grid_order, resolve_shard, slice_of
from heads.train.probe import probe_specs

FAST = ["--set", "epochs=2", "--set", "hidden=16", "--set", "patience=0"]
FAST_BASE = {"plots": False, "epochs": 2, "hidden": 16, "patience": 0}
GRID = {"fusion": ["concat", "gmu"], "modality": ["both", "text"]}
SHARD_ENV = ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
             "SLURM_ARRAY_TASK_STEP")


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load(path):
    with open(path) as f:
        return json.load(f)


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("train_s")} for r in rows]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return build_synthetic_cache(str(tmp_path_factory.mktemp("cache") / "c.h5"), n_train=150, noise=3.0)


@pytest.fixture
def no_shard_env(monkeypatch):
    for name in SHARD_ENV:  # the tests may themselves run inside a SLURM job or under torchrun
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_slices_partition_the_grid():
    """Every run (probes too) in exactly one slice, for N from 1 to beyond the grid's size; sizes differ by at
    most one, the costly token-level runs are spread over the slices, and the order is the grid's alone."""
    cfg = AblateConfig(cache="c.h5", out="o", seeds=[0, 1], probe=True,
                       grid={"fusion": ["concat", "film", "cross-attn"], "modality": ["both", "text"]}).validate()
    runs = expand(cfg)
    probes = [name for name, _ in probe_specs(runs)]
    order = grid_order(runs, probes)
    assert sorted(order) == sorted([r.name for r in runs] + probes) and len(order) == 14
    assert order[:2] == ["fusion=cross-attn,modality=both,seed=0", "fusion=cross-attn,modality=both,seed=1"]
    assert order[-2:] == ["probe=logreg,seed=0", "probe=logreg,seed=1"]
    assert grid_order(list(reversed(runs)), probes) != order  # the order follows the grid's, not a fixed list
    assert grid_order(expand(cfg), probes) == order  # ... deterministically
    costly = set(order[:2])
    for n in (1, 2, 3, 4, 5, 13, 14, 15, 40):
        slices = [slice_of(order, f"{i}/{n}") for i in range(n)]
        flat = [name for s in slices for name in s]
        assert sorted(flat) == sorted(order) and len(flat) == len(set(flat)), n  # each run exactly once
        sizes = [len(s) for s in slices]
        assert max(sizes) - min(sizes) <= 1, (n, sizes)
        if n >= 2:
            assert [len(costly & set(s)) for s in slices[:2]] == [1, 1], n  # not both long runs in one slice
    assert slice_of(order, "") == order


def test_shard_values(no_shard_env):
    assert resolve_shard("") == "" and resolve_shard(" 2 / 5 ") == "2/5"
    assert resolve_shard("auto", {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == "3/4"
    slurm = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}
    assert resolve_shard("auto", slurm) == "0/3"  # --array=1-3: the first task is slice 0
    assert resolve_shard("auto", {**slurm, "SLURM_ARRAY_TASK_ID": "3"}) == "2/3"
    assert resolve_shard("auto", {**slurm, "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_ID": "2"}) == "2/3"
    stepped = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0",
               "SLURM_ARRAY_TASK_STEP": "2"}  # --array=0-4:2
    assert resolve_shard("auto", stepped) == "2/3"
    with pytest.raises(ValueError, match="not one of 3 evenly spaced"):
        resolve_shard("auto", {**stepped, "SLURM_ARRAY_TASK_ID": "3"})
    with pytest.raises(ValueError, match="ambiguous"):
        resolve_shard("auto", {"RANK": "0", "WORLD_SIZE": "2", **slurm})
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        resolve_shard("auto", {"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="neither torchrun"):
        resolve_shard("auto", {})
    with pytest.raises(ValueError, match="I must be in 0..1 for N=2"):
        resolve_shard("-1/2")
    with pytest.raises(ValueError, match="WORLD_SIZE=2.* without --shard: every rank would train the whole grid"):
        resolve_shard("", {"RANK": "0", "WORLD_SIZE": "2"})
    assert resolve_shard("", {"RANK": "0", "WORLD_SIZE": "1"}) == resolve_shard("", slurm) == ""


def test_slices_together_equal_one_ablation(cache, tmp_path):
    """Slices 0 and 1 of 3, then `heads report` names what slice 2 owes; slice 2 completes the grid and writes the
    summaries, which are those of one unsharded ablation (same run names, same metrics). The plan is identical
    whichever slice wrote it, and a slice started with other options is refused."""
    from cli import heads_app
    out = str(tmp_path / "sharded")
    cfg = dict(cache=cache, out=out, grid=GRID, seeds=[0], probe=True, base=FAST_BASE, progress=False, workers=1,
               n_boot=50)
    first = ablate(AblateConfig(**cfg, shard="0/3"))
    plan = open(os.path.join(out, "ablate.json"), "rb").read()
    order = load(os.path.join(out, "ablate.json"))["runs"]
    assert len(order) == 5 and first.planned == 5
    second = ablate(AblateConfig(**cfg, shard="1/3"))
    assert open(os.path.join(out, "ablate.json"), "rb").read() == plan
    assert first.report is None and second.report is None and not os.path.exists(os.path.join(out, "summary.csv"))
    trained = [os.path.basename(d) for d in first.run_dirs + second.run_dirs]
    assert sorted(trained) == sorted(order[0::3] + order[1::3]) and (first.trained, second.trained) == (2, 2)
    owed = order[2::3]
    assert second.missing == owed and sorted(os.listdir(os.path.join(out, "runs"))) == sorted(trained)

    r = CliRunner().invoke(heads_app, ["report", out])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "1 of 5 runs of the grid" in text and owed[0] in text and "cover the 4 finished" in text
    assert len(read_csv(os.path.join(out, "summary.csv"))) == 4  # the 4 finished configurations

    with pytest.raises(ValueError, match="records another grid.*seeds"):  # a slice of another grid
        ablate(AblateConfig(**{**cfg, "seeds": [0, 1]}, shard="2/3"))
    assert open(os.path.join(out, "ablate.json"), "rb").read() == plan and len(os.listdir(out + "/runs")) == 4

    last = ablate(AblateConfig(**cfg, shard="2/3"))
    assert last.trained == 1 and last.missing == [] and last.report is not None
    assert open(os.path.join(out, "ablate.json"), "rb").read() == plan
    again = ablate(AblateConfig(**cfg, shard="1/3"))  # finished runs are skipped; the grid is complete
    assert (again.trained, again.skipped) == (0, 2) and again.report is not None

    whole = ablate(AblateConfig(**{**cfg, "out": str(tmp_path / "whole")}))
    assert whole.trained == 5
    names = sorted(os.listdir(tmp_path / "whole" / "runs"))
    assert sorted(os.listdir(os.path.join(out, "runs"))) == names == sorted(order)
    assert without_timing(read_csv(os.path.join(out, "summary.csv"))) == \
        without_timing(read_csv(tmp_path / "whole" / "summary.csv"))
    for name in names:
        a, b = (load(os.path.join(d, "runs", name, "metrics.json")) for d in (out, tmp_path / "whole"))
        assert (a["macro_f1"], a["accuracy"]) == (b["macro_f1"], b["accuracy"]), name
    assert load(tmp_path / "whole" / "ablate.json") == load(os.path.join(out, "ablate.json"))  # the same grid
    r = CliRunner().invoke(heads_app, ["report", out])
    assert r.exit_code == 0 and "not finished" not in r.output


def test_cli_slices_auto_and_report(cache, tmp_path, no_shard_env):
    """End to end: slice 0 of 2 from a SLURM array counted from 1, slice 1 from torchrun's variables; the first
    says what is missing, the second finds the grid complete and prints the summary; an empty slice (N larger
    than the grid) trains nothing and `heads report` before any run names the plan."""
    from cli import heads_app
    out = str(tmp_path / "a")
    base = ["ablate", "--cache", cache, "--out", out, "--fusion", "concat", "--modality", "both,text", "--seeds",
            "0", "--no-progress", *FAST]
    runner = CliRunner()
    r = runner.invoke(heads_app, base + ["--shard", "5/9"])
    assert r.exit_code == 0, r.output
    assert "slice 5/9: 0 run(s) trained" in r.output and "2 of 2 runs of the grid" in " ".join(r.output.split())
    r = runner.invoke(heads_app, ["report", out])
    assert r.exit_code == 2 and "no finished run directories" in r.output and "Traceback" not in r.output
    assert "2 of 2 runs of the grid" in " ".join(r.output.split())

    no_shard_env.setenv("SLURM_ARRAY_TASK_ID", "1")
    no_shard_env.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    no_shard_env.setenv("SLURM_ARRAY_TASK_MIN", "1")
    r = runner.invoke(heads_app, base + ["--shard", "auto"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "slice 0/2: 1 run(s) trained" in text and "1 of 2 runs of the grid" in text and "heads report" in text
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        no_shard_env.delenv(name)
    no_shard_env.setenv("RANK", "1")
    no_shard_env.setenv("WORLD_SIZE", "2")
    r = runner.invoke(heads_app, base + ["--shard", "auto"])
    assert r.exit_code == 0, r.output
    assert "slice 1/2: 1 run(s) trained" in r.output and "summaries in" in r.output
    assert "| modality=both |" in r.output and "| modality=text |" in r.output  # summary.md, both configurations
    runs = sorted(os.listdir(os.path.join(out, "runs")))
    assert runs == ["fusion=concat,modality=both,epochs=2,hidden=16,patience=0,seed=0",
                    "fusion=concat,modality=text,epochs=2,hidden=16,patience=0,seed=0"]
    assert {r["config"] for r in read_csv(os.path.join(out, "summary.csv"))} == {"modality=both", "modality=text"}


@pytest.mark.parametrize("value, message", [("0/0", "N is the number of slices and must be at least 1"),
                                            ("3/3", "I must be in 0..2 for N=3"),
                                            ("x", "give I/N"),
                                            ("auto", "neither torchrun's RANK and WORLD_SIZE nor SLURM")])
def test_bad_shard_values(cache, tmp_path, no_shard_env, value, message):
    from cli import heads_app
    r = CliRunner().invoke(heads_app, ["ablate", "--cache", cache, "--out", str(tmp_path / "x"), "--fusion", "concat",
                                       "--shard", value])
    assert r.exit_code == 2 and message in " ".join(r.output.split()) and "Traceback" not in r.output, r.output
    assert not os.path.exists(tmp_path / "x")  # refused before anything was written
