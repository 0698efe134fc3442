"""`manifest`: anybody's image+text data as a table, one row per sample.

Layout: a `.csv` or `.jsonl` file, or a folder holding a Hugging Face imagefolder-style `metadata.csv` or
`metadata.jsonl`. Columns (each can be mapped with an option, e.g. `text_column="caption"`):

- id: `id`, else `guid` (option `id_column`); without one, the row number (1 = the first data row).
- text: `text` (`text_column`), the text itself.
- image: `image`, else `file_name` (`image_column`): one path, relative to the manifest's folder (or absolute).
  Several images per row (a JSON list, or `a.jpg;b.jpg`) are out of scope: reading stops with an error.
- label: `label` (`label_column`), optional: any strings or integers; empty or absent = unlabelled.
- split: `split` (`split_column`), optional, kept as written; default `train` for labelled rows and `test` for
  unlabelled ones. A row of split `train` without a label is invalid (`no_label`).

Class names come from the labels in the data, sorted: numerically when every label is an integer, else as
strings. Option `classes` (a list, or names separated by commas) fixes the names and their order instead; a
label outside it is then invalid (`unknown_label`).
"""
from __future__ import annotations

import csv
import json
import os
import re

from ..errors import ConfigError
from .base import READERS, Dataset, DatasetReader
from .common import Samples, bad_line, check_options, new_dataset, read_lines, set_image, set_label, set_text

FORMAT = "manifest"
LAYOUT = ("FILE.csv | FILE.jsonl | DIR/metadata.csv|jsonl: one row per sample with columns id|guid (optional), "
          "text, image|file_name (relative to the file's folder), label (optional), split (optional)")
OPTIONS = ("id_column", "text_column", "image_column", "label_column", "split_column", "classes")
EXTENSIONS = (".csv", ".jsonl")
_INT = re.compile(r"^[+-]?\d+$")


def manifest_files(path: str) -> list[str]:
    """The manifest(s) PATH stands for: itself (a .csv / .jsonl file) or the folder's metadata.csv|jsonl."""
    if os.path.isfile(path):
        return [path] if path.lower().endswith(EXTENSIONS) else []
    candidates = [os.path.join(path, f"metadata{e}") for e in EXTENSIONS]
    return [c for c in candidates if os.path.isfile(c)]


def detect(path: str) -> bool:
    """A .csv or .jsonl file, or a folder holding metadata.csv or metadata.jsonl."""
    return bool(manifest_files(path))


def _csv_rows(path: str, ds: Dataset) -> tuple[list[str], list[tuple[str, dict, str]]]:
    """Header and (where, row, encoding) of a CSV file; quoted fields may span lines."""
    fname, lines = os.path.basename(path), read_lines(path, ds)
    reader = csv.reader(line + "\n" for _, line, _ in lines)
    header, rows, done = None, [], 0
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            bad_line(ds, f"{fname}:{reader.line_num}", f"CSV error: {e}; the rest of the file is not read")
            break
        first, done = done + 1, reader.line_num
        if not any(v.strip() for v in values):
            continue
        if header is None:
            header = [v.strip() for v in values]
            continue
        where = f"{fname}:{first}"
        if len(values) != len(header):
            bad_line(ds, where, f"expected {len(header)} columns as the header has, got {len(values)}")
            continue
        encs = [enc for _, _, enc in lines[first - 1:done] if enc != "utf-8"]
        rows.append((where, dict(zip(header, values)), encs[0] if encs else "utf-8"))
    return header or [], rows


def _jsonl_rows(path: str, ds: Dataset) -> tuple[list[str], list[tuple[str, dict, str]]]:
    """Keys (in order of first appearance) and (where, row, encoding) of a JSON-lines file."""
    fname, columns, rows = os.path.basename(path), {}, []
    for lineno, line, enc in read_lines(path, ds):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            bad_line(ds, f"{fname}:{lineno}", f"not valid JSON ({e.msg}): {line[:60]!r}")
            continue
        if not isinstance(obj, dict):
            bad_line(ds, f"{fname}:{lineno}", f"expected a JSON object, got {line[:60]!r}")
            continue
        columns.update(dict.fromkeys(obj))
        rows.append((f"{fname}:{lineno}", obj, enc))
    return list(columns), rows


def _column(columns: list[str], given: str | None, defaults: tuple[str, ...], option: str, required: bool,
            fname: str) -> str | None:
    """The column to read: the option's value, which must exist, or the first default present."""
    if given is not None:
        if given not in columns:
            raise ConfigError(f"column {given!r} ({option}) is not in {fname}; its columns are {columns}")
        return given
    found = next((c for c in defaults if c in columns), None)
    if found is None and required:
        raise ConfigError(f"{fname} has no {' or '.join(map(repr, defaults))} column (its columns are {columns}); "
                         f"name the column to use with --{option.replace('_', '-')} (option {option})")
    return found


