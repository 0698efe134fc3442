"""Run every benchmark in sequence and regenerate BENCHMARKS.md (`make bench`).

They run one after another, never in parallel: each compares figures measured in the same run, and two
benchmarks sharing 2 cores would skew both. The full default cache must exist (`make run` builds it).
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHES = ["bench_extract.py", "bench_heads.py", "bench_epochs.py", "bench_finetune.py", "bench_ablate.py",
           "bench_views.py", "bench_crossfit.py", "bench_stream.py"]

if __name__ == "__main__":
    only = sys.argv[1:] or BENCHES
    for name in only:
        path = os.path.join(HERE, name)
        if not os.path.exists(path):
            print(f"skip {name} (not present)")
            continue
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, path], check=True)
    subprocess.run([sys.executable, os.path.join(HERE, "report.py")], check=True)
