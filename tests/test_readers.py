"""The dataset readers of featcache/sources: auto-detection, MVSA's label-merge and drop rules (each with a
hand-made case), split and class names, Twitter's $T$ targets and shared images, Hateful Memes' image paths and
phase-2 splits, manifests (csv, jsonl, metadata folder, column options, the multi-image error), and every
kind of bad input per reader: a named problem (id + file:line), the sample kept as an invalid row or repaired,
nothing good lost. The converter example gives the same samples as the mvsa reader."""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest

from featcache.sources import READERS, detect_format, hateful_memes, mvsa_multiple, mvsa_single, read_dataset, table, \
    twitter
from featcache.sources.base import note_image_problems, scan_images
from featcache.sources.common import MVSA_CLASSES as LABELS
from featcache.sources.common import majority, merge_mvsa
from featcache.sources.images import ImageNote
from featcache.sources.text import EMPTY_TEXT
from mvsa_fixtures import good_row, make_dataset, png_bytes, require_mvsa
from reader_fixtures import (by_guid, images_for, meme, problems, tw_row, write_csv, write_jsonl, write_memes,
                             write_release, write_twitter)

GBK_TEXT = "中文推文……好"  # saved as GB18030: must decode as today's reader does


# ----------------------------------------------------------------------------------------- detection
def _one_of_each(tmp_path) -> dict[str, str]:
    """A tiny dataset per format: {expected format: path}."""
    paths = {
        "mvsa": make_dataset(tmp_path / "mvsa", [good_row("1", 0), good_row("2", 1, split="test")]),
        "mvsa-single": write_release(tmp_path / "single", ["1\tpositive,neutral"]),
        "mvsa-multiple": write_release(tmp_path / "multi", ["7\tpositive,neutral\tpositive,positive\tneutral,neutral"],
                                       header="ID\ttext,image\ttext,image\ttext,image"),
        "twitter": write_twitter(tmp_path / "absa" / "twitter2015", {"train": [tw_row(0, 2, "1.jpg", "$T$ wins", "A")]},
                                 images_for(["1.jpg"])),
        "hateful-memes": write_memes(tmp_path / "hm", {"train.jsonl": [meme(1, "img/01.png", label=0)]},
                                     images_for(["img/01.png"], png=True)),
        "manifest": write_csv(tmp_path / "m" / "data.csv", ["text", "image"], [["hi", "a.jpg"]], images_for(["a.jpg"])),
    }
    write_jsonl(tmp_path / "folder" / "metadata.jsonl", [{"text": "hi", "file_name": "a.jpg"}], images_for(["a.jpg"]))
    paths["manifest-folder"] = tmp_path / "folder"
    return {k: str(v) for k, v in paths.items()}


def test_auto_detection_names_each_format(tmp_path):
    for fmt, path in _one_of_each(tmp_path).items():
        assert detect_format(path) == fmt.replace("-folder", ""), path
    # Today's layout stays `mvsa` even beside a labelResultAll.txt (a derived copy that kept the original file).
    mixed = make_dataset(tmp_path / "mixed", [good_row("1", 0)])
    write_release(mixed, ["1\tpositive,positive"])
    assert detect_format(str(mixed)) == "mvsa"
    # TomBERT's folders hold train.txt next to train.tsv, but no data/: that is Twitter, not mvsa.
    tw = tmp_path / "absa" / "twitter2015"
    (tw / "train.txt").write_text("$T$ wins\nA\n1\n1.jpg\n")
    assert detect_format(str(tw)) == "twitter"


