"""`hateful-memes`: Facebook's Hateful Memes (Kiela et al., NeurIPS 2020), phase 1 and phase 2 files.

Layout: DIR/train.jsonl, DIR/dev*.jsonl, DIR/test*.jsonl, one JSON object per line with `id`, `img` (the image
path relative to DIR, e.g. `img/08291.png`), `text` and `label` (0 = not hateful, 1 = hateful; absent in
unlabelled test files), and the images under DIR.

- Images are resolved from `img`, never from `id` (ids are not zero-padded: id 8291 is img/08291.png).
- Splits are the file stems: train, dev, test (phase 1), dev_seen, dev_unseen, test_seen, test_unseen
  (phase 2). Each file keeps its own split, never merged: they are separate evaluation sets.
- Ids: the `id` value. An id found in several files (phase 2's dev_seen and dev_unseen share memes; phase 1's
  dev.jsonl repeats dev_seen.jsonl) becomes `{split}/{id}` in each of them, so the rows stay apart;
  an id listed twice in one file is a duplicate problem.
Classes: not-hateful, hateful (label 0, 1).
"""
from __future__ import annotations

import json
import os
from collections import Counter

from .base import READERS, Dataset, DatasetReader
from .common import Samples, bad_line, check_options, new_dataset, read_lines, set_image, set_label, set_text

FORMAT = "hateful-memes"
LAYOUT = ("DIR/train.jsonl, dev*.jsonl, test*.jsonl ({\"id\", \"img\", \"text\", \"label\": 0|1}) "
          "+ the images at DIR/{img}")
CLASSES = ("not-hateful", "hateful")
LABEL_NAMES = {"0": 0, "1": 1}


def label_files(path: str) -> list[str]:
    """train.jsonl, then dev*.jsonl, then test*.jsonl in DIR (sorted within each group)."""
    names = sorted(os.listdir(path)) if os.path.isdir(path) else []
    return [n for group in ("train", "dev", "test") for n in names
            if n.endswith(".jsonl") and (n == "train.jsonl" if group == "train" else n.startswith(group))
            and os.path.isfile(os.path.join(path, n))]


def detect(path: str) -> bool:
    """A folder holding train.jsonl, dev*.jsonl or test*.jsonl and no manifest's metadata.csv|jsonl."""
    return (bool(label_files(path)) and not any(os.path.exists(os.path.join(path, f"metadata.{e}"))
                                                for e in ("csv", "jsonl")))


def _rows(path: str, fname: str, ds: Dataset, limit: int | None) -> list[tuple[str, str, dict, str]]:
    """(where, id, object, encoding) of the JSON lines of one file; malformed lines are reported and skipped."""
    rows = []
    for lineno, line, enc in read_lines(os.path.join(path, fname), ds):
        where = f"{fname}:{lineno}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            bad_line(ds, where, f"not valid JSON ({e.msg}): {line[:60]!r}")
            continue
        if not isinstance(obj, dict) or obj.get("id") in (None, "") or isinstance(obj.get("id"), (dict, list)):
            bad_line(ds, where, f"expected a JSON object with an 'id', got {line[:60]!r}")
            continue
        if limit is not None and len(rows) >= limit:
            break
        rows.append((where, str(obj["id"]).strip(), obj, enc))
    return rows


def label_value(value) -> str | None:
    """The label as LABEL_NAMES spells it: 0, 1, "0", "1" or 1.0 -> "0" / "1"; None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value.strip() if isinstance(value, str) else json.dumps(value)


def read(path: str, clean_text: bool = False, limit: int | None = None, **options) -> Dataset:
    """Read a Hateful Memes folder. `limit` keeps the first N rows of each jsonl file (for tests)."""
    check_options(FORMAT, options, ())
    if not os.path.isdir(path):
        raise FileNotFoundError(f"dataset folder {path!r} does not exist")
    files = label_files(path)
    if not files:
        raise FileNotFoundError(f"no train.jsonl, dev*.jsonl or test*.jsonl in {path!r}: the {FORMAT} layout "
                                f"is {LAYOUT}")
    ds = new_dataset(FORMAT, path, clean_text, CLASSES, files)
    rows = {f: _rows(path, f, ds, limit) for f in files}
    n_files = Counter(i for f in files for i in {i for _, i, _, _ in rows[f]})
    samples = Samples(ds)
    for fname in files:
        split = fname[: -len(".jsonl")]
        for where, id_, obj, enc in rows[fname]:
            guid = f"{split}/{id_}" if n_files[id_] > 1 else id_
            key = json.dumps([obj.get("img"), obj.get("text"), obj.get("label")], sort_keys=True, default=str)
            sample = samples.add(guid, split, where, (key,))
            if sample is not None:
                _fill(ds, sample, obj, where, enc)
    return ds


def _fill(ds: Dataset, sample, obj: dict, where: str, encoding: str) -> None:
    set_label(ds, sample, label_value(obj.get("label")), where, LABEL_NAMES)
    text = obj.get("text")
    if text is None or isinstance(text, (dict, list)):
        ds.add_problem(sample, where, "missing", "the row has no 'text' (a string)", True)
        set_text(ds, sample, "", None)
    else:
        set_text(ds, sample, str(text), encoding)
    img = obj.get("img")
    if img is not None and not isinstance(img, str):
        ds.add_problem(sample, where, "missing", f"'img' is not a path: {json.dumps(img)[:60]}", True)
    else:
        set_image(ds, sample, os.path.join(ds.root, img) if img else "", img or where)


@READERS.register(FORMAT)
class HatefulMemes(DatasetReader):
    __doc__ = __doc__
    classes, layout, options = CLASSES, LAYOUT, ()
    detect, read = staticmethod(detect), staticmethod(read)
