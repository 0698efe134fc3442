"""Write the MVSA-Single copy in `mvsa` layout (../shared/mvsa, read in place) in two other layouts, so that
extracting each can be compared with extracting the original (same guids, labels, texts and images):

    .venv/bin/python examples/convert_mvsa.py OUTPUT [--data ../shared/mvsa] [--limit N] [--copy]

- OUTPUT/manifest/metadata.csv: columns id, text, image, label, split (`manifest` format). The text is the
  decoded text of data/GUID.txt, written as UTF-8; labels are the tags (empty for the unlabelled test rows).
- OUTPUT/mvsa-single/labelResultAll.txt + data/: a raw MVSA-Single release (`mvsa-single` format). The
  release has one annotator's text and image label per pair; each pair's tag is written as both, so the
  merge rule gives the tag back. It holds the labelled (train) rows only: the release has no unlabelled pairs.

Images (and the release's text files) are symbolic links to the originals, or copies with --copy. OUTPUT must
lie outside the repository: the data is not ours to commit.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from featcache.sources import read_dataset  # noqa: E402  (the repo is put on the path first)

DEFAULT_DATA = REPO.parent / "shared" / "mvsa"


def _link(src: str, dst: Path, copy: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    if copy:
        shutil.copyfile(src, dst)
    else:
        dst.symlink_to(os.path.abspath(src))


def write_manifest(ds, out: Path, copy: bool) -> Path:
    """OUTPUT/manifest/metadata.csv with images/GUID.jpg beside it."""
    path = out / "manifest" / "metadata.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "text", "image", "label", "split"])
        for s in ds.samples:
            image = f"images/{s.guid}.jpg"
            _link(s.image_path, path.parent / image, copy)
            w.writerow([s.guid, s.raw_text, image, ds.classes[s.label] if s.label >= 0 else "", s.split])
    return path


def write_release(ds, out: Path, copy: bool) -> Path:
    """OUTPUT/mvsa-single/labelResultAll.txt (tag as text and image label) and data/GUID.txt|jpg."""
    root = out / "mvsa-single"
    (root / "data").mkdir(parents=True, exist_ok=True)
    lines = ["ID\ttext,image"]
    for s in ds.samples:
        if s.label < 0:
            continue  # an unlabelled pair cannot be written in the release's format
        tag = ds.classes[s.label]
        lines.append(f"{s.guid}\t{tag},{tag}")
        for ext in ("txt", "jpg"):
            _link(os.path.join(ds.root, "data", f"{s.guid}.{ext}"), root / "data" / f"{s.guid}.{ext}", copy)
    (root / "labelResultAll.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output", type=Path, help="folder to write manifest/ and mvsa-single/ into")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the mvsa-layout dataset (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="first N rows of each label file only")
    p.add_argument("--copy", action="store_true", help="copy the files instead of linking them")
    args = p.parse_args(argv)
    out = args.output.resolve()
    if out == REPO or REPO in out.parents:
        p.error(f"{out} is inside the repository; write the converted data elsewhere")
    ds = read_dataset("mvsa", str(args.data), limit=args.limit)
    bad = [s.guid for s in ds.samples if not s.valid]
    if bad:  # an invalid sample (missing file, ...) cannot be written the same way in the other layouts
        print(f"skipping {len(bad)} invalid sample(s): {', '.join(bad[:10])}", file=sys.stderr)
        ds.samples = [s for s in ds.samples if s.valid]
    manifest, release = write_manifest(ds, out, args.copy), write_release(ds, out, args.copy)
    print(f"{len(ds.samples)} samples -> {manifest} (format manifest)")
    print(f"{sum(s.label >= 0 for s in ds.samples)} labelled samples -> {release} (format mvsa-single)")


if __name__ == "__main__":
    main()
