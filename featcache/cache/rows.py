"""Row ranges of a cache's arrays read straight from the file: what streaming heads (heads.data.stream) read.

    with RowReader("cache/big.h5") as r:            # a cache file or a shard manifest
        x = r.rows("text/tokens", 1700, 1870)        # (170, L, D) fp16, rows 1700..1869

Feature arrays are written uncompressed and row-chunked, with every chunk allocated when the file is created
(featcache.cache.store), so rows start..stop of an array are, chunk by chunk, one contiguous byte range of the
file whose offset HDF5 reports once (`get_chunk_info`). Reading them with `os.pread` instead of through h5py
costs one system call per chunk touched and releases the GIL while the kernel copies: a prefetch thread reads
ahead while the training step runs, where an h5py read would hold the GIL (and h5py's global lock) for the whole
copy. An array this cannot read that way (compressed, another byte order, unallocated chunks) is read
through h5py, with the same result.
"""
from __future__ import annotations

import os

import numpy as np

from .manifest import open_cache


class RowReader:
    """rows(name, start, stop) of a cache file or a shard manifest; checks the cache as open_cache does (a
    manifest's shard checksums only with verify=True)."""

    def __init__(self, path: str, verify: bool = True):
        self.reader = open_cache(path, verify)
        self.files = [_File(r) for r in getattr(self.reader, "readers", [self.reader])]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for f in self.files:
            f.close()
        self.reader.close()

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        parts, base = [], 0
        for f in self.files:  # a manifest's rows run through its shards in order
            lo, hi = max(start, base), min(stop, base + f.n)
            if lo < hi:
                parts.append(f.rows(name, lo - base, hi - base))
            base += f.n
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def chunk_rows(self, name: str) -> int:
        """Rows per HDF5 chunk of an array (all of them for a contiguous one)."""
        d = self.files[0].h5[name]
        return (d.chunks or d.shape)[0]


class _File:
    """One HDF5 file: its datasets' chunk byte offsets (found once per array) and a descriptor for pread."""

    def __init__(self, reader):
        self.h5, self.n = reader.f, len(reader)
        self.fd = os.open(reader.path, os.O_RDONLY)
        self.layout: dict[str, tuple | None] = {}

    def close(self) -> None:
        os.close(self.fd)

    def _layout(self, name: str):
        """(rows per chunk, chunk start row -> byte offset, row shape, dtype), or None: read through h5py."""
        if name not in self.layout:
            d, out = self.h5[name], None
            plain = d.dtype.isnative and d.dtype.kind in "biuf" and d.id.get_create_plist().get_nfilters() == 0
            if plain and d.chunks and all(c == s for c, s in zip(d.chunks[1:], d.shape[1:])):
                offsets = {}
                for i in range(d.id.get_num_chunks()):
                    info = d.id.get_chunk_info(i)
                    offsets[info.chunk_offset[0]] = info.byte_offset
                if len(offsets) == -(-d.shape[0] // d.chunks[0]) and None not in offsets.values():
                    out = (d.chunks[0], offsets, d.shape[1:], d.dtype)
            elif plain and not d.chunks and d.id.get_offset() is not None:
                out = (d.shape[0] or 1, {0: d.id.get_offset()}, d.shape[1:], d.dtype)
            self.layout[name] = out
        return self.layout[name]

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        layout = self._layout(name)
        if layout is None:
            return self.h5[name][start:stop]
        per, offsets, shape, dtype = layout
        row = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        out = np.empty((stop - start,) + tuple(shape), dtype=dtype)
        buf = out.reshape(-1).view(np.uint8)
        at = start
        while at < stop:
            first = at - at % per  # the chunk holding row `at`, read up to its end or `stop`
            end = min(stop, first + per)
            want, pos = (end - at) * row, (at - start) * row
            got = os.preadv(self.fd, [buf[pos:pos + want]], offsets[first] + (at - first) * row)
            if got != want:
                raise OSError(f"{self.h5.filename}: short read of {name} rows {at}..{end}")
            at = end
        return out
