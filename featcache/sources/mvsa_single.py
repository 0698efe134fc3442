"""`mvsa-single`: the public MVSA-Single release (Niu et al., MMM 2016), as downloaded.

Layout: DIR/labelResultAll.txt (a header line `ID<TAB>text,image`, then one line per pair with its one
annotator's text label and image label) and DIR/data/ID.txt, DIR/data/ID.jpg.

One label per pair by the rule of the literature (MultiSentiNet, CLMLF), `common.merge_mvsa`: equal labels ->
that label; neutral + positive/negative -> the positive/negative one; positive vs negative -> the pair is
dropped. A dropped pair stays in the dataset as a row marked invalid with a `label_conflict` problem (so the
cache has a row per ID and the summary counts the drops); heads skip invalid rows. The release ships no split:
every pair is in split 'train'. Classes: negative, neutral, positive (label 0, 1, 2), as the `mvsa` reader.
"""
from __future__ import annotations

import os

from .base import READERS, Dataset, DatasetReader
from .common import MVSA_CLASSES, is_mvsa_layout, label_result_fields, merge_mvsa, read_mvsa_release

FORMAT = "mvsa-single"
LAYOUT = "DIR/labelResultAll.txt (ID<TAB>text,image: one annotator) + DIR/data/ID.txt|jpg"


def detect(path: str) -> bool:
    """labelResultAll.txt with one `text,image` column (its first line is read), not today's mvsa layout."""
    label_file = os.path.join(path, "labelResultAll.txt")
    return (os.path.isdir(path) and os.path.isfile(label_file) and not is_mvsa_layout(path)
            and label_result_fields(label_file) == 2)


def resolve(pairs: list[tuple[str, str]]) -> tuple[str | None, str, str]:
    (text_label, image_label), = pairs
    label = merge_mvsa(text_label, image_label)
    return label, "label_conflict", f"text label {text_label} vs image label {image_label}"


def read(path: str, clean_text: bool = False, limit: int | None = None, **options) -> Dataset:
    """Read an MVSA-Single release folder (featcache.sources.common.read_mvsa_release)."""
    return read_mvsa_release(path, FORMAT, 1, resolve, clean_text, limit, options)


@READERS.register(FORMAT)
class MVSASingle(DatasetReader):
    __doc__ = __doc__
    classes, layout, options = MVSA_CLASSES, LAYOUT, ()
    detect, read = staticmethod(detect), staticmethod(read)
