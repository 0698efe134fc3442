"""Caches larger than memory: batches read straight from the cache file, in bounded memory.

    data = load_data("cache/big.h5", keys=fusion.inputs, budget="auto")   # CacheData or StreamData

`load_data` keeps today's in-memory path (heads.data.cache.CacheData) whenever the arrays a head reads fit the
memory budget, and returns a StreamData otherwise: the same interface (labels, splits, guids in memory; `batch`,
`rows`, `dims`), but the feature arrays stay on disk and are read in *blocks*: `block_rows` consecutive rows
of every array a head reads, one contiguous byte range per chunk (featcache.cache.rows: featcache writes
row-chunked, uncompressed arrays; never HDF5 fancy indexing over scattered rows).

Shuffling (the one thing that differs from the in-memory path): an epoch visits the training rows' blocks in
a seeded random order and, `buffer_blocks` blocks at a time, the rows inside those blocks in a seeded random
order (heads that read text tokens: in batches of similar text length, as in memory). A batch therefore
mixes rows of at most about 2 x buffer_blocks blocks instead of rows drawn from the whole split; every row is
still seen once per epoch. Validation, test and `predict` read the same values as
the in-memory path, so their numbers are identical.

Validation rows are read again after every epoch. `keep(rows)` (stage 1 calls it with its validation rows)
copies them out of their blocks as the training epoch reads those blocks, when they fit the memory budget
beside the block buffers: validation then reads no block (it would otherwise read nearly every block a second
time, for a fifth of the rows) and goes in order of text length, as in memory.

The blocks in memory and the thread that reads them ahead of the batches, in the order the epoch (or
inference) will need them (`schedule`), are heads.data.blocks.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from featcache.cache.rows import RowReader
from featcache.errors import ConfigError

from .blocks import Blocks
from .cache import FEATURES, TEXT_STATES, VIEWS, CacheData, length_grouped, load_cache

RAM_SHARE = 8  # budget "auto": an eighth of the machine's RAM, so that the arrays, the forked workers of an
# ablation and the page cache of a streamed file fit beside each other (and a 50x MVSA cache trains in 4 GB)
BLOCK_BYTES = 4 << 20  # a block reads at least this much of the widest array (one of featcache's 4 MiB chunks)
BUFFER_BLOCKS = 16  # blocks whose rows are shuffled together
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30,
          "t": 1 << 40, "tb": 1 << 40}


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_budget(text: str | int | None) -> int:
    """Bytes of a memory budget: "auto" (RAM / RAM_SHARE), "0" (always stream), or a size such as 4GB, 512MB."""
    if text is None or str(text).strip().lower() == "auto":
        return ram_bytes() // RAM_SHARE
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"memory budget {text!r} is not a size: use auto, 0 (always stream), or a number with "
                          "a unit such as 512MB, 4GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _streamed(reader, keys) -> dict[str, str]:
    """batch key -> dataset name of every array the head reads (views keyed 'views:' + key)."""
    names = {k: FEATURES[k] for k in FEATURES if k in keys}
    if TEXT_STATES[0] in keys and reader.has(TEXT_STATES[1]) and reader.start_layer is not None:
        names[TEXT_STATES[0]] = TEXT_STATES[1]
    names.update({"views:" + k: n for k, n in VIEWS.items() if k in keys and reader.has(n)})
    return names


def load_data(path: str, keys=None, texts: bool = False, budget: str | int | None = "auto",
              block_rows: int | None = None, buffer_blocks: int = BUFFER_BLOCKS) -> CacheData:
    """The cache in memory (load_cache) when the arrays `keys` name fit `budget` bytes, else a StreamData
    reading blocks of `block_rows` rows (None: whole chunks, at least BLOCK_BYTES of the widest array)."""
    keys = list(FEATURES) if keys is None else list(keys)
    limit = parse_budget(budget)
    with RowReader(path) as r:  # verifies a manifest's shards once; the streaming readers then skip it
        stored = r.reader.datasets()
        names = _streamed(r.reader, keys)
        need = sum(int(np.prod(stored[n][0], dtype=np.int64)) * np.dtype(stored[n][1]).itemsize
                   for n in names.values() if n in stored)
        chunks = {n: r.chunk_rows(n) for n in names.values() if n in stored}
        start = r.reader.start_layer if TEXT_STATES[0] in names else None
    if need <= limit:
        return load_cache(path, keys, texts)
    # labels, guids, splits, shapes: everything but the arrays; and the text mask (one byte per position) when the
    # head reads it, for the lengths of length-grouped epochs (then dropped: the batches stream it)
    meta = load_cache(path, keys=("text_mask",) if "text_mask" in names else (), texts=texts)
    # Blocks are whole chunks of the array with the widest rows (the token arrays, whose chunks are the
    # fewest rows): one block is one contiguous run of chunks there and a contiguous slice of the others.
    widest = max(names.values(), key=lambda n: int(np.prod(stored[n][0][1:], dtype=np.int64)) *
                 np.dtype(stored[n][1]).itemsize)
    row_bytes = int(np.prod(stored[widest][0][1:], dtype=np.int64)) * np.dtype(stored[widest][1]).itemsize
    per = chunks[widest]
    block = block_rows or -(-max(per, -(-BLOCK_BYTES // row_bytes)) // per) * per
    views = next((stored[n][0][1] for k, n in names.items() if k.startswith("views:")), 0)
    clean = sum(int(np.prod(stored[n][0][1:], dtype=np.int64)) * np.dtype(stored[n][1]).itemsize
                for k, n in names.items() if not k.startswith("views:") and n in stored)
    kept = {f: getattr(meta, f) for f in CacheData.__dataclass_fields__
            if f not in ("start_layer", "features", "lengths")}
    return StreamData(**kept, features={}, start_layer=start, names=names, block_rows=block,
                      buffer_blocks=buffer_blocks, budget=limit, need=need, n_views=views,
                      row_lengths=meta.text_lengths(), row_bytes=clean)


def data_record(data: CacheData) -> dict:
    """How a run read its cache (metrics.json "data"): in memory, or streamed with which blocks."""
    if not isinstance(data, StreamData):
        return {"streamed": False}
    return {"streamed": True, "need_bytes": data.need, "budget_bytes": data.budget, "block_rows": data.block_rows,
            "buffer_blocks": data.buffer_blocks, "kept_rows": data.kept_rows()}


def describe_stream(data: "StreamData") -> str:
    return (f"streaming {data.path}: the arrays this head reads need {data.need / 2**30:.2f} GiB, over the memory "
            f"budget of {data.budget / 2**30:.2f} GiB (--memory-budget); reading blocks of {data.block_rows} rows, "
            f"{data.buffer_blocks} blocks shuffled together")


@dataclass
class StreamData(CacheData):
    """A CacheData whose feature arrays are read from disk block by block (module docstring)."""
    names: dict = field(default_factory=dict)  # batch key -> dataset name (views: 'views:' + key)
    block_rows: int = 0
    buffer_blocks: int = BUFFER_BLOCKS
    budget: int = 0  # what the arrays did not fit, and how much they need: said by `heads train`
    need: int = 0
    n_views: int = 0  # K of a cache with --image-views K
    # (N,) each row's used text positions, for length-grouped epochs (None: the head reads no text mask). Not
    # `lengths`: that one makes inference sort rows by length, which would read every block for every batch.
    row_lengths: torch.Tensor | None = None
    row_bytes: int = 0  # one row of the arrays `keep` copies (all but the views)

    def __post_init__(self):
        self._blocks = Blocks(self.path, self.names, self.block_rows, len(self.guids), 3 * self.buffer_blocks)
        self.views = {k[len("views:"):]: None for k in self.names if k.startswith("views:")}  # batch() asks `in`
        self._kept = _Kept.none(len(self.guids))

    def keep(self, rows) -> bool:
        """Keep `rows` (validation: read after every epoch) in memory once their blocks have been read, if they
        fit the budget beside the block buffers (module docstring); replaces the rows kept before. True if kept."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        buffers = self._blocks.capacity * self.block_rows * (self.need // max(1, len(self.guids)))
        if not len(rows) or len(rows) * self.row_bytes + buffers > self.budget:
            self._kept = _Kept.none(len(self.guids))
            return False
        self._kept = _Kept(rows, len(self.guids), self.block_rows)
        return True

    def kept_rows(self) -> int:
        return len(self._kept.rows)

    def sort_lengths(self, rows) -> torch.Tensor | None:
        # Kept rows are in memory: inference may visit them in order of length without reading any block.
        return self.row_lengths if self._kept.holds(rows) else None

    def num_views(self) -> int:
        return self.n_views

    def to_device(self, device) -> "StreamData":
        return self  # batches move to the device one by one (batch(..., device))

    def epoch_order(self, rows: np.ndarray, gen: torch.Generator, group: int = 0) -> torch.Tensor:
        """Positions into `rows` for one epoch, block-shuffled (module docstring); the thread reads ahead.
        group = the batch size, for heads that read text tokens: inside each buffer's rows, batches of similar
        text length (length_grouped, as in memory). A buffer's last, partial batch is carried over and completed
        by the next buffer's first rows, so batch boundaries stay aligned and at most two neighbouring buffers'
        blocks are in use at a time."""
        blk = np.asarray(rows) // self.block_rows
        blocks = np.unique(blk)
        order = blocks[torch.randperm(len(blocks), generator=gen).numpy()]
        lengths = self.row_lengths if group else None
        parts, carry = [], np.zeros(0, dtype=np.int64)
        for g in range(0, len(order), self.buffer_blocks):
            pos = np.flatnonzero(np.isin(blk, order[g:g + self.buffer_blocks]))
            pos = pos[torch.randperm(len(pos), generator=gen).numpy()]
            if lengths is not None:  # the carried partial batch, completed by this buffer's first rows, goes first
                k = (group - len(carry)) if len(carry) else 0
                head, pos = np.concatenate([carry, pos[:k]]), pos[k:]
                if 0 < len(head) < group:  # a buffer too small to complete it
                    carry = head
                    continue
                pos = length_grouped(torch.from_numpy(pos), lengths[torch.from_numpy(np.asarray(rows)[pos])],
                                     group, gen).numpy()
                cut = len(pos) // group * group
                pos, carry = np.concatenate([head, pos[:cut]]), pos[cut:]
            parts.append(pos)
        self._blocks.schedule(order)
        parts.append(carry)
        return torch.from_numpy(np.concatenate(parts))

    def schedule(self, rows) -> None:
        rows = np.asarray(rows)
        if len(self._kept.rows):  # kept rows need no block
            rows = rows[~self._kept.have(rows)]
        blk = rows // self.block_rows
        _, first = np.unique(blk, return_index=True)
        self._blocks.schedule(blk[np.sort(first)])

    def _gather(self, key: str, idx: torch.Tensor, length: int | None = None) -> torch.Tensor:
        return self._rows(key, idx, length)

    def _gather_views(self, key: str, idx: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        return self._rows("views:" + key, idx)[torch.arange(len(idx)), view]

    def _rows(self, key: str, idx: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """Rows idx of one array, from the blocks that hold them (each read once, then kept in the buffer); a
        per-position text array only up to `length`, as CacheData._gather (copying less is the point)."""
        idx = idx.numpy()
        cut = (lambda a: a) if length is None else (lambda a: a[:, :length])  # noqa: E731
        if len(idx) and self._kept.holds(idx) and key in self._kept.arrays:
            return cut(self._kept.arrays[key]).index_select(0, torch.from_numpy(self._kept.slot[idx]))
        blk, off = idx // self.block_rows, torch.from_numpy(idx % self.block_rows)
        ids = np.unique(blk)
        if len(ids) <= 1:  # one block (or no rows)
            return cut(self._block(int(ids[0]) if len(ids) else 0)[key]).index_select(0, off)
        arrays = [cut(self._block(int(b))[key]) for b in ids]
        out = torch.empty((len(idx),) + tuple(arrays[0].shape[1:]), dtype=arrays[0].dtype)
        order = np.argsort(blk, kind="stable")  # the batch's rows grouped by block: one slice of `order` each
        bounds = np.searchsorted(blk[order], ids, side="right")
        for a, lo, hi in zip(arrays, np.r_[0, bounds[:-1]], bounds):
            sel = torch.from_numpy(order[lo:hi])
            out.index_copy_(0, sel, a.index_select(0, off.index_select(0, sel)))  # (index_put: 3x slower)
        return out

    def _block(self, b: int) -> dict[str, torch.Tensor]:
        arrays = self._blocks.get(b)
        self._kept.fill(b, arrays)
        return arrays


class _Kept:
    """The kept rows (StreamData.keep): row -> slot, the arrays (allocated when the first block is copied from),
    and which slots hold their values yet."""

    def __init__(self, rows: np.ndarray, n_rows: int, block_rows: int):
        self.rows, self.block_rows = rows, block_rows
        self.slot = np.full(n_rows, -1, dtype=np.int64)
        self.slot[rows] = np.arange(len(rows))
        self.filled = np.zeros(len(rows), dtype=bool)
        self.pending = set((rows // block_rows).tolist())  # blocks not yet copied from
        self.arrays: dict[str, torch.Tensor] = {}

    @classmethod
    def none(cls, n_rows: int) -> "_Kept":
        return cls(np.zeros(0, dtype=np.int64), n_rows, 1)

    def have(self, idx: np.ndarray) -> np.ndarray:
        """Per row of idx: kept, and its values copied."""
        s = self.slot[idx]
        return (s >= 0) & self.filled[np.maximum(s, 0)]

    def holds(self, idx) -> bool:
        return len(self.rows) > 0 and bool(self.have(np.asarray(idx)).all())

    def fill(self, b: int, arrays: dict[str, torch.Tensor]) -> None:
        if b not in self.pending:
            return
        self.pending.discard(b)
        lo = b * self.block_rows
        rows = self.rows[(self.rows >= lo) & (self.rows < lo + self.block_rows)]
        for key, a in arrays.items():
            if key.startswith("views:"):
                continue
            if key not in self.arrays:
                self.arrays[key] = torch.empty((len(self.rows),) + tuple(a.shape[1:]), dtype=a.dtype)
            self.arrays[key].index_copy_(0, torch.from_numpy(self.slot[rows]),
                                         a.index_select(0, torch.from_numpy(rows - lo)))
        self.filled[self.slot[rows]] = True
