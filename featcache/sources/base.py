"""What every dataset reader returns: samples, the problems found in them, and the format's class names.

A dataset format is a `DatasetReader` subclass in its own module of this package, registered where it is
defined (`@READERS.register("mvsa")`) and declaring its class names; featcache.sources imports every module
here, so a new format is one new file. Reading never stops at a bad sample: each problem becomes a `Problem`
naming the guid and file; samples with a fatal problem are kept but marked invalid, so the cache has a row for
every guid and the heads can skip and count them.

Images are not decoded by readers (that happens in the extraction workers); `scan_images` does a full decode
pass for `--strict`, which must fail before any backbone is loaded.
"""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..registry import Registry
from .images import DEFAULT_MAX_PIXELS, load_rgb


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
    label: int  # index into the dataset's classes, -1 when unlabelled
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
    classes: tuple[str, ...]  # label k is classes[k]; recorded in the cache as meta["classes"]
    index_files: tuple[str, ...] = ()  # files under root that list the samples (label files): fingerprinted
    problems: list[Problem] = field(default_factory=list)
    encodings: Counter = field(default_factory=Counter)  # how each text file was decoded
    empty_texts: int = 0
    clean_text: bool = False
    shard: dict | None = None  # set by subset(): where these rows sit in the whole dataset
    format: str = "mvsa"  # the READERS name that read it (recorded in the cache)

    def subset(self, start: int, stop: int, shard: dict) -> "Dataset":
        """Rows [start, stop) as a dataset of their own, with their problems and counts, so the summaries of
        consecutive subsets add up to the whole one (index-file problems, guid '-', go with row 0)."""
        samples = self.samples[start:stop]
        guids = {s.guid for s in samples}
        problems = [p for p in self.problems if p.guid in guids or (p.guid == "-" and start == 0)]
        encodings = Counter(s.encoding for s in samples if s.encoding)
        return Dataset(self.root, samples, self.classes, self.index_files, problems, encodings,
                       sum(s.empty_text for s in samples), self.clean_text, shard, self.format)

    def fingerprint(self) -> str:
        """Content hash of index files, texts and images (size + first 64 KiB), stable across copies and clones."""
        h = hashlib.sha256()
        for fname in self.index_files:
            path = os.path.join(self.root, fname)
            if os.path.exists(path):
                with open(path, "rb") as f:  # closed: an open handle left per extraction warned (ResourceWarning)
                    h.update(f.read())
        for s in self.samples:
            h.update(s.guid.encode() + b"\0" + s.raw_text.encode("utf-8", "surrogatepass") + b"\0")
            if os.path.exists(s.image_path):
                with open(s.image_path, "rb") as f:
                    h.update(str(os.path.getsize(s.image_path)).encode() + f.read(65536))
        if self.format != "mvsa":  # what the reader made of the files (column options, label rules, targets);
            # the first format's fingerprint stays as it was, so its cache keys do not change
            h.update("\0".join(self.classes).encode() + b"\0")
            for s in self.samples:
                h.update(f"{s.split}\0{s.label}\0".encode() + s.target.encode("utf-8", "surrogatepass") + b"\0")
        return h.hexdigest()

    def add_problem(self, sample: Sample, file: str, kind: str, message: str, fatal: bool) -> None:
        self.problems.append(Problem(sample.guid, file, kind, message, fatal))
        if fatal:
            sample.valid = False


class DatasetReader:
    """A dataset format: its class names (label order), the layout it reads, its options, how to detect it."""

    classes: tuple[str, ...] = ()  # fixed class names; () when they come from the data (manifest)
    layout: str = ""  # one line: the files it expects (`featcache formats`, detection errors)
    options: tuple[str, ...] = ()  # keyword options of `read` (e.g. twitter: images)

    @staticmethod
    def detect(path: str) -> bool:
        """Whether PATH has this format's layout, from file names (cheap; no decoding)."""
        return False

    def read(self, root: str, clean_text: bool = False, limit: int | None = None, **options) -> Dataset:
        """Every sample under `root`; `limit` keeps the first N rows of each index file (quick trials)."""
        raise NotImplementedError


READERS: Registry[type[DatasetReader]] = Registry("dataset format")


def detect_format(path: str) -> str:
    """The one format whose layout PATH has; an error listing every layout looked for otherwise (never a guess)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset path {path!r} does not exist")
    found = [name for name, reader in READERS.items() if reader.detect(path)]
    if len(found) == 1:
        return found[0]
    if found:
        raise ConfigError(f"{path!r} matches several dataset formats ({', '.join(found)}); choose one with "
                          f"--format {'|'.join(found)}")
    looked = "; ".join(f"{name}: {reader.layout}" for name, reader in READERS.items())
    raise FileNotFoundError(f"no known dataset layout at {path!r}. Looked for {looked}. If the data is in one of "
                            "these formats under other names, pass --format NAME; otherwise write a manifest "
                            "(csv or jsonl: id, text, image, label, split) and pass its path.")


def read_dataset(fmt: str, root: str, clean_text: bool = False, limit: int | None = None, **options) -> Dataset:
    """Read `root` with format `fmt` ("auto": detected). Options left None are unset; one the format does not
    take is an error, so that e.g. --images given with another format is not silently ignored."""
    fmt = detect_format(root) if fmt == "auto" else fmt
    reader = READERS.get(fmt)
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(reader.options))
    if unknown:
        raise ConfigError(f"format {fmt!r} has no option {', '.join(map(repr, unknown))} (its options: "
                          f"{', '.join(reader.options) or 'none'}); drop it or choose its format with --format")
    ds = reader().read(root, clean_text=clean_text, limit=limit, **given)
    ds.format = fmt
    return ds


def note_image_problems(ds: Dataset, index: int, notes) -> None:
    """Record the ImageNotes of sample `index` (from a worker or from `scan_images`) as Problems."""
    s = ds.samples[index]
    for n in notes:
        if n.kind == "missing" and any(p.guid == s.guid and p.kind == "missing" and
                                       p.file.endswith(os.path.basename(s.image_path)) for p in ds.problems):
            continue  # already reported by the reader
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
        "splits": dict(Counter(s.split for s in ds.samples)),  # every split the data names (train/dev/test/...)
        "invalid": sum(not s.valid for s in ds.samples),
        "labels": {name: sum(s.label == i for s in ds.samples) for i, name in enumerate(ds.classes)},
        "text_encodings": dict(ds.encodings),
        "empty_texts": ds.empty_texts,
        "problems": dict(kinds),
    }
