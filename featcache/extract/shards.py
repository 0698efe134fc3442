"""Shard arithmetic: which rows shard I of N gets, its key and its file name. No I/O, no orchestration (that is
featcache.extract.launch).

Shard I of N is a contiguous block of rows of the dataset order, cut at multiples of --batch-size: every batch
a shard runs is a batch a single-process run makes (same rows, same padding), so the features are the ones a
single process writes. Each shard is an ordinary cache, OUT.shard-I-of-N.h5, written, locked and resumed like
any cache (its key covers the run's key and its row range); OUT.manifest.json ties the N files together.
"""
from __future__ import annotations

import hashlib
import re

from ..errors import ConfigError

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
SHARD_FILE = re.compile(r"\.shard-\d+-of-\d+\.h5$")


def parse_shard(text: str) -> tuple[int, int]:
    m = _SHARD.match(text or "")
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise ConfigError(f"--shard {text!r}: give I/N with 0 <= I < N (I is zero-based: sbatch --array=0-<N-1> "
                         "with --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return int(m[1]), int(m[2])


def shard_rows(total: int, batch_size: int, index: int, count: int) -> tuple[int, int]:
    """Rows [start, stop) of shard `index` of `count`: whole batches of a single-process run, spread evenly."""
    batches = -(-total // batch_size)
    if count > batches:
        raise ConfigError(f"{count} shards: {total} rows in batches of {batch_size} make only {batches} batch(es); "
                         f"use at most {batches} shards (processes) or a smaller --batch-size")
    first, last = index * batches // count, (index + 1) * batches // count
    return first * batch_size, min(last * batch_size, total)


def _stem(out: str) -> str:
    return out[:-3] if out.endswith(".h5") else out


def shard_path(out: str, index: int, count: int) -> str:
    return f"{_stem(out)}.shard-{index:0{len(str(count - 1))}d}-of-{count}.h5"


def manifest_path(out: str) -> str:
    return f"{_stem(out)}.manifest.json"


def select_shard(ds, shard: str, batch_size: int, key: str, out: str):
    """(the shard's rows as their own Dataset, with ds.shard = where they sit; the shard file) for `--shard I/N`
    of the run whose cache key is `key`."""
    index, count = parse_shard(shard)
    total = len(ds.samples)
    start, stop = shard_rows(total, batch_size, index, count)
    info = {"index": index, "count": count, "start": start, "stop": stop, "total": total, "key": key}
    return ds.subset(start, stop, info), shard_path(out, index, count)


def shard_key(run_key: str, info: dict) -> str:
    """The cache key of a shard file: the run's key and the shard's row range."""
    return hashlib.sha256(f"{run_key}:{info['start']}:{info['stop']}:{info['total']}".encode()).hexdigest()[:16]
