"""MVSA-Single reader: label files, texts, and a report of every problem found, by guid and file.

Layout: DIR/train.txt and DIR/test_without_label.txt (`guid,tag` with a header line), DIR/data/{guid}.txt and
DIR/data/{guid}.jpg. Tags are the three classes below, or `null` for an unlabelled (test) sample.
"""
from __future__ import annotations

import os

from .base import READERS, Dataset, DatasetReader, Problem, Sample
from .common import MVSA_CLASSES, is_mvsa_layout
from .text import decode_bytes, prepare_text

LABEL_FILES = (("train", "train.txt"), ("test", "test_without_label.txt"))
UNLABELLED = "null"


def _read_label_file(path: str, problems: list[Problem]) -> list[tuple[str, str, int]]:
    """(guid, tag, line number) rows of one label file; BOM, CRLF, blank lines and the header tolerated."""
    fname = os.path.basename(path)
    raw = open(path, "rb").read()
    if raw.startswith(b"\xef\xbb\xbf"):
        problems.append(Problem("-", fname, "bom", "label file starts with a UTF-8 BOM (ignored)", False))
        raw = raw[3:]
    if b"\r\n" in raw:
        problems.append(Problem("-", fname, "crlf", "label file has Windows line endings (handled)", False))
    rows = []
    for lineno, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        line = line.strip()
        if not line or (lineno == 1 and line.lower().replace(" ", "") == "guid,tag"):
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2 or not parts[0]:
            problems.append(Problem("-", f"{fname}:{lineno}", "bad_line",
                                    f"expected 'guid,tag', got {line[:60]!r} (line skipped)", False))
            continue
        rows.append((parts[0], parts[1].lower(), lineno))
    return rows


@READERS.register("mvsa")
class MVSA(DatasetReader):
    classes = MVSA_CLASSES
    layout = f"DIR/{' + DIR/'.join(f for _, f in LABEL_FILES)} (guid,tag) + DIR/data/GUID.txt|jpg"
    detect = staticmethod(is_mvsa_layout)

    def read(self, root: str, clean_text: bool = False, limit: int | None = None) -> Dataset:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"dataset folder {root!r} does not exist")
        ds = Dataset(root=os.path.abspath(root), samples=[], classes=self.classes,
                     index_files=tuple(f for _, f in LABEL_FILES), clean_text=clean_text)
        found = [(split, os.path.join(root, f)) for split, f in LABEL_FILES if os.path.exists(os.path.join(root, f))]
        if not found:
            raise FileNotFoundError(f"no label file in {root!r}: expected {' or '.join(f for _, f in LABEL_FILES)} "
                                    "(MVSA-Single layout: DIR/train.txt, DIR/test_without_label.txt, "
                                    "DIR/data/GUID.jpg|txt)")
        seen: dict[str, Sample] = {}
        for split, path in found:
            rows = _read_label_file(path, ds.problems)
            for guid, tag, lineno in rows[:limit] if limit else rows:
                where = f"{os.path.basename(path)}:{lineno}"
                if guid in seen:
                    self._duplicate(ds, seen[guid], split, tag, where)
                else:
                    seen[guid] = self._sample(ds, root, guid, split, tag, where)
        return ds

    def _label(self, tag: str) -> int:
        """The class index of a tag; -1 unlabelled; -2 unknown (never equal to a real label)."""
        return self.classes.index(tag) if tag in self.classes else -1 if tag == UNLABELLED else -2

    def _duplicate(self, ds: Dataset, first: Sample, split: str, tag: str, where: str) -> None:
        same = first.split == split and first.label == self._label(tag)
        msg = (f"guid listed again (first in {first.split}); this line is ignored" if same else
               f"guid listed again with a different split/tag ({split},{tag}); the sample is ambiguous")
        ds.problems.append(Problem(first.guid, where, "duplicate", msg, not same))
        if not same:
            first.valid = False

    def _sample(self, ds: Dataset, root: str, guid: str, split: str, tag: str, where: str) -> Sample:
        text_path = os.path.join(root, "data", f"{guid}.txt")
        sample = Sample(guid, split, -1, "", "", os.path.join(root, "data", f"{guid}.jpg"))
        ds.samples.append(sample)
        if tag in self.classes:
            sample.label = self.classes.index(tag)
        elif tag != UNLABELLED:
            ds.add_problem(sample, where, "unknown_tag",
                           f"tag {tag!r} is not one of {', '.join(self.classes)} or {UNLABELLED}", True)
        if split == "train" and tag == UNLABELLED:
            ds.add_problem(sample, where, "unknown_tag", "training sample has no label ('null')", True)
        if not os.path.exists(text_path):
            ds.add_problem(sample, f"{guid}.txt", "missing", "text file not found", True)
            raw = ""
        else:
            raw, enc = decode_bytes(open(text_path, "rb").read())
            ds.encodings[enc] += 1
            sample.encoding = enc
        sample.raw_text = raw
        sample.text, empty = prepare_text(raw, ds.clean_text)
        sample.empty_text = empty
        ds.empty_texts += empty
        if not os.path.exists(sample.image_path):
            ds.add_problem(sample, f"{guid}.jpg", "missing", "image file not found", True)
        return sample
