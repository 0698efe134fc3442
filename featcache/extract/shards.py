"""Sharded extraction: the rows of one dataset split over SLURM array tasks or torchrun ranks.

Shard I of N is a contiguous block of rows of the dataset order, cut at multiples of --batch-size: every batch
a shard runs is a batch a single-process run makes (same rows, same padding), so the features are the ones a
single process writes. Each shard is an ordinary cache, OUT.shard-I-of-N.h5, written, locked and resumed like
any cache (its key covers the run's key and its row range). The manifest OUT.manifest.json
(featcache/manifest.py) ties the N files together and is written once all of them are complete:

    featcache extract ... --out OUT.h5 --shard I/N   (I zero-based, e.g. $SLURM_ARRAY_TASK_ID/$..._COUNT)
        extracts shard I; the task that finds all N shards complete writes the manifest (re-running any
        finished task, which only reuses its shard, writes it too).
    torchrun --nproc-per-node K --no-python featcache extract ... --out OUT.h5
        rank R of WORLD_SIZE W extracts shard R/W on cuda:LOCAL_RANK (or the CPU); then every rank reports
        success or its error in one collective (NCCL on GPU, gloo on CPU) and rank 0 writes the manifest.

`featcache merge OUT.manifest.json --out OUT.h5` writes one ordinary cache from the shards.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import re
from dataclasses import replace

from ..cache.manifest import write_manifest
from ..cache.store import CacheError

# Ranks of one run may finish hours apart on a shared cluster; a rank that dies is caught by torchrun (it
# stops the others), not by this timeout.
BARRIER_TIMEOUT = datetime.timedelta(hours=24)
_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_SHARD_FILE = re.compile(r"\.shard-\d+-of-\d+\.h5$")


def parse_shard(text: str) -> tuple[int, int]:
    m = _SHARD.match(text or "")
    if not m or not 0 <= int(m[1]) < int(m[2]):
        raise ValueError(f"--shard {text!r}: give I/N with 0 <= I < N (I is zero-based: sbatch --array=0-<N-1> "
                         "with --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return int(m[1]), int(m[2])


def shard_rows(total: int, batch_size: int, index: int, count: int) -> tuple[int, int]:
    """Rows [start, stop) of shard `index` of `count`: whole batches of a single-process run, spread evenly."""
    batches = -(-total // batch_size)
    if count > batches:
        raise ValueError(f"{count} shards: {total} rows in batches of {batch_size} make only {batches} batch(es); "
                         f"use at most {batches} shards (processes) or a smaller --batch-size")
    first, last = index * batches // count, (index + 1) * batches // count
    return first * batch_size, min(last * batch_size, total)


def _stem(out: str) -> str:
    return out[:-3] if out.endswith(".h5") else out


def shard_path(out: str, index: int, count: int) -> str:
    return f"{_stem(out)}.shard-{index:0{len(str(count - 1))}d}-of-{count}.h5"


def manifest_path(out: str) -> str:
    return f"{_stem(out)}.manifest.json"


def select_shard(ds, cfg, key: str, out: str):
    """extract()'s hook: (the shard's rows as their own Dataset, the shard file's key, the shard file)."""
    index, count = parse_shard(cfg.shard)
    total = len(ds.samples)
    start, stop = shard_rows(total, cfg.batch_size, index, count)
    info = {"index": index, "count": count, "start": start, "stop": stop, "total": total, "key": key}
    shard_key = hashlib.sha256(f"{key}:{start}:{stop}:{total}".encode()).hexdigest()[:16]
    return ds.subset(start, stop, info), shard_key, shard_path(out, index, count)


def torchrun_env() -> tuple[int, int, int] | None:
    """(RANK, WORLD_SIZE, LOCAL_RANK) when started by torchrun with more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def complete_manifest(shard_file: str, count: int, say, required: bool = False) -> str | None:
    """Write OUT.manifest.json if all `count` shards next to `shard_file` are complete; else say what is missing
    (or, `required`, raise: every torchrun rank reported success, so the files must be there)."""
    out = _SHARD_FILE.sub(".h5", shard_file)
    paths = [shard_path(out, j, count) for j in range(count)]
    missing = [j for j, p in enumerate(paths) if not os.path.exists(p)]
    if missing and required:
        raise CacheError(f"every rank finished, but shard(s) {', '.join(map(str, missing))} are not visible as "
                         f"{paths[missing[0]]} on rank 0: with several nodes, --out must be on a filesystem they "
                         "all share; no manifest was written")
    if missing:
        say(f"{count - len(missing)} of {count} shards complete (missing: {', '.join(map(str, missing))}); "
            f"the last one to finish writes {manifest_path(out)}", highlight=False)
        return None
    path = write_manifest(manifest_path(out), paths)
    say(f"[bold green]wrote[/] {path}: {count} shards; read it with `heads train --cache {path}` or merge it with "
        f"`featcache merge {path} --out FILE.h5`", highlight=False)
    return path


def run_extract(cfg, resume: bool = False, strict: bool = False, force: bool = False, console=None,
                progress: bool = True) -> str:
    """The CLI's extraction: one process, one --shard, or one torchrun rank. Returns the file it wrote (the
    manifest when this process completed the set)."""
    from rich.console import Console

    from .engine import extract
    console = console or Console(stderr=True)
    env = torchrun_env()
    if env and cfg.shard:
        raise ValueError("--shard and torchrun both split the rows; use one of them")
    if env:
        return _extract_rank(cfg, env, resume, strict, force, console, progress)
    path = extract(cfg, resume=resume, strict=strict, force=force, console=console, progress=progress)
    if cfg.shard:
        return complete_manifest(path, parse_shard(cfg.shard)[1], console.print) or path
    return path


def _extract_rank(cfg, env, resume, strict, force, console, progress) -> str:
    import torch

    from .engine import extract
    rank, world, local = env
    device = cfg.device
    if device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{local}"  # one GPU per process on each node
        torch.cuda.set_device(local)
    cfg = replace(cfg, shard=f"{rank}/{world}", device=device)
    error, path = None, None
    try:  # one bar, rank 0's: K bars on one terminal overwrite each other
        path = extract(cfg, resume=resume, strict=strict, force=force, console=console,
                       progress=progress and rank == 0)
    except Exception as exc:  # reported to rank 0 below, then raised here as usual
        error = exc
    statuses = _all_gather(f"rank {rank}: {error}" if error else None, device)
    if error:
        raise error
    failed = [s for s in statuses if s]
    if rank != 0:
        return path
    if failed:
        raise CacheError(f"no manifest: {len(failed)} of {world} ranks failed ({'; '.join(failed)}); fix that and "
                         "run the same command again with --resume (finished shards are reused)")
    return complete_manifest(path, world, console.print, required=True)


def _all_gather(status, device) -> list:
    """The one collective of a sharded run: every rank's status, once all shards are done (the barrier)."""
    import torch.distributed as dist
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    dist.init_process_group(backend, timeout=BARRIER_TIMEOUT)
    try:
        statuses = [None] * dist.get_world_size()
        dist.all_gather_object(statuses, status)
        return statuses
    finally:
        dist.destroy_process_group()
