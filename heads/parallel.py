"""Train many runs side by side from caches loaded once: how many workers, in which order, and the fork pool.

Used by `heads ablate` (run_all) and by the folds of a cross-fit run (fork_map). A job of run_all is
(spec, run_dir) with spec.train a TrainConfig and spec.cache the key of its loaded cache; `train(cfg, data,
run_dir)` is the unit (heads.train.stage1.train, or crossfit.train_crossfit). Workers are forked, so they share the parent's in-memory arrays copy-on-write instead of loading or
unpickling them again; each run then uses one CPU thread (the caller sets threads=1 in its config).
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


_SHARED: dict = {}  # what forked workers inherit: the loaded caches and the unit (never pickled)
_MAP: dict = {}  # fork_map's function and items, inherited the same way


def _ignore_sigint() -> None:
    """Pool initializer. Ctrl-C at a terminal signals the whole process group: the command's own process says
    what was kept and terminates the pool, so a worker must not also die printing its own traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pool(workers: int):
    return multiprocessing.get_context("fork").Pool(workers, initializer=_ignore_sigint)


def _train_in_worker(job) -> str:
    spec, run_dir = job
    _SHARED["train"](spec.train, _SHARED["datas"][spec.cache], run_dir)
    return spec.name


def run_all(todo: list, datas: dict, workers: int, train):
    """Yield run names as they finish: one after another with one worker, else in a fork pool, costliest first
    (then in any order)."""
    if workers <= 1:
        for spec, run_dir in todo:
            train(spec.train, datas[spec.cache], run_dir)
            yield spec.name
        return
    _SHARED.update(datas=datas, train=train)
    try:
        with _pool(workers) as pool:
            yield from pool.imap_unordered(_train_in_worker, longest_first(todo))
    finally:
        _SHARED.clear()


def _call_in_worker(i: int):
    return _MAP["fn"](_MAP["items"][i])


def fork_map(fn, items: list, workers: int) -> list:
    """[fn(item) for item in items], in a fork pool of `workers` when that is more than one: fn and the items
    (and whatever they reference, such as a loaded cache) are inherited, never pickled; only the results come
    back pickled, in the items' order. Used by the cross-fit folds (heads.train.crossfit)."""
    if workers <= 1 or len(items) < 2:
        return [fn(item) for item in items]
    _MAP.update(fn=fn, items=items)
    try:
        with _pool(min(workers, len(items))) as pool:
            return list(pool.imap(_call_in_worker, range(len(items))))
    finally:
        _MAP.clear()
