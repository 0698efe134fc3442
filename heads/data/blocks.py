"""The block buffer of a streamed cache (heads.data.stream): blocks of rows read from the cache file, at most
`capacity` in memory, and a background thread that reads the blocks the next batches will need ahead of them.

    blocks = Blocks(path, {"text_tokens": "text/tokens", ...}, block_rows=170, n_rows=N, capacity=48)
    blocks.schedule([5, 2, 9, ...])      # the order the epoch (or inference) will visit blocks in
    arrays = blocks.get(5)               # {"text_tokens": tensor (block_rows, ...), ...}

The thread reads with pread (featcache.cache.rows), which releases the GIL while the training step runs, and
each process opens the file itself: h5py handles are not fork-safe, and the forked workers of an ablation or a
cross-fit each open their own.
"""
from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict

import torch

from featcache.cache.rows import RowReader

_LIVE = weakref.WeakSet()  # every Blocks of this process, for the fork guard below


def _before_fork() -> None:
    # A fork while a thread is inside h5py would leave HDF5's lock held forever in the child (an ablation forks
    # its workers from the process that loaded the cache): hold every reader's I/O lock across the fork.
    for b in list(_LIVE):
        b._io.acquire()


def _after_fork_parent() -> None:
    for b in list(_LIVE):
        b._io.release()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_parent,
                    after_in_child=lambda: [setattr(b, "_io", threading.Lock()) for b in list(_LIVE)])


class Blocks:
    """At most `capacity` blocks in memory, least recently used evicted first but never one of the plan's current
    or next window (`_put`); a thread reads scheduled blocks ahead of the reader (up to capacity / 3 ahead), each
    process with its own file handle."""

    def __init__(self, path: str, names: dict, block_rows: int, n_rows: int, capacity: int):
        self.path, self.names, self.block_rows, self.n_rows, self.capacity = path, names, block_rows, n_rows, capacity
        self._pid, self._io = None, threading.Lock()
        _LIVE.add(self)

    def _fresh(self) -> None:
        """(Re)open per process: after a fork the parent's handle, lock and thread are not usable."""
        if self._pid == os.getpid():
            return
        self._pid, self._reader = os.getpid(), RowReader(self.path, verify=False)
        self._cond, self._blocks, self._reading = threading.Condition(), OrderedDict(), set()
        self._plan, self._next = [], 0
        self._thread = threading.Thread(target=self._ahead, daemon=True, name="featcache-prefetch")
        self._thread.start()

    def _read(self, b: int) -> dict[str, torch.Tensor]:
        lo, hi = b * self.block_rows, min(self.n_rows, (b + 1) * self.block_rows)
        with self._io:  # (the fork guard)
            return {k: torch.from_numpy(self._reader.rows(n, lo, hi)) for k, n in self.names.items()}

    def _put(self, b: int, arrays) -> None:  # with the lock held
        self._blocks[b] = arrays
        self._blocks.move_to_end(b)
        if len(self._blocks) <= self.capacity:
            return
        # Least recently used first, but never a block of the plan's current or next window: a block read
        # ahead has not been used yet, so by recency alone it looked older than the blocks just finished
        # with, and was evicted (and read again) just before its turn.
        w = self.capacity // 3
        near = set(self._plan[max(0, self._next - w):self._next + w])
        for k in [k for k in self._blocks if k not in near and k != b]:
            if len(self._blocks) <= self.capacity:
                break
            del self._blocks[k]
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)

    def schedule(self, blocks) -> None:
        """The blocks the next reads will need, in order: the thread reads them ahead."""
        self._fresh()
        with self._cond:
            self._plan, self._next = [int(b) for b in blocks], 0
            self._cond.notify_all()

    def get(self, b: int) -> dict[str, torch.Tensor]:
        self._fresh()
        with self._cond:
            while b in self._reading:  # the thread is reading it right now
                self._cond.wait()
            if b in self._plan[self._next:self._next + self.capacity // 3 + 1]:
                self._next = self._plan.index(b, self._next) + 1  # the reader has moved on: read further ahead
                self._cond.notify_all()
            if b in self._blocks:
                self._blocks.move_to_end(b)
                return self._blocks[b]
            self._reading.add(b)
        try:
            arrays = self._read(b)
        finally:
            with self._cond:
                self._reading.discard(b)
                self._cond.notify_all()
        with self._cond:
            self._put(b, arrays)
        return arrays

    def _ahead(self) -> None:
        while True:
            with self._cond:
                b = None
                while b is None:
                    window = self._plan[self._next:self._next + self.capacity // 3]
                    b = next((x for x in window if x not in self._blocks and x not in self._reading), None)
                    if b is None:
                        self._cond.wait()
                self._reading.add(b)
            try:
                arrays = self._read(b)
            except Exception:  # the reader that needs it reads it again and raises there
                arrays = None
            with self._cond:
                self._reading.discard(b)
                if arrays is not None:
                    self._put(b, arrays)
                self._cond.notify_all()
