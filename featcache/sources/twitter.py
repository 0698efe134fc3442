"""`twitter`: Twitter-2015 and Twitter-2017 for target-oriented sentiment, as TomBERT released them
(Yu & Jiang, IJCAI 2019: absa_data/twitter2015, absa_data/twitter = 2017).

Layout: DIR/train.tsv, DIR/dev.tsv, DIR/test.tsv (any of them; splits train / dev / test), tab-separated, read
by POSITION because the header lines differ between files: index, label (0/1/2 = negative/neutral/positive),
image file name, the sentence with the target masked as `$T$`, the target. Line 1 is a header when its label
column is not an integer. One tweet with several targets is several rows (the same image, the same sentence,
another target and label); each row is a sample.

- Text: the sentence with `$T$` replaced by the target; the target is kept in `Sample.target` as well (the
  label belongs to the target, so a text backbone can take it as the second segment).
- Ids: `{split}-{index}` (e.g. `dev-13`): the index column restarts in every file, so the file's split keeps
  the ids unique. An index listed twice in one file is a duplicate problem.
- Images: the folder given as `images=DIR` (`--images`), else the first of these that holds the images of the
  first rows, looked for in DIR, DIR/.. and DIR/../..: twitter2015_images, twitter2017_images,
  IJCAI2019_data/twitter2015_images, IJCAI2019_data/twitter2017_images (TomBERT's own layout), images.
  Rows sharing an image share its path.
Classes: negative, neutral, positive.
"""
from __future__ import annotations

import os

from .base import READERS, Dataset, DatasetReader
from .common import (MVSA_CLASSES, Samples, bad_line, check_options, new_dataset, read_lines, set_image,
                     set_label, set_text)

FORMAT = "twitter"
LAYOUT = ("DIR/{train,dev,test}.tsv (index<TAB>label 0|1|2<TAB>image<TAB>sentence with $T$<TAB>target) + "
          "images (images=DIR, or twitter2015_images / twitter2017_images beside or above DIR)")
SPLITS = ("train", "dev", "test")
IMAGE_FOLDERS = ("twitter2015_images", "twitter2017_images", "IJCAI2019_data/twitter2015_images",
                 "IJCAI2019_data/twitter2017_images", "images")
LABEL_NAMES = {"0": 0, "1": 1, "2": 2}  # the release's labels, in MVSA_CLASSES order
MARK = "$T$"


def detect(path: str) -> bool:
    """A folder holding train.tsv, dev.tsv or test.tsv."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f"{s}.tsv")) for s in SPLITS)


def _rows(path: str, split: str, ds: Dataset, limit: int | None) -> list[tuple[str, int, list[str], str]]:
    """(where, line number, 5 fields, encoding) of one tsv file; malformed lines are reported and skipped."""
    rows = []
    for lineno, line, enc in read_lines(os.path.join(path, f"{split}.tsv"), ds):
        where = f"{split}.tsv:{lineno}"
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("\t")]
        if lineno == 1 and (len(fields) < 2 or not fields[1].lstrip("-").isdigit()):
            continue  # the header, whatever its words
        if len(fields) != 5 or not fields[0]:
            bad_line(ds, where, f"expected 5 tab-separated columns (index, label, image, sentence, target), "
                                f"got {len(fields)}: {line[:60]!r}")
            continue
        if limit is not None and len(rows) >= limit:
            break
        rows.append((where, lineno, fields, enc))
    return rows


def image_folder(root: str, names: list[str]) -> str:
    """The folder beside or above `root` that holds the most of `names` (the first rows' images)."""
    bases = [root, os.path.dirname(root), os.path.dirname(os.path.dirname(root))]
    candidates = list(dict.fromkeys(os.path.join(b, f) for b in bases for f in IMAGE_FOLDERS))
    found = [c for c in candidates if os.path.isdir(c)]
    if found and names:
        hits = [sum(os.path.isfile(os.path.join(c, n)) for n in names) for c in found]
        if max(hits) > 0:
            return found[hits.index(max(hits))]
    elif found:
        return found[0]
    raise FileNotFoundError(f"no image folder for {root!r}: looked in it, its parent and grandparent for a folder "
                            f"({', '.join(IMAGE_FOLDERS)}) holding the first rows' images ({', '.join(names[:3])}); "
                            "pass the image folder with --images DIR (option images=DIR)")


def read(path: str, clean_text: bool = False, limit: int | None = None, **options) -> Dataset:
    """Read a Twitter-2015/2017 folder. `limit` keeps the first N rows of each tsv file (for tests)."""
    opts = check_options(FORMAT, options, ("images",))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"dataset folder {path!r} does not exist")
    splits = [s for s in SPLITS if os.path.isfile(os.path.join(path, f"{s}.tsv"))]
    if not splits:
        raise FileNotFoundError(f"no train.tsv, dev.tsv or test.tsv in {path!r}: the {FORMAT} layout is {LAYOUT}")
    ds = new_dataset(FORMAT, path, clean_text, MVSA_CLASSES, [f"{s}.tsv" for s in splits])
    rows = {s: _rows(path, s, ds, limit) for s in splits}
    if opts.get("images"):
        images = os.path.abspath(opts["images"])
        if not os.path.isdir(images):
            raise FileNotFoundError(f"image folder {opts['images']!r} (images=) does not exist")
    else:
        images = image_folder(ds.root, [f[2] for s in splits for _, _, f, _ in rows[s][:20] if f[2]][:20])
    samples = Samples(ds)
    for split in splits:
        for where, _, (index, label, image, sentence, target), enc in rows[split]:
            sample = samples.add(f"{split}-{index}", split, where, (label, image, sentence, target))
            if sample is None:
                continue
            set_label(ds, sample, label or None, where, LABEL_NAMES)
            _set_target_text(ds, sample, sentence, target, enc, where)
            set_image(ds, sample, os.path.join(images, image) if image else "", image or where)
    return ds


def _set_target_text(ds: Dataset, sample, sentence: str, target: str, encoding: str, where: str) -> None:
    sample.target = target
    if not target:
        ds.add_problem(sample, where, "bad_target", "the row has no target (the label belongs to one)", True)
    if MARK not in sentence:
        ds.add_problem(sample, where, "bad_target", f"the sentence has no {MARK} marker (used as it is)", False)
    set_text(ds, sample, sentence.replace(MARK, target), encoding)


@READERS.register(FORMAT)
class Twitter(DatasetReader):
    __doc__ = __doc__
    classes, layout, options = MVSA_CLASSES, LAYOUT, ("images",)
    detect, read = staticmethod(detect), staticmethod(read)
