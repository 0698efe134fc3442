"""`mvsa-multiple`: the public MVSA-Multiple release (Niu et al., MMM 2016), three annotators per pair.

Layout: DIR/labelResultAll.txt (a header line, then `ID<TAB>t1,i1<TAB>t2,i2<TAB>t3,i3`: each annotator's text
label and image label) and DIR/data/ID.txt, DIR/data/ID.jpg. IDs are not contiguous.

Rules, in order: per modality a label counts only when at least 2 of the 3 annotators gave it
(`common.majority`), else the pair is dropped (problem kind `no_majority`); then MVSA's merge rule
(`common.merge_mvsa`, as for MVSA-Single), positive vs negative dropping the pair (`label_conflict`).
A dropped pair stays a row marked invalid with its problem, so the summary counts the drops per rule.
Every pair is in split 'train' (the release has no split). Classes: negative, neutral, positive.
"""
from __future__ import annotations

import os

from .base import READERS, Dataset, DatasetReader
from .common import MVSA_CLASSES, is_mvsa_layout, label_result_fields, majority, merge_mvsa, read_mvsa_release

FORMAT = "mvsa-multiple"
LAYOUT = "DIR/labelResultAll.txt (ID<TAB>text,image x 3 annotators) + DIR/data/ID.txt|jpg"


def detect(path: str) -> bool:
    """labelResultAll.txt with three `text,image` columns (its first line is read), not today's mvsa layout."""
    label_file = os.path.join(path, "labelResultAll.txt")
    return (os.path.isdir(path) and os.path.isfile(label_file) and not is_mvsa_layout(path)
            and label_result_fields(label_file) == 4)


def resolve(pairs: list[tuple[str, str]]) -> tuple[str | None, str, str]:
    text_votes, image_votes = [p[0] for p in pairs], [p[1] for p in pairs]
    text_label, image_label = majority(text_votes), majority(image_votes)
    for modality, label, votes in (("text", text_label, text_votes), ("image", image_label, image_votes)):
        if label is None:
            return None, "no_majority", f"no 2 of 3 annotators agree on the {modality} label ({', '.join(votes)})"
    label = merge_mvsa(text_label, image_label)
    return label, "label_conflict", f"majority text label {text_label} vs majority image label {image_label}"


def read(path: str, clean_text: bool = False, limit: int | None = None, **options) -> Dataset:
    """Read an MVSA-Multiple release folder (featcache.sources.common.read_mvsa_release)."""
    return read_mvsa_release(path, FORMAT, 3, resolve, clean_text, limit, options)


@READERS.register(FORMAT)
class MVSAMultiple(DatasetReader):
    __doc__ = __doc__
    classes, layout, options = MVSA_CLASSES, LAYOUT, ()
    detect, read = staticmethod(detect), staticmethod(read)
