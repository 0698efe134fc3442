"""Rows that share an image file: each distinct image is decoded and run through the image backbone once.

Twitter-2015/2017 list one tweet once per target, with the same image file: decoding it and running the image
tower once per row would repeat the same work (a third of Twitter-2017's rows). The first valid row naming an
image file is its *owner*; every later valid row naming the same file is *shared*: the DataLoader does not
decode it (featcache.extract.decode.ImageRows yields SHARED), the image tower skips it
(featcache.extract.forward.image_arrays leaves it zero), and `fill_shared` copies the owner's image arrays into
it before the batch is written: from the same batch, or from the cache file, where an earlier batch put it
(owners come first in row order, also after --resume). When the owner's image fails, its shared rows are
invalid too, with the owner's problem. The feature arrays are what a per-row extraction writes (up to the
float noise of another batch composition); datasets without shared files (MVSA) run exactly as before.

Not with augmented views (seeded per guid, so each row's views differ) nor with a captioner (its serial path
reads every row's decoded image): then every row is decoded as before.
"""
from __future__ import annotations

import os

from ..sources.base import Dataset, note_image_problems
from ..sources.images import ImageNote

IMAGE_ARRAYS = ("image/tokens", "image/pooled")


def shared_owners(ds: Dataset, enabled: bool = True) -> dict[int, int]:
    """{shared row: its owner row} over the rows of `ds` (a shard's rows: owners within the shard)."""
    if not enabled:
        return {}
    first, owners = {}, {}
    for i, s in enumerate(ds.samples):
        if not s.valid or not s.image_path:  # invalid rows are zeroed anyway; they neither own nor share
            continue
        key = os.path.realpath(s.image_path)
        if key in first:
            owners[i] = first[key]
        else:
            first[key] = i
    return owners


def fill_shared(arrays: dict, idx: list[int], owners: dict[int, int], writer, ds: Dataset,
                problems: list) -> list[int]:
    """Copy each shared row's image arrays from its owner (this batch, else the file); returns the shared rows
    that are invalid because their owner's image failed (the caller marks them), with the owner's problems
    added for them to `ds`."""
    where = {i: k for k, i in enumerate(idx)}
    failed = []
    for k, i in enumerate(idx):
        o = owners.get(i)
        if o is None:
            continue
        if not ds.samples[o].valid:
            failed.append(i)
            _inherit(ds, i, o, problems)
            continue
        for name in IMAGE_ARRAYS:
            arrays[name][k] = arrays[name][where[o]] if o in where else writer.f[name][o]
    return failed


def _inherit(ds: Dataset, row: int, owner: int, problems: list) -> None:
    """The owner's fatal image problems, for `row` too; into the run's problem log as well, so that a resumed
    run (which re-reads that log) still reports them."""
    o = ds.samples[owner]
    notes = [p for p in problems if p[0] == owner and p[3]] or [[owner, "corrupt", "the image failed", True]]
    for _, kind, message, _ in notes:
        note = ImageNote(kind, f"{message.split(': ', 1)[-1]} (the image of guid {o.guid}, decoded once for both)",
                         True)
        note_image_problems(ds, row, [note])
        problems.append([row, note.kind, note.message, note.fatal])
