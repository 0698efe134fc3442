"""The plan of an ablation, DIR/ablate.json: the whole grid, so that slices and `heads report` know what is missing.

    {"format": 1, "runs": [every run name of the grid, in slicing order: slice I of N trains runs[I::N]],
     "caches": {file stem: cache key}, "grid": ..., "seeds": ..., "base": ..., "folds": ..., "baseline": ...,
     "probe": ..., "n_boot": ...}

Every `heads ablate` writes it (atomically, heads.rundir.save_json), each --shard slice the identical file: the
plan holds what defines the grid and its summaries, never what differs between the slices of one grid (--shard,
the worker count, the progress bar, the output path, the caches' paths: a slice may read a node-local copy; the
cache key names the content). One process without --shard owns the whole grid and records its own plan. A slice
refuses to start when the folder records another plan (it would train part of a different grid) and checks it
again before its summaries: of slices started at once with different options, at least one fails.

`heads report DIR` reads the plan (missing_runs) and says which runs of the grid have no finished run directory
yet. Nothing here imports the training code (the reports read it).
"""
from __future__ import annotations

import json
import os

from featcache.errors import ConfigError

from ..rundir import load_json, save_json

PLAN_FILE = "ablate.json"
FORMAT = 1
SLICING = "slice I of N (--shard I/N) trains runs[I::N]"


def plan_path(out: str) -> str:
    return os.path.join(str(out), PLAN_FILE)


def read_plan(out: str) -> dict | None:
    """The plan recorded in `out`, or None (no ablate.json, or one from before plans: no run list)."""
    path = plan_path(out)
    if not os.path.exists(path):
        return None
    plan = load_json(path)
    return plan if isinstance(plan, dict) and isinstance(plan.get("runs"), list) else None


def record_plan(out: str, plan: dict, strict: bool) -> dict:
    """Write `plan` into `out`; returns it as it reads back. strict (a --shard slice): a different plan already
    there is a ConfigError, and the file is read back after writing; with the caller's check_plan at its end,
    of two slices started at once with different plans at least one fails."""
    plan = json.loads(json.dumps(plan))  # as it reads back (tuples become lists), so equal plans compare equal
    if strict:
        check_plan(out, plan)
    save_json(plan_path(out), plan)
    if strict:
        check_plan(out, plan)
    return plan


def check_plan(out: str, plan: dict) -> dict:
    """`plan`, or a ConfigError naming what differs when `out` records another plan (none recorded is fine)."""
    found = read_plan(out)
    if found is None or found == plan:
        return plan
    keys = sorted(k for k in set(found) | set(plan) if found.get(k) != plan.get(k))
    shown = [k for k in keys if k != "runs"] or keys  # the run list differs because a setting does
    first = shown[0]
    raise ConfigError(f"{plan_path(out)} records another grid than this slice's ({', '.join(shown)} differ; "
                      f"{first}: recorded {_short(found.get(first))}, this slice {_short(plan.get(first))}); "
                      "every slice of one ablation must be started with the same options and caches. Start "
                      "this grid with another --out, or delete that file if the recorded grid is abandoned")


def _short(value, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def is_finished_run(out: str, name: str) -> bool:
    """A run directory appears whole (featcache.outdir.atomic_dir): metrics.json and config.json mean finished,
    as heads.report.runs.find_run_dirs counts it."""
    run = os.path.join(str(out), "runs", name)
    return os.path.exists(os.path.join(run, "metrics.json")) and os.path.exists(os.path.join(run, "config.json"))


def missing_runs(out: str, plan: dict | None = None) -> list[str]:
    """The planned runs of `out` that are not finished, in plan order ([] without a plan)."""
    plan = read_plan(out) if plan is None else plan
    return [name for name in (plan or {}).get("runs", []) if not is_finished_run(out, name)]


def unfinished(paths) -> dict[str, tuple[list[str], int]]:
    """For each of `paths` that records a plan with runs not finished: (those run names, runs planned)."""
    out = {}
    for p in map(str, paths):
        plan = read_plan(p) if os.path.isdir(p) else None
        missing = missing_runs(p, plan) if plan else []
        if missing:
            out[p] = (missing, len(plan["runs"]))
    return out


# What to do about missing runs, after a slice and after `heads report` ({out}: the ablation folder).
AFTER_SLICE = ("the slice that finishes the last of them writes the summaries; `heads report {out}` summarizes the "
               "finished ones at any time")
AFTER_REPORT = ("the summaries cover the {finished} finished; run the missing slices (`heads ablate` with the same "
                "options and --shard) and `heads report {out}` again")
BEFORE_REPORT = "start (or finish) the slices first (`heads ablate` with the same options and --shard)"


def missing_note(out: str, missing: list[str], planned: int, then: str, shown: int = 3) -> str:
    """One paragraph: how many runs of the grid are not finished, a few of their names, then what to do (`then`,
    one of the texts above)."""
    names = ", ".join(missing[:shown]) + (f" and {len(missing) - shown} more" if len(missing) > shown else "")
    then = then.format(out=out, finished=planned - len(missing))
    return f"{len(missing)} of {planned} runs of the grid ({plan_path(out)}) are not finished yet: {names}; {then}"


__all__ = ["AFTER_REPORT", "AFTER_SLICE", "BEFORE_REPORT", "FORMAT", "check_plan", "missing_note", "missing_runs",
           "plan_path", "read_plan", "record_plan", "unfinished"]
