"""`make run`'s recipe. On other data (README: `DATA=... make run`) its caches are named after the dataset, so it
extracts its own instead of meeting MVSA's (which `featcache extract` refuses: same path, other features); its
ensemble names the runs its ablations write.

`make -n` prints the recipe without running it; nothing is extracted or trained here.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _extract_outs(*assignments: str) -> list[str]:
    out = subprocess.run(["make", "-n", "run", *assignments], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return re.findall(r"featcache extract .*--out (\S+)", out)


def test_make_run_names_caches_after_the_dataset():
    assert _extract_outs() == ["cache/mvsa-tf-288.h5", "cache/mvsa-mpnet-tf-288.h5"]  # README's names
    assert _extract_outs("DATA=/data/memes/") == ["cache/memes-tf-288.h5", "cache/memes-mpnet-tf-288.h5"]
    assert _extract_outs("DATA=/data/posts.csv") == ["cache/posts-tf-288.h5", "cache/posts-mpnet-tf-288.h5"]
    assert _extract_outs("DATA=/data/posts.csv", "CACHE=a.h5") == ["a.h5", "cache/posts-mpnet-tf-288.h5"]


def test_make_run_predicts_only_a_test_split_that_exists():
    """The recipe's test for a test split, run on what `featcache info --json` prints for two caches."""
    recipe = subprocess.run(["make", "-n", "run"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    check = re.search(r'-c "(import json.*?)"', recipe).group(1)
    for splits, has_test in (({"train": {}, "test": {}}, True), ({"train": {}}, False)):
        info = '{"splits": %s, "labels": {"test": 1}}' % str(splits).replace("'", '"')
        rc = subprocess.run([sys.executable, "-c", check], input=info, text=True).returncode
        assert (rc == 0) == has_test


def test_make_run_ensembles_the_runs_its_ablations_write():
    """The ensemble's members are the run directories `heads ablate` names for make run's grid (a renamed run
    would otherwise fail only after every extraction and training), in seed order, backbones alternating."""
    import shlex

    from heads.ablate import AblateConfig, expand
    recipe = subprocess.run(["make", "-n", "run", "SEEDS=0 1 2", "RUN=r"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    ablates = [shlex.split(line) for line in recipe.splitlines() if "/heads ablate " in line]
    members = next(shlex.split(line) for line in recipe.splitlines() if "/heads ensemble " in line)[2:-2]
    assert [a[a.index("--out") + 1] for a in ablates] == ["r-parts/minilm", "r-parts/mpnet"]
    opts = ablates[0]
    cfg = AblateConfig(cache="c.h5", out="o", grid={"fusion": [opts[opts.index("--fusion") + 1]],
                                                    "modality": [opts[opts.index("--modality") + 1]]},
                       seeds=[int(s) for s in opts[opts.index("--seeds") + 1].split(",")],
                       folds=int(opts[opts.index("--folds") + 1]))
    names = [r.name for r in expand(cfg)]
    assert len(names) == 3 and members == [f"r-parts/{b}/runs/{n}" for n in names for b in ("minilm", "mpnet")]