def scalar(value) -> str | None:
    """A cell as a string: None / "" -> None; JSON 3 or 3.0 -> "3"; a list or object stays JSON text."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value.strip() if isinstance(value, str) else json.dumps(value)


def class_names(labels: list[str], given=None) -> tuple[str, ...]:
    """`given` (a list or comma-separated names) in its order, else the labels sorted (numerically if all ints)."""
    if given is not None:
        names = [n.strip() for n in (given.split(",") if isinstance(given, str) else map(str, given))]
        if not all(names) or len(set(names)) != len(names):
            raise ConfigError(f"classes={given!r}: give distinct, non-empty class names, separated by commas")
        return tuple(names)
    found = set(labels)
    if found and all(_INT.match(n) for n in found):
        return tuple(sorted(found, key=int))
    return tuple(sorted(found))


def image_value(value, root: str, where: str) -> str | None:
    """The row's one image path ("" when empty), None when the cell is not a path at all. Several images
    (a list, or paths joined by ';' that are not one existing file) stop the reading: out of scope."""
    if isinstance(value, list):
        if len(value) > 1:
            _several_images(where, json.dumps(value))
        value = value[0] if value else None
    if value is None:
        return ""
    if not isinstance(value, str):
        return None
    value = value.strip()
    if ";" in value and not os.path.exists(os.path.join(root, value)) and \
            len([p for p in value.split(";") if p.strip()]) > 1:
        _several_images(where, value)
    return value


def _several_images(where: str, value: str) -> None:
    raise ConfigError(f"{where} names several images ({value[:80]}): several images per sample are out of scope "
                     "for the manifest reader, which reads one image and one text per row; write one row per "
                     "image (repeating the text, each with its own id) or keep the one image that matters")


def read(path: str, clean_text: bool = False, limit: int | None = None, **options) -> Dataset:
    """Read a manifest (csv / jsonl file, or a folder with metadata.csv|jsonl). `limit`: the first N rows."""
    opts = check_options(FORMAT, options, OPTIONS)
    if not os.path.exists(path):
        raise FileNotFoundError(f"manifest {path!r} does not exist")
    files = manifest_files(path)
    if not files:
        raise FileNotFoundError(f"{path!r} is not a manifest: the {FORMAT} layout is {LAYOUT}")
    if len(files) > 1:
        raise ConfigError(f"{path!r} holds both metadata.csv and metadata.jsonl; pass the one to read as the path")
    file = os.path.abspath(files[0])
    fname = os.path.basename(file)
    ds = new_dataset(FORMAT, os.path.dirname(file), clean_text, (), [fname])
    columns, rows = (_jsonl_rows if fname.lower().endswith(".jsonl") else _csv_rows)(file, ds)
    rows = rows[:limit] if limit is not None else rows
    cols = {role: _column(columns, opts.get(f"{role}_column"), defaults, f"{role}_column", required, fname)
            for role, defaults, required in (("id", ("id", "guid"), False), ("text", ("text",), True),
                                             ("image", ("image", "file_name"), True),
                                             ("label", ("label",), False), ("split", ("split",), False))}
    raw_labels = [row.get(cols["label"]) if cols["label"] else None for _, row, _ in rows]
    labels = [scalar(v) for v in raw_labels]
    ds.classes = class_names([lab for lab, v in zip(labels, raw_labels) if lab is not None and
                              not isinstance(v, (dict, list))], opts.get("classes"))
    names = {n: i for i, n in enumerate(ds.classes)}
    samples = Samples(ds)
    for k, ((where, row, enc), label, raw) in enumerate(zip(rows, labels, raw_labels), start=1):
        _row(ds, samples, str(k), where, row, enc, label, raw, cols, names)
    return ds


def _row(ds: Dataset, samples: Samples, number: str, where: str, row: dict, encoding: str, label: str | None,
         raw_label, cols: dict, names: dict) -> None:
    guid = scalar(row.get(cols["id"])) if cols["id"] else number
    if guid is None:
        bad_line(ds, where, f"the row has no {cols['id']!r}")
        return
    image = image_value(row.get(cols["image"]), ds.root, where)
    split = (scalar(row.get(cols["split"])) if cols["split"] else None) or ("train" if label is not None else "test")
    text = row.get(cols["text"])
    sample = samples.add(guid, split, where, (label, image, json.dumps(text, default=str)))
    if sample is None:
        return
    if isinstance(raw_label, (dict, list)):
        ds.add_problem(sample, where, "unknown_label", f"label {label[:60]} is not a string or a number", True)
    else:
        set_label(ds, sample, label, where, names)
    if text is None or isinstance(text, (dict, list)):
        ds.add_problem(sample, where, "missing", f"the row has no text in {cols['text']!r}", True)
        set_text(ds, sample, "", None)
    else:
        set_text(ds, sample, str(text), encoding)
    if image is None:
        ds.add_problem(sample, where, "missing", f"{cols['image']!r} is not a path", True)
    else:
        set_image(ds, sample, os.path.join(ds.root, image) if image else "", image or where)


@READERS.register(FORMAT)
class Manifest(DatasetReader):
    __doc__ = __doc__
    classes, layout, options = (), LAYOUT, OPTIONS
    detect, read = staticmethod(detect), staticmethod(read)
