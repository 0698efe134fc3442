"""`heads ablate --shard I/N`: one slice of an ablation grid per process (a SLURM array task, a torchrun rank).

    heads ablate ... --out DIR --shard 2/8    # slice 2 of 8 (zero-based: 0..7)
    heads ablate ... --out DIR --shard auto   # I/N from torchrun (RANK/WORLD_SIZE) or a SLURM job array

The grid is every run `heads ablate` would make without --shard: the configuration x seed runs, then the
probes with --probe. Its slicing order (grid_order) lists the runs costliest first (heads.parallel's cost
proxy: the token arrays a run projects, so the attention heads lead), then the probes; slice I of N trains
order[I::N]. Dealt round-robin, the N slices partition the grid exactly (each run in one slice), their sizes
differ by at most one, and each slice gets its share of every cost class. N may exceed the grid: the extra
slices are empty. The order depends on the grid only (never on the machine, the finished runs or N), so every
slice computes the same partition, and DIR/ablate.json records it (heads.report.plan) for `heads report`.

`auto`: torchrun's RANK and WORLD_SIZE, else SLURM's SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT, the index
counted from SLURM_ARRAY_TASK_MIN in steps of SLURM_ARRAY_TASK_STEP, so --array=0-7 and --array=1-8 both give
slices 0..7. Both sets of variables at once is refused (which one splits the grid?), as is neither. Under
torchrun (WORLD_SIZE > 1) --shard is required: without it every rank would train the whole grid. A SLURM array
task without --shard is allowed (arrays also spread other things: one cache per task).
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict

from featcache.errors import ConfigError

from .parallel import longest_first
from .report.plan import FORMAT, SLICING

_SHARD = re.compile(r"^\s*(-?\d+)\s*/\s*(-?\d+)\s*$")
TORCHRUN = ("RANK", "WORLD_SIZE")
SLURM = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
# What says how one process runs its part, not what the grid is: not in the plan, which every slice writes the same.
RUNTIME_FIELDS = ("out", "cache", "shard", "progress", "workers")
ZERO_BASED = ("I is zero-based; in a SLURM array started at 1 (--array=1-N) give --shard auto, which counts from "
              "SLURM_ARRAY_TASK_MIN")


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` -> (I, N) with 0 <= I < N; a ConfigError naming the valid range otherwise."""
    m = _SHARD.match(text or "")
    if not m:
        raise ConfigError(f"--shard {text!r}: give I/N (slice I of N, I in 0..N-1) or auto (torchrun's RANK/"
                          "WORLD_SIZE or a SLURM array's task id and count)")
    index, count = int(m[1]), int(m[2])
    if count < 1:
        raise ConfigError(f"--shard {text}: N is the number of slices and must be at least 1")
    if not 0 <= index < count:
        raise ConfigError(f"--shard {text}: I must be in 0..{count - 1} for N={count} ({ZERO_BASED})")
    return index, count


def resolve_shard(text: str, environ=None) -> str:
    """The normalised `I/N` of a --shard value ("" stays "": the whole grid); `auto` read from the environment
    (torchrun or a SLURM job array, see the module docstring)."""
    text, env = (text or "").strip(), os.environ if environ is None else environ
    if not text and all(v in env for v in TORCHRUN) and env["WORLD_SIZE"] not in ("", "1"):
        raise ConfigError(f"started by torchrun (WORLD_SIZE={env['WORLD_SIZE']}) without --shard: every rank would "
                          "train the whole grid into the same folder; give --shard auto (each rank its slice)")
    if text.lower() != "auto":
        return "" if not text else "{}/{}".format(*parse_shard(text))
    torchrun, slurm = all(v in env for v in TORCHRUN), all(v in env for v in SLURM)
    if torchrun and slurm:
        raise ConfigError("--shard auto: both torchrun's RANK/WORLD_SIZE and SLURM's SLURM_ARRAY_TASK_ID/"
                          "SLURM_ARRAY_TASK_COUNT are set, so which one slices the grid is ambiguous; give "
                          "--shard I/N explicitly")
    if torchrun:
        index, count = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
        where = f"torchrun: RANK={index}, WORLD_SIZE={count}"
    elif slurm:
        task, count = _env_int(env, "SLURM_ARRAY_TASK_ID"), _env_int(env, "SLURM_ARRAY_TASK_COUNT")
        low = _env_int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        step = _env_int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
        index = (task - low) // step if step > 0 and (task - low) % step == 0 else -1
        where = f"SLURM array task {task} of {count} (min {low}, step {step})"
        if not 0 <= index < count:  # a list such as --array=1,4,9: task ids that are no range
            raise ConfigError(f"--shard auto: {where} is not one of {count} evenly spaced task ids; submit the "
                              "array as a range (--array=0-<N-1>) or give --shard I/N explicitly")
    else:
        raise ConfigError("--shard auto: neither torchrun's RANK and WORLD_SIZE nor SLURM's SLURM_ARRAY_TASK_ID "
                          "and SLURM_ARRAY_TASK_COUNT are set; start it with torchrun or in a SLURM job array "
                          "(sbatch --array=0-<N-1>), or give --shard I/N")
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard auto ({where}): slice {index} of {count} does not exist (0..{count - 1})")
    return f"{index}/{count}"


def _env_int(env, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"--shard auto: the environment variable {name}={env[name]!r} is not an integer") \
            from None


def grid_order(runs: list, probes: list[str]) -> list[str]:
    """The slicing order of a grid: its RunSpecs' names costliest first (heads.parallel.longest_first, stable:
    equal runs keep the grid's order), then the probe run names."""
    return [spec.name for spec, _ in longest_first([(r, None) for r in runs])] + list(probes)


def grid_plan(cfg, runs: list, probes: list[str], datas: dict) -> dict:
    """What DIR/ablate.json records (heads.report.plan) for AblateConfig `cfg`: the grid's run names in slicing order,
    its caches by content (file stem -> cache key: a slice may read a node-local copy; `datas`: path ->
    CacheData) and the config minus RUNTIME_FIELDS."""
    caches = {label: datas[path].meta.get("key", "") for label, path in cfg.caches().items()}
    config = {k: v for k, v in asdict(cfg).items() if k not in RUNTIME_FIELDS}
    return {"format": FORMAT, "slicing": SLICING, "runs": grid_order(runs, probes), "caches": caches, **config}


def slice_of(order: list[str], shard: str) -> list[str]:
    """The run names slice `I/N` trains: order[I::N] (all of them for "")."""
    if not shard:
        return list(order)
    index, count = parse_shard(shard)
    return order[index::count]


__all__ = ["grid_order", "grid_plan", "parse_shard", "resolve_shard", "slice_of"]
