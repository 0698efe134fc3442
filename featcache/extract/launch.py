"""The CLI's extraction: one process, one `--shard I/N` (SLURM array task), or one torchrun rank; and the
manifest that ties the shards together once all of them are complete (featcache/cache/manifest.py).

    featcache extract ... --out OUT.h5 --shard I/N   (I zero-based, e.g. $SLURM_ARRAY_TASK_ID/$..._COUNT)
        extracts shard I; the task that finds all N shards complete writes the manifest (re-running any
        finished task, which only reuses its shard, writes it too).
    torchrun --nproc-per-node K --no-python featcache extract ... --out OUT.h5
        rank R of WORLD_SIZE W extracts shard R/W on cuda:{LOCAL_RANK % visible GPUs} (or the CPU); then every
        rank reports success or its error in one collective (always gloo: a few strings, hours after launch,
        need no NCCL communicator) and rank 0 writes the manifest or names every rank that failed.

`featcache merge OUT.manifest.json --out OUT.h5` writes one ordinary cache from the shards.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import replace

import torch
import torch.distributed as dist
from rich.console import Console

from ..cache.manifest import write_manifest
from ..cache.store import CacheError
from ..device import resolve_device
from ..errors import ConfigError
from .config import ExtractConfig
from .engine import extract
from .shards import SHARD_FILE, manifest_path, parse_shard, shard_path

# Ranks of one run may finish hours apart on a shared cluster; a rank that dies is caught by torchrun (it
# stops the others), not by this timeout.
BARRIER_TIMEOUT = datetime.timedelta(hours=24)


def torchrun_env() -> tuple[int, int, int] | None:
    """(RANK, WORLD_SIZE, LOCAL_RANK) when started by torchrun with more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def complete_manifest(shard_file: str, count: int, say, required: bool = False) -> str | None:
    """Write OUT.manifest.json if all `count` shards next to `shard_file` are complete; else say what is missing
    (or, `required`, raise: every torchrun rank reported success, so the files must be there)."""
    out = SHARD_FILE.sub(".h5", shard_file)
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


def run_extract(cfg: ExtractConfig, resume: bool = False, strict: bool = False, force: bool = False,
                console=None, progress: bool = True) -> str:
    """Returns the file this process wrote (the manifest when it completed the set)."""
    console = console or Console(stderr=True)
    env = torchrun_env()
    if env and cfg.shard:
        raise ConfigError("--shard and torchrun both split the rows; use one of them")
    if env:
        return _extract_rank(cfg, env, resume, strict, force, console, progress)
    path = extract(cfg, resume=resume, strict=strict, force=force, console=console, progress=progress)
    if cfg.shard:
        return complete_manifest(path, parse_shard(cfg.shard)[1], console.print) or path
    return path


def rank_device(device: str, local_rank: int) -> str:
    """The device of the rank with LOCAL_RANK `local_rank`: any cuda* (and auto on a CUDA machine) becomes
    cuda:{local_rank % visible devices}. Why modulo: with one GPU visible per task (CUDA_VISIBLE_DEVICES set per
    rank) every rank sees cuda:0; with all GPUs visible rank k takes GPU k; `--device cuda:0` must not put every
    rank on GPU 0 (NCCL or memory fails only after all the work)."""
    if device == "cpu" or not (device.startswith("cuda") or device == "auto"):
        return device  # an invalid name: resolve_device reports it inside the rank's try
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return device  # auto: the CPU; cuda*: resolve_device says there is no CUDA device
    return f"cuda:{local_rank % count}"


def _extract_rank(cfg, env, resume, strict, force, console, progress) -> str:
    rank, world, local = env
    device = rank_device(cfg.device, local)
    cfg = replace(cfg, shard=f"{rank}/{world}", device=device)
    error, path = None, None
    try:  # one bar, rank 0's: K bars on one terminal overwrite each other
        if device.startswith("cuda"):  # inside the try: a bad ordinal is reported to every rank like any error
            torch.cuda.set_device(resolve_device(device))
        path = extract(cfg, resume=resume, strict=strict, force=force, console=console,
                       progress=progress and rank == 0)
    except Exception as exc:  # reported to rank 0 below, then raised here as usual
        error = exc
    statuses = _all_gather(f"rank {rank}: {error}" if error else None)
    failed = [s for s in statuses if s]
    if rank == 0 and failed:
        summary = (f"no manifest: {len(failed)} of {world} ranks failed ({'; '.join(failed)}); fix that and run "
                   "the same command again with --resume (finished shards are reused)")
        if error is None:
            raise CacheError(summary)
        console.print(summary, highlight=False, markup=False)  # every rank's error, then rank 0's own below
    if error:
        raise error
    if rank != 0:
        return path
    return complete_manifest(path, world, console.print, required=True)


def _all_gather(status) -> list:
    """The one collective of a sharded run: every rank's status, once all shards are done (the barrier).
    Always gloo, also on GPUs: it moves a few strings, and an NCCL communicator started hours after launch
    only adds ways to fail (and needs one distinct GPU per rank)."""
    dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    try:
        statuses = [None] * dist.get_world_size()
        dist.all_gather_object(statuses, status)
        return statuses
    finally:
        dist.destroy_process_group()