def test_detection_error_lists_every_layout_and_names_format(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(FileNotFoundError) as e:
        detect_format(str(tmp_path))
    for name, r in READERS.items():
        assert name in str(e.value) and r.layout in str(e.value)
    assert "--format" in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_format(str(tmp_path / "nowhere"))
    both = write_release(tmp_path / "both", ["1\tpositive,positive"])
    write_twitter(both, {"train": [tw_row(0, 2, "1.jpg", "$T$", "A")]})
    with pytest.raises(ValueError, match="several dataset formats.*--format"):
        detect_format(str(both))


def test_unknown_option_is_an_error(tmp_path):
    paths = _one_of_each(tmp_path)
    with pytest.raises(ValueError, match="no option 'images'.*--format"):
        hateful_memes.read(paths["hateful-memes"], images="/somewhere")
    assert len(hateful_memes.read(paths["hateful-memes"], images=None).samples) == 1  # unset options are fine
    with pytest.raises(ValueError, match="no option 'images'.*--format"):
        read_dataset("auto", paths["hateful-memes"], images="/somewhere")  # the registry's path checks it too
    for name, r in READERS.items():  # every reader reads its own tiny dataset, through the registry
        assert r().read(paths[name]).samples and read_dataset(name, paths[name]).format == name


# ----------------------------------------------------------------------------------------- MVSA rules
@pytest.mark.parametrize("text, image, merged", [
    ("positive", "positive", "positive"), ("neutral", "neutral", "neutral"), ("negative", "negative", "negative"),
    ("neutral", "positive", "positive"), ("positive", "neutral", "positive"),
    ("neutral", "negative", "negative"), ("negative", "neutral", "negative"),
    ("positive", "negative", None), ("negative", "positive", None)])
def test_merge_rule(text, image, merged):
    assert merge_mvsa(text, image) == merged


def test_majority_rule():
    assert majority(["positive", "positive", "negative"]) == "positive"
    assert majority(["neutral", "neutral", "neutral"]) == "neutral"
    assert majority(["positive", "neutral", "negative"]) is None


def test_mvsa_single_merge_and_drop(tmp_path):
    root = write_release(tmp_path / "s", ["3\tpositive,positive", "10\tneutral,negative", "11\tpositive,neutral",
                                          "42\tpositive,negative", "57\tnegative,positive"])
    ds = mvsa_single.read(str(root))
    s = by_guid(ds)
    assert ds.classes == LABELS == ("negative", "neutral", "positive")
    assert [g for g in s] == ["3", "10", "11", "42", "57"]  # file order; ids need not be contiguous
    assert {g: (ds.classes[x.label] if x.label >= 0 else None) for g, x in s.items()} == \
        {"3": "positive", "10": "negative", "11": "positive", "42": None, "57": None}
    assert {x.split for x in ds.samples} == {"train"}
    # Dropped pairs stay as invalid rows with a counted `label_conflict` problem naming the line.
    assert [g for g, x in s.items() if not x.valid] == ["42", "57"]
    assert problems(ds) == {("42", "label_conflict", "labelResultAll.txt:5", True),
                            ("57", "label_conflict", "labelResultAll.txt:6", True)}
    assert "positive vs image label negative" in str(ds.problems[0]) and "dropped" in str(ds.problems[0])
    assert s["3"].raw_text == "post 3: what a day" and s["3"].image_path == os.path.join(ds.root, "data", "3.jpg")
    assert ds.index_files == ("labelResultAll.txt",)


def test_mvsa_multiple_majority_then_merge(tmp_path):
    rows = ["2\tpositive,neutral\tpositive,neutral\tnegative,positive",   # text pos (2/3), image neu -> positive
            "5\tneutral,negative\tneutral,negative\tneutral,positive",    # neutral + negative -> negative
            "9\tpositive,neutral\tneutral,neutral\tnegative,neutral",     # text: no 2 of 3 -> no_majority
            "14\tneutral,positive\tneutral,negative\tneutral,neutral",    # image: no 2 of 3 -> no_majority
            "20\tpositive,negative\tpositive,negative\tneutral,neutral"]  # positive vs negative -> label_conflict
    ds = mvsa_multiple.read(str(write_release(tmp_path / "m", rows, header="ID\ttext,image\ttext,image\ttext,image")))
    s = by_guid(ds)
    assert {g: x.label for g, x in s.items()} == {"2": 2, "5": 0, "9": -1, "14": -1, "20": -1}
    assert {g: x.valid for g, x in s.items()} == {"2": True, "5": True, "9": False, "14": False, "20": False}
    assert problems(ds) == {("9", "no_majority", "labelResultAll.txt:4", True),
                            ("14", "no_majority", "labelResultAll.txt:5", True),
                            ("20", "label_conflict", "labelResultAll.txt:6", True)}
    assert "text label" in str(ds.problems[0]) and "image label" in str(ds.problems[1])
    assert Counter(p.kind for p in ds.problems) == {"no_majority": 2, "label_conflict": 1}


def test_mvsa_release_bad_input(tmp_path):
    rows = ["1\tpositive,positive", "2\tneutral,neutral", "3\tnegative,negative", "4\thappy,neutral",
            "5\tpositive,positive", "5\tpositive,positive", "6\tneutral,neutral", "6\tnegative,negative",
            "7\tpositive", "\tneutral,neutral", "8\tneutral,neutral", "9\tpositive,positive"]
    texts = {"2": None, "8": b"", "9": GBK_TEXT.encode("gb18030")}
    raw = ("\r\n".join(["ID\ttext,image"] + rows) + "\r\n").encode()
    root = write_release(tmp_path / "bad", rows, texts=texts, images={"3": None}, raw=b"\xef\xbb\xbf" + raw)
    ds = mvsa_single.read(str(root))
    s = by_guid(ds)
    assert problems(ds) == {
        ("-", "bom", "labelResultAll.txt", False), ("-", "crlf", "labelResultAll.txt", False),
        ("2", "missing", "2.txt", True), ("3", "missing", "3.jpg", True),
        ("4", "unknown_label", "labelResultAll.txt:5", True),
        ("5", "duplicate", "labelResultAll.txt:7", False), ("6", "duplicate", "labelResultAll.txt:9", True),
        ("-", "bad_line", "labelResultAll.txt:10", False), ("-", "bad_line", "labelResultAll.txt:11", False)}
    assert {g for g, x in s.items() if not x.valid} == {"2", "3", "4", "6"}
    assert list(s) == ["1", "2", "3", "4", "5", "6", "8", "9"]  # nothing good lost
    # An empty text is encoded as the placeholder and counted (a missing one too, as read_mvsa counts it).
    assert s["8"].text == EMPTY_TEXT and s["8"].empty_text and s["8"].valid and ds.empty_texts == 2
    assert s["9"].raw_text == GBK_TEXT and s["9"].encoding == "gb18030" and ds.encodings["gb18030"] == 1


# ----------------------------------------------------------------------------------------- Twitter
def _twitter(tmp_path, **kw):
    files = {"train": [tw_row(0, 2, "10.jpg", "RT @ x : $T$ beats Japan", "South Korea"),
                       tw_row(1, 1, "10.jpg", "South Korea beats $T$", "Japan")],
             "dev": [tw_row(0, 0, "11.jpg", "fire on $T$", "Haight Street")],
             "test": [tw_row(0, 1, "12.jpg", "$T$ and $T$ again", "Pedro")]}
    headers = {"train": "index\t#1 Label\t#2 ImageID\t#1 String\t#2 String",
               "dev": "index\t#1 Label\t#2 ImageID\t#3 String\t#3 String", "test": None}
    return write_twitter(tmp_path / "absa_data" / "twitter2015", files, images_for(["10.jpg", "11.jpg", "12.jpg"]),
                         headers=headers, **kw)


def test_twitter_targets_splits_and_shared_images(tmp_path):
    root = _twitter(tmp_path)
    ds = twitter.read(str(root))
    s = by_guid(ds)
    assert list(s) == ["train-0", "train-1", "dev-0", "test-0"]  # {split}-{index}: unique across files
    assert [x.split for x in ds.samples] == ["train", "train", "dev", "test"]
    assert [x.label for x in ds.samples] == [2, 1, 0, 1] and ds.classes == LABELS
    assert s["train-0"].raw_text == "RT @ x : South Korea beats Japan" and s["train-0"].target == "South Korea"
    assert s["train-1"].raw_text == "South Korea beats Japan" and s["train-1"].target == "Japan"
    assert s["test-0"].raw_text == "Pedro and Pedro again"
    images = str(tmp_path / "absa_data" / "twitter2015_images")
    assert s["train-0"].image_path == s["train-1"].image_path == os.path.join(images, "10.jpg")
    assert not ds.problems and ds.index_files == ("train.tsv", "dev.tsv", "test.tsv")
    assert [x.guid for x in twitter.read(str(root), limit=1).samples] == ["train-0", "dev-0", "test-0"]


def _images(folder, names):
    folder.mkdir(parents=True)
    for name, data in images_for(names).items():
        (folder / name).write_bytes(data)
    return folder


def test_twitter_image_folder(tmp_path):
    root = _twitter(tmp_path, image_dir=None)
    with pytest.raises(FileNotFoundError, match="twitter2017_images.*10.jpg.*--images"):
        twitter.read(str(root))
    # TomBERT's own layout: absa_data/twitter2015 and IJCAI2019_data/twitter2015_images at the repo root; a
    # twitter2017_images folder beside it holds other images and is not taken.
    _images(tmp_path / "IJCAI2019_data" / "twitter2015_images", ["10.jpg", "11.jpg"])
    _images(tmp_path / "absa_data" / "twitter2017_images", ["99.jpg"])
    ds = twitter.read(str(root))
    assert ds.samples[0].image_path == str(tmp_path / "IJCAI2019_data" / "twitter2015_images" / "10.jpg")
    assert problems(ds) == {("test-0", "missing", "12.jpg", True)}
    other = _images(tmp_path / "elsewhere", ["10.jpg"])
    assert twitter.read(str(root), images=str(other)).samples[0].image_path == str(other / "10.jpg")
    with pytest.raises(FileNotFoundError, match="images="):
        twitter.read(str(root), images=str(tmp_path / "nope"))


def test_twitter_bad_input(tmp_path):
    rows = [tw_row(0, 2, "1.jpg", "$T$ ok", "A"), tw_row(1, 7, "1.jpg", "$T$ odd label", "B"),
            tw_row(2, 1, "1.jpg", "no marker here", "C"), tw_row(3, 1, "1.jpg", "$T$ no target", ""),
            tw_row(4, 0, "2.jpg", "$T$ missing image", "D"), "5\t1\t1.jpg\ttoo few columns",
            tw_row(0, 2, "1.jpg", "$T$ ok", "A"), tw_row(1, 0, "1.jpg", "$T$ other", "E"),
            tw_row(6, "", "1.jpg", "$T$ no label", "F"), tw_row(7, 1, "", "$T$ no image", "G")]
    rows.append(tw_row(8, 1, "1.jpg", "", "H"))  # an empty sentence: the placeholder, as an empty text file
    root = write_twitter(tmp_path / "t" / "tw", {"train": rows}, images_for(["1.jpg"]))
    with open(root / "train.tsv", "ab") as f:  # one line saved as GB18030
        f.write(tw_row(9, 2, "1.jpg", "$T$ " + GBK_TEXT, "I").encode("gb18030") + b"\n")
    ds = twitter.read(str(root))
    assert problems(ds) == {("train-8", "bad_target", "train.tsv:12", False), 
        ("train-1", "unknown_label", "train.tsv:3", True), ("train-2", "bad_target", "train.tsv:4", False),
        ("train-3", "bad_target", "train.tsv:5", True), ("train-4", "missing", "2.jpg", True),
        ("-", "bad_line", "train.tsv:7", False), ("train-0", "duplicate", "train.tsv:8", False),
        ("train-1", "duplicate", "train.tsv:9", True), ("train-6", "no_label", "train.tsv:10", True),
        ("train-7", "missing", "train.tsv:11", True)}
    s = by_guid(ds)
    assert s["train-2"].raw_text == "no marker here" and s["train-2"].valid and s["train-2"].target == "C"
    assert [g for g, x in s.items() if x.valid] == ["train-0", "train-2", "train-8", "train-9"]
    assert s["train-8"].text == EMPTY_TEXT and ds.empty_texts == 1
    assert s["train-9"].raw_text == "I " + GBK_TEXT and s["train-9"].encoding == "gb18030"


# ----------------------------------------------------------------------------------------- Hateful Memes
def test_hateful_memes_images_splits_and_classes(tmp_path):
    files = {"train.jsonl": [meme(8291, "img/08291.png", "first", 1), meme(42, "img/00042.png", "second", 0)],
             "dev_seen.jsonl": [meme(500, "img/00500.png", "seen", 0), meme(501, "img/00501.png", "both", 1)],
             "dev_unseen.jsonl": [meme(501, "img/00501.png", "both", 1), meme(600, "img/00600.png", "unseen", 1)],
             "test_unseen.jsonl": [meme(700, "img/00700.png", "no label")]}
    names = ["img/08291.png", "img/00042.png", "img/00500.png", "img/00501.png", "img/00600.png", "img/00700.png"]
    ds = hateful_memes.read(str(write_memes(tmp_path / "hm", files, images_for(names, png=True))))
    assert ds.classes == ("not-hateful", "hateful") and not ds.problems
    s = by_guid(ds)
    assert s["8291"].image_path == os.path.join(ds.root, "img", "08291.png")  # from img, not from the id
    assert [(g, x.split, x.label) for g, x in s.items()] == [
        ("8291", "train", 1), ("42", "train", 0), ("500", "dev_seen", 0), ("dev_seen/501", "dev_seen", 1),
        ("dev_unseen/501", "dev_unseen", 1), ("600", "dev_unseen", 1), ("700", "test_unseen", -1)]
    assert ds.index_files == ("train.jsonl", "dev_seen.jsonl", "dev_unseen.jsonl", "test_unseen.jsonl")


def test_hateful_memes_bad_input(tmp_path):
    rows = [meme(1, "img/1.png", "ok", 0), "{not json", '["a list"]', {"img": "img/1.png", "text": "no id"},
            meme(2, "img/1.png", "no label"), meme(3, "img/1.png", "bad label", 2), meme(4, "img/gone.png", "x", 1),
            {"id": 5, "img": "img/1.png", "label": 0}, meme(6, "img/1.png", "", 1), meme(1, "img/1.png", "ok", 0),
            meme(7, None, "no image", 0), meme(3, "img/1.png", "bad label", 2)]
    root = write_memes(tmp_path / "hm", {"train.jsonl": rows}, {"img/1.png": png_bytes()})
    with open(root / "train.jsonl", "ab") as f:  # one line saved as GB18030
        f.write(b'{"id": 8, "img": "img/1.png", "label": 1, "text": "' + GBK_TEXT.encode("gb18030") + b'"}\n')
    ds = hateful_memes.read(str(root))
    assert problems(ds) == {
        ("-", "bad_line", "train.jsonl:2", False), ("-", "bad_line", "train.jsonl:3", False),
        ("-", "bad_line", "train.jsonl:4", False), ("2", "no_label", "train.jsonl:5", True),
        ("3", "unknown_label", "train.jsonl:6", True), ("4", "missing", "img/gone.png", True),
        ("5", "missing", "train.jsonl:8", True), ("1", "duplicate", "train.jsonl:10", False),
        ("7", "missing", "train.jsonl:11", True), ("3", "duplicate", "train.jsonl:12", False)}
    s = by_guid(ds)
    assert [g for g, x in s.items() if x.valid] == ["1", "6", "8"] and s["6"].text == EMPTY_TEXT
    assert s["8"].raw_text == GBK_TEXT and s["8"].encoding == "gb18030"


def test_missing_png_reported_once_at_extraction(tmp_path):
    """An image reported missing by the reader is not reported again when a worker fails to open it."""
    ds = hateful_memes.read(str(write_memes(tmp_path / "hm", {"train.jsonl": [meme(1, "img/01.png", "x", 0)]})))
    note_image_problems(ds, 0, [ImageNote("missing", "01.png: file not found", True)])
    assert problems(ds) == {("1", "missing", "img/01.png", True)}


# ----------------------------------------------------------------------------------------- manifests
def test_manifest_csv_jsonl_and_metadata_folder(tmp_path):
    rows = [["a1", "first, with comma", "img/a.jpg", "cat", "train"], ["a2", "two\nlines", "img/b.jpg", "dog", ""],
            ["a3", "unlabelled", "img/a.jpg", "", ""], ["a4", "labelled test", "img/b.jpg", "bird", "test"]]
    path = write_csv(tmp_path / "m" / "data.csv", ["id", "text", "image", "label", "split"], rows,
                     images_for(["img/a.jpg", "img/b.jpg"]))
    ds = table.read(str(path))
    assert ds.classes == ("bird", "cat", "dog") and not ds.problems and ds.index_files == ("data.csv",)
    assert [(x.guid, x.split, x.label) for x in ds.samples] == [("a1", "train", 1), ("a2", "train", 2),
                                                                ("a3", "test", -1), ("a4", "test", 0)]
    assert ds.samples[1].raw_text == "two\nlines" and ds.samples[1].text == "two lines"
    assert ds.samples[0].image_path == str(tmp_path / "m" / "img" / "a.jpg")
    # jsonl with integer labels (sorted numerically) and no id column (row numbers); metadata folder.
    jl = [{"text": "t", "file_name": "a.jpg", "label": 10}, {"text": "u", "file_name": "a.jpg", "label": 2},
          {"text": "v", "file_name": "a.jpg", "label": None}]
    folder = write_jsonl(tmp_path / "f" / "metadata.jsonl", jl, images_for(["a.jpg"])).parent
    ds = table.read(str(folder))
    assert ds.classes == ("2", "10") and [(x.guid, x.label, x.split) for x in ds.samples] == \
        [("1", 1, "train"), ("2", 0, "train"), ("3", -1, "test")]


def test_manifest_column_options_and_classes(tmp_path):
    rows = [["x", "hello", "a.jpg", "pos", "valid", "neg"], ["y", "bye", "a.jpg", "neg", "train", "pos"]]
    path = write_csv(tmp_path / "m.csv", ["key", "caption", "picture", "mood", "part", "other"], rows,
                     images_for(["a.jpg"]))
    opts = dict(id_column="key", text_column="caption", image_column="picture", label_column="mood",
                split_column="part")
    ds = table.read(str(path), **opts)
    assert [(x.guid, x.raw_text, x.split, ds.classes[x.label]) for x in ds.samples] == \
        [("x", "hello", "valid", "pos"), ("y", "bye", "train", "neg")]
    fixed = table.read(str(path), **opts, classes="pos,neg")
    assert fixed.classes == ("pos", "neg") and [x.label for x in fixed.samples] == [0, 1]
    assert fixed.fingerprint() != table.read(str(path), **{**opts, "label_column": "other"}).fingerprint()
    narrow = table.read(str(path), **opts, classes=["pos"])
    assert problems(narrow) == {("y", "unknown_label", "m.csv:3", True)}
    with pytest.raises(ValueError, match="'caption'.*--text-column"):
        table.read(str(path))
    with pytest.raises(ValueError, match="column 'nope' \\(label_column\\) is not in m.csv"):
        table.read(str(path), **{**opts, "label_column": "nope"})


@pytest.mark.parametrize("value", [["a.jpg", "b.jpg"], "a.jpg;b.jpg"])
def test_manifest_several_images_is_out_of_scope(tmp_path, value):
    path = write_jsonl(tmp_path / "m.jsonl", [{"text": "t", "image": value}], images_for(["a.jpg", "b.jpg"]))
    with pytest.raises(ValueError, match="m.jsonl:1 names several images.*out of scope"):
        table.read(str(path))


def test_manifest_bad_input(tmp_path):
    header = ["id", "text", "image", "label", "split"]
    rows = [["1", "ok", "a.jpg", "x", ""], ["2", "short row"], ["3", "no image", "", "x", ""],
            ["4", "gone", "gone.jpg", "x", ""], ["", "no id", "a.jpg", "x", ""],
            ["5", "train, no label", "a.jpg", "", "train"],
            ["1", "ok", "a.jpg", "x", ""], ["6", "", "a.jpg", "y", ""], ["6", "other", "a.jpg", "y", ""]]
    ds = table.read(str(write_csv(tmp_path / "m.csv", header, rows, images_for(["a.jpg"]))))
    assert problems(ds) == {
        ("-", "bad_line", "m.csv:3", False), ("3", "missing", "m.csv:4", True), ("4", "missing", "gone.jpg", True),
        ("-", "bad_line", "m.csv:6", False), ("5", "no_label", "m.csv:7", True), ("1", "duplicate", "m.csv:8", False),
        ("6", "duplicate", "m.csv:10", True)}
    assert [x.guid for x in ds.samples if x.valid] == ["1"] and ds.samples[-1].text == EMPTY_TEXT
    jl = ['{"id": 1, "text": "ok", "image": "a.jpg", "label": "x"}', "{broken", '{"id": 2, "image": "a.jpg"}',
          '{"id": 3, "text": "t", "image": 7}', '{"id": 4, "text": "t", "image": "a.jpg", "label": {"x": 1}}']
    last = b'{"id": 5, "text": "' + GBK_TEXT.encode("gb18030") + b'", "image": "a.jpg"}'
    (tmp_path / "m.jsonl").write_bytes("\n".join(jl).encode() + b"\n" + last + b"\n")
    ds = table.read(str(tmp_path / "m.jsonl"))
    assert problems(ds) == {("-", "bad_line", "m.jsonl:2", False), ("2", "missing", "m.jsonl:3", True),
                            ("3", "missing", "m.jsonl:4", True), ("4", "unknown_label", "m.jsonl:5", True)}
    assert ds.samples[-1].raw_text == GBK_TEXT and ds.samples[-1].encoding == "gb18030" and ds.classes == ("x",)


# ----------------------------------------------------------------------------------------- every reader
def _with_bad_images(tmp_path, fmt):
    """A dataset of format `fmt` whose sample 'a' has an empty image and 'b' a corrupt one: (path, guids)."""
    bad = {"a": b"", "b": b"this is no picture"}
    if fmt == "mvsa-single":
        return write_release(tmp_path, ["a\tpositive,positive", "b\tneutral,neutral"], images=bad), ("a", "b")
    if fmt == "mvsa-multiple":
        return write_release(tmp_path, ["a\tpositive,positive\tpositive,positive\tneutral,neutral",
                                        "b\tneutral,neutral\tneutral,neutral\tneutral,neutral"], images=bad), ("a", "b")
    if fmt == "twitter":
        rows = [tw_row(0, 2, "a.jpg", "$T$", "x"), tw_row(1, 1, "b.jpg", "$T$", "y")]
        images = {"a.jpg": b"", "b.jpg": bad["b"]}
        return write_twitter(tmp_path / "tw", {"train": rows}, images), ("train-0", "train-1")
    if fmt == "hateful-memes":
        return write_memes(tmp_path, {"train.jsonl": [meme("a", "a.jpg", "x", 0), meme("b", "b.jpg", "y", 1)]},
                           {"a.jpg": b"", "b.jpg": bad["b"]}), ("a", "b")
    rows = [["a", "x", "a.jpg", "1"], ["b", "y", "b.jpg", "2"]]
    return write_csv(tmp_path / "m.csv", ["id", "text", "image", "label"], rows,
                     {"a.jpg": b"", "b.jpg": bad["b"]}), ("a", "b")


@pytest.mark.parametrize("reader", [mvsa_single, mvsa_multiple, twitter, hateful_memes, table])
def test_decode_problems_and_subsets_work_on_every_reader(tmp_path, reader):
    """Image problems found when decoding (scan_images, as --strict runs it) name the sample as for mvsa, and
    a subset (a shard) keeps the classes and files."""
    path, (a, b) = _with_bad_images(tmp_path, reader.FORMAT)
    assert detect_format(str(path)) == reader.FORMAT
    ds = reader.read(str(path))
    assert not ds.problems
    scan_images(ds)
    assert problems(ds) == {(a, "empty", "a.jpg", True), (b, "corrupt", "b.jpg", True)}
    sub = ds.subset(0, 1, {"index": 0})
    assert sub.classes == ds.classes and sub.index_files == ds.index_files and [s.guid for s in sub.samples] == [a]


def test_random_bytes_never_crash_a_reader(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(6):
        junk = rng.bytes(400) + b"\n\t,{}\"$T$\n" + rng.bytes(200)
        d = tmp_path / str(k)
        write_release(d / "s", [], raw=junk)
        mvsa_single.read(str(d / "s"))
        mvsa_multiple.read(str(d / "s"))
        (d / "tw").mkdir()
        (d / "tw" / "train.tsv").write_bytes(junk)
        twitter.read(str(d / "tw"), images=str(d))
        (d / "hm").mkdir()
        (d / "hm" / "train.jsonl").write_bytes(junk)
        hateful_memes.read(str(d / "hm"))
        (d / "m.jsonl").write_bytes(junk)
        with pytest.raises(ValueError, match="has no 'text' column"):  # a user mistake, said as such
            table.read(str(d / "m.jsonl"))


def test_converter_gives_the_mvsa_readers_samples(tmp_path):
    """examples/convert_mvsa.py: the manifest and the raw MVSA-Single release read back as read_mvsa's samples."""
    data = require_mvsa()
    import importlib.util
    spec = importlib.util.spec_from_file_location("convert_mvsa", os.path.join(
        os.path.dirname(__file__), "..", "examples", "convert_mvsa.py"))
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    convert.main([str(tmp_path / "out"), "--data", str(data), "--limit", "25"])
    ref = read_dataset("mvsa", str(data), limit=25)

    def rows(ds, train_only=False):
        return [(s.guid, s.split, ds.classes[s.label] if s.label >= 0 else None, s.raw_text, s.text,
                 os.path.realpath(s.image_path)) for s in ds.samples if s.split == "train" or not train_only]

    assert detect_format(str(tmp_path / "out" / "manifest")) == "manifest"
    assert detect_format(str(tmp_path / "out" / "mvsa-single")) == "mvsa-single"
    manifest = table.read(str(tmp_path / "out" / "manifest"))
    release = mvsa_single.read(str(tmp_path / "out" / "mvsa-single"))
    assert rows(manifest) == rows(ref) and not manifest.problems
    assert rows(release) == rows(ref, train_only=True) and not release.problems
