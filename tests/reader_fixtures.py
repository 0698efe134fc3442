"""Builders for small datasets in every reader's layout (written by the tests into tmp_path, never committed):
raw MVSA releases, Twitter-2015/2017 tsv folders, Hateful Memes folders and manifests. Images are the synthetic
JPEG/PNG bytes of mvsa_fixtures; a value of None for a text or image means "do not write that file"."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from mvsa_fixtures import jpeg_bytes, png_bytes


def write_release(root, rows: list[str], texts: dict | None = None, images: dict | None = None,
                  header: str | None = "ID\ttext,image", raw: bytes | None = None) -> Path:
    """An MVSA release: labelResultAll.txt (`header`, then `rows` verbatim) and data/ID.txt|jpg for the id
    (first field) of every row. texts / images: {id: bytes or None} overriding the defaults."""
    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    lines = ([header] if header else []) + rows
    (root / "labelResultAll.txt").write_bytes(raw if raw is not None else ("\n".join(lines) + "\n").encode())
    texts, images = texts or {}, images or {}
    for k, row in enumerate(rows):
        guid = row.split("\t")[0].strip()
        if not guid or (root / "data" / f"{guid}.txt").exists():
            continue
        text = texts.get(guid, f"post {guid}: what a day".encode())
        image = images.get(guid, jpeg_bytes(k))
        if text is not None:
            (root / "data" / f"{guid}.txt").write_bytes(text)
        if image is not None:
            (root / "data" / f"{guid}.jpg").write_bytes(image)
    return root


def tw_row(index, label, image, sentence, target) -> str:
    return "\t".join(map(str, (index, label, image, sentence, target)))


def write_twitter(root, files: dict[str, list[str]], images: dict[str, bytes | None] | None = None,
                  image_dir: str | None = "twitter2015_images", headers: dict | None = None) -> Path:
    """DIR/{split}.tsv with a TomBERT-style header (per file, as `headers` says; None: no header) and the
    images {name: bytes} in DIR/../`image_dir` (TomBERT keeps them outside the tsv folder)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    headers = headers or {}
    for split, rows in files.items():
        header = headers.get(split, "index\t#1 Label\t#2 ImageID\t#1 String\t#2 String")
        (root / f"{split}.tsv").write_text("\n".join(([header] if header else []) + rows) + "\n", encoding="utf-8")
    if image_dir:
        folder = root.parent / image_dir
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in (images or {}).items():
            if data is not None:
                (folder / name).write_bytes(data)
    return root


def write_memes(root, files: dict[str, list], images: dict[str, bytes | None] | None = None) -> Path:
    """DIR/{name} as JSON lines (a dict is dumped, a str written verbatim) and DIR/{img path} images."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
        (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    for rel, data in (images or {}).items():
        if data is not None:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
    return root


def meme(id_, img, text="a meme", label=None) -> dict:
    row = {"id": id_, "img": img, "text": text}
    if label is not None:
        row["label"] = label
    return row


def write_csv(path, header: list[str], rows: list[list], images: dict[str, bytes] | None = None) -> Path:
    """A CSV manifest and its images {path relative to the manifest's folder: bytes}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    _images(path.parent, images)
    return path


def write_jsonl(path, rows: list, images: dict[str, bytes] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    _images(path.parent, images)
    return path


def _images(folder: Path, images: dict | None) -> None:
    for rel, data in (images or {}).items():
        if data is not None:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)


def images_for(names, png: bool = False) -> dict[str, bytes]:
    return {n: (png_bytes(k) if png else jpeg_bytes(k)) for k, n in enumerate(names)}


def problems(ds) -> set[tuple[str, str, str, bool]]:
    """(guid, kind, file, fatal) of every problem, for exact comparisons."""
    return {(p.guid, p.kind, p.file, p.fatal) for p in ds.problems}


def by_guid(ds) -> dict:
    return {s.guid: s for s in ds.samples}
