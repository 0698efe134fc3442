"""What the dataset readers share: reading label files line by line, building samples with unique ids,
texts and image paths checked the way the `mvsa` reader checks them, and MVSA's label rules.

Every reader reports problems the same way as the `mvsa` reader: a `Problem` names the sample id
and the file (`name:LINE` for a line of a label or manifest file); a fatal problem keeps the sample as a row
marked invalid, so the cache has a row for every id and the summary counts it; a repaired one is only noted.
Lines that cannot name a sample at all (malformed) are skipped with a `bad_line` problem, as today.

Text is decoded line by line with `featcache.sources.text.decode_bytes` (UTF-8, then GB18030, cp1252, latin-1), so one
line saved in another encoding does not garble the others, and each sample records how its text was decoded.
"""
from __future__ import annotations

import os
from collections import Counter

from ..errors import ConfigError
from .base import Dataset, Problem, Sample
from .text import decode_bytes, prepare_text

MVSA_CLASSES = ("negative", "neutral", "positive")  # label order of every MVSA reader (and Twitter's 0/1/2)
BOM = b"\xef\xbb\xbf"


def check_options(fmt: str, options: dict, allowed: tuple[str, ...]) -> dict:
    """The reader's options with the unset (None) ones dropped; an option the reader does not know is an error,
    so that e.g. `--images` given with another format is not silently ignored."""
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        valid = ", ".join(allowed) if allowed else "none"
        raise ConfigError(f"format {fmt!r} has no option {', '.join(map(repr, unknown))} (its options: {valid}); "
                         "drop the option or choose the format it belongs to with --format")
    return given


def new_dataset(fmt: str, root: str, clean_text: bool, classes: tuple[str, ...], files: list[str]) -> Dataset:
    return Dataset(root=os.path.abspath(root), samples=[], classes=tuple(classes), index_files=tuple(files),
                   clean_text=clean_text, format=fmt)


def read_lines(path: str, ds: Dataset) -> list[tuple[int, str, str]]:
    """(line number, text, encoding) of every line of a text file, each line decoded on its own.

    A BOM or Windows line endings are handled and noted once per file (problems of guid '-', not fatal)."""
    fname = os.path.basename(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(BOM):
        ds.problems.append(Problem("-", fname, "bom", "file starts with a UTF-8 BOM (ignored)", False))
        raw = raw[len(BOM):]
    if b"\r\n" in raw:
        ds.problems.append(Problem("-", fname, "crlf", "file has Windows line endings (handled)", False))
    out = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        text, enc = decode_bytes(line.rstrip(b"\r"))
        out.append((lineno, text, enc))
    if out and not out[-1][1]:
        out.pop()  # the empty string after the final newline is not a line
    return out


def bad_line(ds: Dataset, where: str, message: str) -> None:
    """A line that cannot name a sample: reported (not fatal to any sample) and skipped."""
    ds.problems.append(Problem("-", where, "bad_line", f"{message} (line skipped)", False))


class Samples:
    """Adds samples to a dataset with unique ids, as the `mvsa` reader does: an id listed again with the same
    content is a repaired duplicate (the line is ignored); with different content the first sample is
    ambiguous and marked invalid. `key` is what "the same content" compares (split, label, ...)."""

    def __init__(self, ds: Dataset):
        self.ds = ds
        self.seen: dict[str, tuple[Sample, tuple, str]] = {}

    def add(self, guid: str, split: str, where: str, key: tuple = ()) -> Sample | None:
        """A new sample (label -1, no text, no image yet), or None when `guid` was listed before."""
        if guid in self.seen:
            first, first_key, first_where = self.seen[guid]
            same = first.split == split and first_key == key
            msg = (f"id listed again (first at {first_where}); this line is ignored" if same else
                   f"id listed again with other content (first at {first_where}); the sample is ambiguous")
            self.ds.problems.append(Problem(guid, where, "duplicate", msg, not same))
            if not same:
                first.valid = False
            return None
        sample = Sample(guid, split, -1, "", "", "")
        self.seen[guid] = (sample, key, where)
        self.ds.samples.append(sample)
        return sample


def set_text(ds: Dataset, sample: Sample, raw: str, encoding: str | None) -> None:
    """The raw text and what the text backbone sees (cleaned when asked; the placeholder when empty)."""
    sample.raw_text = raw
    if encoding:
        sample.encoding = encoding
        ds.encodings[encoding] += 1
    sample.text, sample.empty_text = prepare_text(raw, ds.clean_text)
    ds.empty_texts += sample.empty_text


def read_text_file(ds: Dataset, sample: Sample, path: str, name: str) -> None:
    """A sample's text from its own file (MVSA's data/ID.txt); a missing file is fatal."""
    if not os.path.isfile(path):
        ds.add_problem(sample, name, "missing", "text file not found", True)
        set_text(ds, sample, "", None)
        return
    with open(path, "rb") as f:
        raw, enc = decode_bytes(f.read())
    set_text(ds, sample, raw, enc)


def set_image(ds: Dataset, sample: Sample, path: str, name: str) -> None:
    """The image path; a missing file is fatal here, anything wrong inside it is found when it is decoded."""
    sample.image_path = path
    if not path:
        ds.add_problem(sample, name, "missing", "the row names no image file", True)
    elif not os.path.isfile(path):
        ds.add_problem(sample, name, "missing", "image file not found", True)


def set_label(ds: Dataset, sample: Sample, value: str | None, where: str, names: dict[str, int]) -> None:
    """Label `value` through `names` (value -> class index). None: unlabelled (-1), which a train row must not
    be; a value not in `names` is fatal (`unknown_label`)."""
    if value is None:
        if sample.split == "train":
            ds.add_problem(sample, where, "no_label", "a training sample has no label", True)
        return
    if value not in names:
        ds.add_problem(sample, where, "unknown_label",
                       f"label {value!r} is not one of {', '.join(map(str, names))}", True)
        return
    sample.label = names[value]


# ----------------------------------------------------------------------------------------- MVSA's rules
def merge_mvsa(text_label: str, image_label: str) -> str | None:
    """One label per pair, the rule of MultiSentiNet and CLMLF: equal labels -> that label; neutral and
    positive/negative -> the positive/negative one; positive vs negative -> None (the pair is dropped)."""
    if text_label == image_label:
        return text_label
    if "neutral" in (text_label, image_label):
        return image_label if text_label == "neutral" else text_label
    return None


def majority(votes: list[str]) -> str | None:
    """The label at least 2 of the annotators gave, or None (MVSA-Multiple's per-modality rule)."""
    label, count = Counter(votes).most_common(1)[0]
    return label if count >= 2 else None


def label_result_fields(path: str) -> int:
    """Tab-separated fields on the first data line of labelResultAll.txt (2: MVSA-Single, 4: MVSA-Multiple),
    or 0. Reads at most two lines (the header and one pair), so detection stays cheap; the data line decides
    because a header may not repeat `text,image` per annotator."""
    try:
        with open(path, "rb") as f:
            lines = [f.readline(4096).decode("utf-8", errors="replace").lstrip("\ufeff").strip() for _ in range(2)]
    except OSError:
        return 0
    line = lines[1] if lines[0].split("\t")[0].lower() == "id" and lines[1] else lines[0]
    return len(line.split("\t")) if line else 0


def is_mvsa_layout(path: str) -> bool:
    """Today's `mvsa` layout (train.txt / test_without_label.txt beside data/): other readers leave it alone."""
    return os.path.isdir(os.path.join(path, "data")) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("train.txt", "test_without_label.txt"))


