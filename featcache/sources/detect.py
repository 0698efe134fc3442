"""`--format auto`: which reader a dataset path is for, from its file names (and, for MVSA's
labelResultAll.txt, its first line: one annotator or three).

The detectors are written not to overlap: today's `mvsa` layout (train.txt / test_without_label.txt beside
data/) is `mvsa` even when the folder also holds labelResultAll.txt; a folder with a manifest's
metadata.csv|jsonl is a `manifest`, not Hateful Memes. Should two still match, that is an error asking for
`--format`, never a guess.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

from ..dataset import LABEL_FILES, read_mvsa
from . import hateful_memes, mvsa_multiple, mvsa_single, table, twitter
from .common import is_mvsa_layout


def _mvsa_read(path: str, clean_text: bool = False, limit: int | None = None, **options):
    if any(v is not None for v in options.values()):
        raise ValueError(f"format 'mvsa' has no options (got {', '.join(options)}); drop them or choose the "
                         "format they belong to with --format")
    return read_mvsa(path, clean_text=clean_text, limit=limit)


# Today's reader, with the same four attributes as the reader modules.
MVSA = SimpleNamespace(
    FORMAT="mvsa",
    LAYOUT=f"DIR/{' + DIR/'.join(f for _, f in LABEL_FILES)} (guid,tag) + DIR/data/GUID.txt|jpg",
    detect=lambda path: os.path.isdir(path) and is_mvsa_layout(path),
    read=_mvsa_read,
)
READERS = (MVSA, mvsa_single, mvsa_multiple, twitter, hateful_memes, table)


def detect_format(path: str) -> str:
    """The FORMAT of the one reader whose layout PATH has; an error listing every layout looked for otherwise."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset path {path!r} does not exist")
    found = [r.FORMAT for r in READERS if r.detect(path)]
    if len(found) == 1:
        return found[0]
    if found:
        raise ValueError(f"{path!r} matches several dataset formats ({', '.join(found)}); "
                         f"choose one with --format {'|'.join(found)}")
    looked = "; ".join(f"{r.FORMAT}: {r.LAYOUT}" for r in READERS)
    raise FileNotFoundError(f"no known dataset layout at {path!r}. Looked for {looked}. "
                            "If the data is in one of these formats under other names, pass --format NAME; "
                            "otherwise write a manifest (csv or jsonl: id, text, image, label, split).")
