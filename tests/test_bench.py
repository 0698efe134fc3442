"""Smoke test of bench/: every benchmark script runs end to end on a tiny slice of ../shared/mvsa and writes the
figures bench/report.py turns into BENCHMARKS.md. The figures themselves are not checked (no timing asserts;
`make bench` measures them at full size); this only keeps the scripts from rotting as the code under them
changes, which happened once (bench_heads broke on a constructor signature and nobody noticed)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from featcache.extract.config import ExtractConfig
from featcache.extract.engine import extract
from mvsa_fixtures import require_mvsa

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
from report import OPTIONAL, ROWS, main as render  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    root = str(require_mvsa())
    tmp = tmp_path_factory.mktemp("bench")
    cache = str(tmp / "small.h5")
    extract(ExtractConfig(data=root, limit=24, out=cache, workers=0, batch_size=8), progress=False)
    out = tmp / "out"
    runs = {  # script -> arguments that make it small
        "bench_extract.py": ["--data", root, "--per-file", "8", "--rounds", "1", "--batch-size", "8"],
        "bench_heads.py": ["--cache", cache],
        "bench_epochs.py": ["--cache", cache, "--epochs", "1", "--repeats", "1"],
        "bench_finetune.py": ["--cache", cache, "--samples", "8", "--batch-size", "4"],
        "bench_ablate.py": ["--cache", cache, "--seeds", "0"],
        "bench_views.py": ["--data", root, "--per-file", "8", "--rounds", "1", "--views", "1"],
        "bench_crossfit.py": ["--cache", cache, "--folds", "2", "--repeats", "1"],
        "bench_stream.py": ["--cache", cache, "--tiles", "1,2,3", "--fusions", "film", "--data", root, "--extract-limits", "4",
                            "--scratch", str(tmp / "tiles")],
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for script, args in runs.items():
        name = script[len("bench_"):-len(".py")]
        p = subprocess.run([sys.executable, os.path.join(BENCH, script), *args, "--out", str(out / f"{name}.json")],
                           capture_output=True, text=True, timeout=600, env=env)
        assert p.returncode == 0, f"{script} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    # bench_stream --vs: this checkout against another (itself here), on the second tile
    p = subprocess.run([sys.executable, os.path.join(BENCH, "bench_stream.py"), "--cache", cache, "--tiles", "1,2",
                        "--fusions", "film", "--scratch", str(tmp / "tiles"), "--vs", os.path.dirname(BENCH),
                        "--rounds", "1", "--out", str(out / "stream.json")], capture_output=True, text=True,
                       timeout=600, env=env)
    assert p.returncode == 0, f"bench_stream.py --vs failed:\n{p.stderr[-3000:]}"
    return out


def test_stream_versus_writes_every_arm(figures):
    r = json.load(open(figures / "stream_vs.json"))
    assert set(r["median_epoch_s"]) == {"memory", "stream", "kept", "other_stream"}
    assert all(math.isfinite(v) for v in r["vs_memory"].values())


def test_every_bench_writes_the_figures_the_report_reads(figures):
    for fname, title, measured, reference, ratio, _, _ in ROWS:
        if fname in OPTIONAL:  # an optional extra's benchmark (mpnet-base): not installed in CI
            continue
        r = json.load(open(figures / fname))
        for key in (measured, reference, ratio):
            # finite, not positive: at this size a difference of two timings can round to 0 or come out negative
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (fname, key, r[key])


def test_report_renders_every_row(figures, tmp_path):
    dest = tmp_path / "BENCHMARKS.md"
    render(str(figures), str(dest))
    text = dest.read_text()
    for fname, title, *_ in ROWS:
        row = next(line for line in text.splitlines() if line.startswith(f"| {title} |"))
        assert ("not run" in row) == (fname in OPTIONAL), row
