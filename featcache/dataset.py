"""MVSA-Single reader: label files, texts, and a report of every problem found, by guid and file.

Layout: DIR/train.txt and DIR/test_without_label.txt (`guid,tag` with a header line), DIR/data/{guid}.txt and
DIR/data/{guid}.jpg. Reading never stops at a bad sample: each problem becomes a `Problem` naming the guid
and file; samples with a fatal problem are kept in the dataset but marked invalid so the cache has a row
for every guid and the heads can skip and count them.

Images are not decoded here (that happens in the extraction workers); `scan_images` does a full decode
pass for `--strict`, which must fail before any backbone is loaded.
"""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field

from .images import DEFAULT_MAX_PIXELS, load_rgb
from .text import decode_bytes, prepare_text

LABELS = ("negative", "neutral", "positive")
LABEL_FILES = (("train", "train.txt"), ("test", "test_without_label.txt"))
UNLABELLED = "null"


@dataclass(frozen=True)
class Problem:
    guid: str
    file: str
    kind: str
    message: str
    fatal: bool  # fatal: the sample is marked invalid; otherwise it was repaired and is used

    def __str__(self) -> str:
        level = "invalid" if self.fatal else "repaired"
        return f"[{self.kind}] guid {self.guid} ({self.file}): {self.message} -> {level}"


@dataclass
class Sample:
    guid: str
    split: str  # train | test
    label: int  # index into LABELS, -1 when unlabelled
    raw_text: str
    text: str  # what the text backbone sees (cleaned when asked, placeholder when empty)
    image_path: str
    valid: bool = True
    encoding: str | None = None  # how the text file was decoded (None: no text file)
    empty_text: bool = False  # the text was empty and the placeholder is encoded instead
    target: str = ""  # the aspect target the label belongs to (Twitter-2015/2017); "" for whole-post labels


@dataclass
class Dataset:
    root: str
    samples: list[Sample]
    problems: list[Problem] = field(default_factory=list)
    encodings: Counter = field(default_factory=Counter)  # how each text file was decoded
    empty_texts: int = 0
    clean_text: bool = False
    shard: dict | None = None  # set by subset(): where these rows sit in the whole dataset
    classes: tuple[str, ...] = LABELS  # class names in label order: Sample.label indexes this
    # Label / manifest files (relative to root, or absolute) the fingerprint hashes; empty: MVSA's LABEL_FILES.
    files: list[str] = field(default_factory=list)

    def subset(self, start: int, stop: int, shard: dict) -> "Dataset":
        """Rows [start, stop) as a dataset of their own, with their problems and counts, so the summaries of
        consecutive subsets add up to the whole one (label-file problems, guid '-', go with row 0)."""
        samples = self.samples[start:stop]
        guids = {s.guid for s in samples}
        problems = [p for p in self.problems if p.guid in guids or (p.guid == "-" and start == 0)]
        encodings = Counter(s.encoding for s in samples if s.encoding)
        return Dataset(self.root, samples, problems, encodings, sum(s.empty_text for s in samples),
                       self.clean_text, shard, self.classes, self.files)

    def fingerprint(self) -> str:
        """Content hash of labels, texts and images (size + first 64 KiB), stable across copies and clones."""
        h = hashlib.sha256()
        for fname in self.files or [f for _, f in LABEL_FILES]:
            path = os.path.join(self.root, fname)
            if os.path.exists(path):
                h.update(open(path, "rb").read())
        for s in self.samples:
            h.update(s.guid.encode() + b"\0" + s.raw_text.encode("utf-8", "surrogatepass") + b"\0")
            if os.path.exists(s.image_path):
                with open(s.image_path, "rb") as f:
                    h.update(str(os.path.getsize(s.image_path)).encode() + f.read(65536))
        if self.files:  # other readers: what they made of the files (column options, label rules, targets)
            h.update("\0".join(self.classes).encode() + b"\0")
            for s in self.samples:
                h.update(f"{s.split}\0{s.label}\0".encode() + s.target.encode("utf-8", "surrogatepass") + b"\0")
        return h.hexdigest()

    def add_problem(self, sample: Sample, file: str, kind: str, message: str, fatal: bool) -> None:
        self.problems.append(Problem(sample.guid, file, kind, message, fatal))
        if fatal:
            sample.valid = False


