"""A published split applied to a cache by sample id (`--split-file FILE`), so results compare with papers.

Two forms, the ones MVSA papers release:

    a file       `id,split` per line (a tab works too; a header line `id,split` / `guid,split` is optional)
    a folder     train.txt, dev.txt, val.txt, test.txt (those present): one id per line, e.g. CLMLF's 8:1:1 lists

Ids are matched to the cache's guids as written. Ids in the file that the cache lacks, and labelled cache rows
that no list names, are reported (counts and the first few ids) and recorded in split.json; unlisted rows are
not used. An id listed in two splits, or a file that matches no cache row, is an error.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from featcache.errors import ConfigError

LIST_NAMES = ("train", "dev", "val", "test")  # the folder form: <name>.txt, the split is the file's stem
HEADER_IDS = ("id", "guid", "sample", "sample_id")
SHOW = 5  # ids quoted in the mismatch report


class SplitFileError(ConfigError):
    """A --split-file that cannot be applied (unreadable, contradictory, or about other data)."""


def read_split_file(path: str, data, say=None) -> tuple[np.ndarray, dict]:
    """(split name per cache row, "" for rows the file does not list; the split.json record of the file).
    `data` is a CacheData (guids, labels, path); `say(line)` prints the mismatch report when given."""
    assignment, digest = (_read_folder if os.path.isdir(path) else _read_lines)(path)
    row = {g: i for i, g in enumerate(data.guids)}
    names = np.full(len(data.guids), "", dtype=object)
    missing = [g for g in assignment if g not in row]
    for g, split in assignment.items():
        if g in row:
            names[row[g]] = split
    if len(missing) == len(assignment):
        raise SplitFileError(f"--split-file {path}: none of its {len(assignment)} ids is a sample of {data.path} "
                             f"(e.g. {', '.join(list(assignment)[:SHOW])}; the cache has e.g. "
                             f"{', '.join(data.guids[:SHOW])}); is it the split of another dataset?")
    unlisted = [data.guids[i] for i in np.flatnonzero((data.labels >= 0) & (names == ""))]
    record = {"path": os.path.abspath(path), "name": os.path.basename(os.path.normpath(path)), "sha256": digest,
              "ids": len(assignment), "not_in_cache": len(missing), "labelled_not_listed": len(unlisted)}
    if say is not None and (missing or unlisted):
        say(f"warning: --split-file {record['name']}: {_some(missing)} of its ids are not in the cache; "
            f"{_some(unlisted)} labelled cache rows are in no split and are not used")
    return names.astype(str), {"split_file": record}


def _some(ids: list[str]) -> str:
    return f"{len(ids)} (e.g. {', '.join(ids[:SHOW])})" if ids else "0"


def _assign(out: dict, guid: str, split: str, where: str) -> None:
    if out.setdefault(guid, split) != split:
        raise SplitFileError(f"{where}: id {guid} is in split {out[guid]!r} and in {split!r}; an id belongs to "
                             "one split")


def _read_lines(path: str) -> tuple[dict, str]:
    """`id,split` lines -> ({id: split}, sha256 of the file)."""
    with open(path, "rb") as f:
        raw = f.read()
    out: dict[str, str] = {}
    for n, line in enumerate(raw.decode("utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.replace("\t", ",").split(",")]
        if n == 1 and parts[0].lower() in HEADER_IDS:
            continue  # the optional header
        if len(parts) != 2 or not all(parts):
            raise SplitFileError(f"--split-file {path} line {n}: expected `id,split`, got {line.strip()!r}; "
                                 f"or give a folder of {'/'.join(LIST_NAMES)}.txt id lists")
        _assign(out, parts[0], parts[1], f"--split-file {path} line {n}")
    if not out:
        raise SplitFileError(f"--split-file {path} lists no ids")
    return out, hashlib.sha256(raw).hexdigest()


def _read_folder(path: str) -> tuple[dict, str]:
    """A folder of <split>.txt id lists -> ({id: split}, sha256 over the lists, in LIST_NAMES order)."""
    found = [n for n in LIST_NAMES if os.path.isfile(os.path.join(path, f"{n}.txt"))]
    if not found:
        raise SplitFileError(f"--split-file {path} is a folder without any of "
                             f"{', '.join(n + '.txt' for n in LIST_NAMES)}; give those id lists or an `id,split` file")
    out: dict[str, str] = {}
    digest = hashlib.sha256()
    for name in found:
        with open(os.path.join(path, f"{name}.txt"), "rb") as f:
            raw = f.read()
        digest.update(f"{name}.txt\0".encode() + raw)
        for n, line in enumerate(raw.decode("utf-8-sig").splitlines(), 1):
            guid = line.strip().replace("\t", ",").split(",")[0].strip()
            if guid and not (n == 1 and guid.lower() in HEADER_IDS):
                _assign(out, guid, name, f"--split-file {path}/{name}.txt line {n}")
    return out, digest.hexdigest()