def read_mvsa_release(root: str, fmt: str, annotators: int, resolve, clean_text: bool,
                      limit: int | None, options: dict) -> Dataset:
    """Read a public MVSA release: labelResultAll.txt (a header line, then `ID<TAB>text,image` once per
    annotator) and data/ID.txt|jpg. `resolve(pairs)` turns the annotators' (text, image) labels into
    (label or None, problem kind, message); a pair it drops stays a row marked invalid, with that problem,
    so the summary counts every drop by rule. All labelled pairs are split 'train' (the release has no split).
    `limit` keeps the first N label lines (for tests); the releases take no options."""
    check_options(fmt, options, ())
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder {root!r} does not exist")
    path = os.path.join(root, "labelResultAll.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no labelResultAll.txt in {root!r}: the {fmt} layout is DIR/labelResultAll.txt "
                                "and DIR/data/ID.txt|jpg (or choose another reader with --format)")
    ds = new_dataset(fmt, root, clean_text, MVSA_CLASSES, ["labelResultAll.txt"])
    samples, n = Samples(ds), 0
    for lineno, line, _ in read_lines(path, ds):
        where = f"labelResultAll.txt:{lineno}"
        if not line.strip():
            continue
        fields = [f.strip() for f in (line.split("\t") if "\t" in line else line.split())]
        if lineno == 1 and fields[0].lower() == "id":
            continue  # the header: ID<TAB>text,image...
        pairs = [tuple(p.strip().lower() for p in f.split(",")) for f in fields[1:]]
        if len(fields) != 1 + annotators or not fields[0] or any(len(p) != 2 for p in pairs):
            shape = "<TAB>".join(["ID"] + ["text,image"] * annotators)
            bad_line(ds, where, f"expected '{shape}', got {line[:60]!r}")
            continue
        if limit is not None and n >= limit:
            break
        n += 1
        sample = samples.add(fields[0], "train", where, tuple(pairs))
        if sample is None:
            continue
        _mvsa_label(ds, sample, pairs, where, resolve)
        read_text_file(ds, sample, os.path.join(ds.root, "data", f"{sample.guid}.txt"), f"{sample.guid}.txt")
        set_image(ds, sample, os.path.join(ds.root, "data", f"{sample.guid}.jpg"), f"{sample.guid}.jpg")
    return ds


def _mvsa_label(ds: Dataset, sample: Sample, pairs: list[tuple[str, str]], where: str, resolve) -> None:
    unknown = sorted({v for p in pairs for v in p} - set(MVSA_CLASSES))
    if unknown:
        ds.add_problem(sample, where, "unknown_label", f"label {', '.join(map(repr, unknown))} is not one of "
                       f"{', '.join(MVSA_CLASSES)}", True)
        return
    label, kind, message = resolve(pairs)
    if label is None:
        ds.add_problem(sample, where, kind, f"{message}: the pair is dropped (kept as an invalid row)", True)
    else:
        sample.label = MVSA_CLASSES.index(label)