def _read_label_file(path: str, split: str, problems: list[Problem]) -> list[tuple[str, str, int]]:
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


def read_mvsa(root: str, clean_text: bool = False, limit: int | None = None) -> Dataset:
    """Read DIR in the MVSA-Single layout. `limit` keeps the first N rows of each label file (for tests)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder {root!r} does not exist")
    ds = Dataset(root=os.path.abspath(root), samples=[], clean_text=clean_text)
    found = [(split, os.path.join(root, f)) for split, f in LABEL_FILES if os.path.exists(os.path.join(root, f))]
    if not found:
        raise FileNotFoundError(f"no label file in {root!r}: expected {' or '.join(f for _, f in LABEL_FILES)} "
                                "(MVSA-Single layout: DIR/train.txt, DIR/test_without_label.txt, DIR/data/GUID.jpg|txt)")
    seen: dict[str, Sample] = {}
    for split, path in found:
        rows = _read_label_file(path, split, ds.problems)
        for guid, tag, lineno in rows[:limit] if limit else rows:
            where = f"{os.path.basename(path)}:{lineno}"
            if guid in seen:
                first = seen[guid]
                same = (first.split == split and
                        (first.label == (LABELS.index(tag) if tag in LABELS else
                                         -1 if tag == UNLABELLED else -2)))
                msg = (f"guid listed again (first in {first.split}); this line is ignored" if same else
                       f"guid listed again with a different split/tag ({split},{tag}); the sample is ambiguous")
                ds.problems.append(Problem(guid, where, "duplicate", msg, not same))
                if not same:
                    first.valid = False
                continue
            text_path = os.path.join(root, "data", f"{guid}.txt")
            sample = Sample(guid, split, -1, "", "", os.path.join(root, "data", f"{guid}.jpg"))
            seen[guid] = sample
            ds.samples.append(sample)
            if tag in LABELS:
                sample.label = LABELS.index(tag)
            elif tag != UNLABELLED:
                ds.add_problem(sample, where, "unknown_tag",
                               f"tag {tag!r} is not one of {', '.join(LABELS)} or {UNLABELLED}", True)
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
            sample.text, empty = prepare_text(raw, clean_text)
            sample.empty_text = empty
            ds.empty_texts += empty
            if not os.path.exists(sample.image_path):
                ds.add_problem(sample, f"{guid}.jpg", "missing", "image file not found", True)
    return ds


def note_image_problems(ds: Dataset, index: int, notes) -> None:
    """Record the ImageNotes of sample `index` (from a worker or from `scan_images`) as Problems."""
    s = ds.samples[index]
    for n in notes:
        if n.kind == "missing" and any(p.guid == s.guid and p.kind == "missing" and
                                       p.file.endswith(os.path.basename(s.image_path))
                                       for p in ds.problems):
            continue  # already reported by read_mvsa
        ds.add_problem(s, os.path.basename(s.image_path), n.kind, n.message.split(": ", 1)[-1], n.fatal)


def scan_images(ds: Dataset, max_pixels: int = DEFAULT_MAX_PIXELS, progress=None) -> None:
    """Fully decode every image once (for --strict) and record what is wrong with each."""
    for i, s in enumerate(ds.samples):
        if os.path.exists(s.image_path):
            _, notes = load_rgb(s.image_path, max_pixels, draft_size=256)
            note_image_problems(ds, i, notes)
        if progress:
            progress(i)


def summarize(ds: Dataset) -> dict:
    """Counts for the cache metadata and the end-of-run summary."""
    kinds = Counter(p.kind for p in ds.problems)
    return {
        "samples": len(ds.samples),
        "train": sum(s.split == "train" for s in ds.samples),
        "test": sum(s.split == "test" for s in ds.samples),
        "invalid": sum(not s.valid for s in ds.samples),
        "labels": {name: sum(s.label == i for s in ds.samples) for i, name in enumerate(LABELS)},
        "text_encodings": dict(ds.encodings),
        "empty_texts": ds.empty_texts,
        "problems": dict(kinds),
    }
