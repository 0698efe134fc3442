"""One torchrun rank of featcache.extract.launch with extract() stubbed (used by test_shards.py): the real gloo
status exchange and manifest decision, without models or data.

    torchrun --nproc-per-node 2 tests/rank_child.py OUT.h5 FAILING_RANKS     (e.g. "1" or "0,1"; "" = none)

Each rank prints "rank R device D" and then "rank R ok PATH" or "rank R raised TYPE: MESSAGE" (flushed).
"""
import io
import os
import sys

from rich.console import Console

import featcache.extract.launch as launch
from featcache.extract.config import ExtractConfig


def main() -> None:
    out, failing = sys.argv[1], {int(r) for r in sys.argv[2].split(",") if r}
    rank = int(os.environ["RANK"])

    def fake_extract(cfg, **_):
        print(f"rank {rank} device {cfg.device} shard {cfg.shard}", flush=True)
        if rank in failing:
            raise RuntimeError(f"out of memory on rank {rank}")
        return launch.shard_path(out, rank, int(os.environ["WORLD_SIZE"]))

    launch.extract = fake_extract
    said = io.StringIO()
    try:
        path = launch.run_extract(ExtractConfig(data="unused", out=out, device="cpu"), console=Console(file=said))
        print(f"rank {rank} ok {path}", flush=True)
    except Exception as exc:  # printed for the test, which reads every rank's outcome
        print(f"rank {rank} said {' '.join(said.getvalue().split())}", flush=True)
        print(f"rank {rank} raised {type(exc).__name__}: {exc}", flush=True)


if __name__ == "__main__":
    main()
