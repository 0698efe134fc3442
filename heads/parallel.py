"""Train many runs side by side from caches loaded once: how many workers, in which order, and the fork pool.

Used by `heads ablate` (run_all) and by the folds of a cross-fit run (fork_map). A job of run_all is
(spec, run_dir) with spec.train a TrainConfig and spec.cache the key of its loaded cache; `train(cfg, data,
run_dir)` is the unit (heads.train.stage1.train, or crossfit.train_crossfit). Workers are forked, so they
share the parent's in-memory arrays copy-on-write instead of loading or unpickling them again; each run then
uses one CPU thread (the caller sets threads=1 in its config).
"""
from __future__ import annotations

import multiprocessing
import signal

import torch

from featcache.env import cpu_threads

from .fusions import get_fusion


def count_workers(requested: int, runs: list) -> int:
    """Workers for these TrainConfigs: `requested`, or one per usable core (0); 1 for a single run or on a GPU.
    On a GPU (cuda, cuda:N, or auto where there is one) runs go one after another on it, the cache moved to the
    GPU once (heads.data.cache.CacheData.to_device); bench/gpu_smoke.sh times that against `--device cpu` (the
    CPU pool) so a GPU user can pick the faster with --device."""
    if len(runs) < 2 or any(r.device.startswith("cuda") for r in runs) or \
            (torch.cuda.is_available() and any(r.device == "auto" for r in runs)):
        return 1
    return min(requested or cpu_threads(), len(runs))


def longest_first(todo: list) -> list:
    """The jobs, costliest first: workers take jobs in order, and a long run taken last keeps one worker busy
    while the others idle (the default grid lists the attention heads last). Cost proxy: the token arrays a run
    projects, i.e. its head's token inputs that its modality keeps (attention with both modalities: 2, film
    with both: 1, pooled-only heads: 0)."""
    def arrays(job) -> int:
        head = job[0].train.head
        return sum(f"{m}_tokens" in get_fusion(head.fusion).inputs and head.modality in ("both", m)
                   for m in ("text", "image"))
    return sorted(todo, key=arrays, reverse=True)  # stable: equal runs keep the grid's order


_INHERITED: dict = {}  # what forked workers inherit (the function, its items and the loaded caches they reach)


def _ignore_sigint() -> None:
    """Pool initializer. Ctrl-C at a terminal signals the whole process group: the command's own process says
    what was kept and terminates the pool, so a worker must not also die printing its own traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _call_in_worker(i: int):
    return _INHERITED["fn"](_INHERITED["items"][i])


def _forked(fn, items: list, workers: int, ordered: bool):
    """Yield fn(item) for every item: in this process with one worker, else in a fork pool of `workers`, which
    inherits fn and the items (never pickled) and sends back only the results, in the items' order or as they
    finish."""
    if workers <= 1:
        yield from (fn(item) for item in items)
        return
    _INHERITED.update(fn=fn, items=items)
    try:
        with multiprocessing.get_context("fork").Pool(workers, initializer=_ignore_sigint) as pool:
            yield from (pool.imap if ordered else pool.imap_unordered)(_call_in_worker, range(len(items)))
    finally:
        _INHERITED.clear()


def run_all(todo: list, datas: dict, workers: int, train):
    """Yield run names as they finish: one after another with one worker, else in a fork pool, costliest first
    (then in any order)."""
    def one(job) -> str:
        spec, run_dir = job
        train(spec.train, datas[spec.cache], run_dir)
        return spec.name
    yield from _forked(one, longest_first(todo) if workers > 1 else todo, workers, ordered=False)


def fork_map(fn, items: list, workers: int) -> list:
    """[fn(item) for item in items], in a fork pool of `workers` when that is more than one: fn and the items
    (and whatever they reference, such as a loaded cache) are inherited, never pickled; only the results come
    back pickled, in the items' order. Used by the cross-fit folds (heads.train.crossfit)."""
    return list(_forked(fn, items, min(workers, len(items)), ordered=True))
