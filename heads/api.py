"""Use a trained run from Python: `load_run(RUN)` -> a classifier over new posts or a cache.

    from heads import load_run
    clf = load_run("runs/main")                                   # any run: stage 1, stage 2, cross-fit, ensemble
    clf.predict(texts=["so happy today"], images=["a.jpg"])       # -> labels (class names)
    clf.predict_proba(texts=[...], images=[...])                  # -> (n, C), columns in clf.classes order
    clf.predict_cache("cache/new.h5", split="test")               # the cached route

Raw pairs take exactly the route of `heads predict --data`: they are written as a small manifest (images given
as bytes or PIL images saved next to it, paths used as they are) and go through featcache's extraction engine
into a temporary cache with the run's backbones, weights and preprocessing, then through the one inference loop
(heads.predict). So the API, `predict --data` and `predict --cache` give the same predictions, and a batch of
any size is processed in the extraction's batches.

Bad input never raises and never disappears: an unreadable or missing image (found by extraction) or an empty
text gets the run's fallback label (its most frequent training class) and NaN probabilities, and is reported
by position in `Predictions.problems` (also `clf.problems`, and a warning).
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import warnings

import numpy as np
from rich.console import Console

from featcache.errors import ConfigError

from .ensemble import is_ensemble
from .predict import fallback_tag, predict, predict_data
from .rundir import load_json, read_config

NO_TEXT = "empty text: the run's fallback label"


class Predictions(list):
    """The predicted labels, one per input row, plus `problems` {position (or guid): why it got `fallback`}."""

    def __init__(self, labels, problems: dict, fallback: str, proba: np.ndarray, ids: list | None = None):
        super().__init__(labels)
        self.problems, self.fallback, self.proba, self.ids = problems, fallback, proba, ids


class RunClassifier:
    """A finished run directory, checked when loaded; the backbones load when raw input is first predicted and
    stay loaded for the next call (featcache.extract.engine keeps one set)."""

    def __init__(self, run_dir: str, device: str = "auto", progress: bool = False):
        run_dir = str(run_dir)
        cfg = load_json(os.path.join(run_dir, "config.json")) if is_ensemble(run_dir) else read_config(run_dir)
        self.run_dir, self.device, self.progress = run_dir, device, progress
        self.classes: list[str] = list(cfg["classes"])
        self.fallback = fallback_tag(run_dir, self.classes)
        self.problems: dict = {}  # of the last call

    def predict(self, texts, images) -> Predictions:
        """Labels (class names) for the pairs (texts[k], images[k])."""
        return self._raw(texts, images)

    def predict_proba(self, texts, images) -> np.ndarray:
        """(n, C) class probabilities (columns: self.classes); rows of bad input are NaN."""
        return self._raw(texts, images).proba

    def predict_cache(self, cache, split: str = "test") -> Predictions:
        """Labels for every row of `split` of an extracted cache (ids: its guids; problems: its invalid rows); an
        ensemble of runs of several backbones takes a list of caches, one per backbone."""
        with tempfile.TemporaryDirectory(prefix="heads-api-") as tmp:
            res = predict(self.run_dir, cache, os.path.join(tmp, "p.csv"), split=split, device=self.device,
                          proba=True)
            ids, labels, proba = _read_csv(res.out, len(self.classes))
        return self._done(labels, {g: "invalid in the cache" for g in res.invalid}, proba, ids)

    def _raw(self, texts, images) -> Predictions:
        texts, images = _as_list(texts, "texts"), _as_list(images, "images")
        if len(texts) != len(images):
            raise ConfigError(f"give one image per text: {len(texts)} texts, {len(images)} images")
        if not texts:
            return self._done([], {}, np.zeros((0, len(self.classes))), [])
        with tempfile.TemporaryDirectory(prefix="heads-api-") as tmp:
            manifest, problems = _write_manifest(tmp, texts, images)
            res = predict_data(self.run_dir, manifest, os.path.join(tmp, "p.csv"), split="test", fmt="manifest",
                               device=self.device, proba=True, progress=self.progress,
                               console=Console(stderr=True, quiet=not self.progress), keep_models=True)
            ids, labels, proba = _read_csv(res.out, len(self.classes))
        for guid in res.invalid:
            problems[int(guid)] = res.problems.get(guid) or "invalid input"
        for k in problems:  # empty texts: encoded as a placeholder by extraction, but nothing to classify
            labels[k], proba[k] = self.fallback, np.nan
        return self._done(labels, dict(sorted(problems.items())), proba, None, stacklevel=4)

    def _done(self, labels, problems: dict, proba, ids, stacklevel: int = 3) -> Predictions:
        # stacklevel: the warning points at the user's line (predict_cache -> _done; predict -> _raw -> _done)
        self.problems = problems
        if problems:
            listed = "; ".join(f"{k}: {why}" for k, why in list(problems.items())[:10])
            warnings.warn(f"{len(problems)} input row(s) got the fallback label {self.fallback!r}: {listed}"
                          + (" ..." if len(problems) > 10 else ""), stacklevel=stacklevel)
        return Predictions(labels, problems, self.fallback, proba, ids)


def load_run(run_dir: str, device: str = "auto", progress: bool = False) -> RunClassifier:
    """A classifier for the run directory `run_dir` (FileNotFoundError / ConfigError when it is not one)."""
    return RunClassifier(run_dir, device, progress)


def _as_list(values, name: str) -> list:
    if values is None or isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ConfigError(f"{name} must be a list (one entry per post), got {type(values).__name__}")
    return list(values)


def _write_manifest(folder: str, texts: list, images: list) -> tuple[str, dict]:
    """FOLDER/metadata.jsonl with one row per pair (id = position) for the manifest reader; images given as
    bytes or PIL images are written beside it (PIL: PNG, lossless). Returns it and {position: problem} of the
    texts and image types that cannot be used."""
    problems, rows = {}, []
    for k, (text, image) in enumerate(zip(texts, images)):
        if not isinstance(text, str) or not text.strip():
            problems[k] = NO_TEXT if isinstance(text, str) or text is None else \
                f"text of type {type(text).__name__}, not str: the run's fallback label"
            text = text if isinstance(text, str) else ""
        rows.append({"id": str(k), "text": text, "image": _image_file(folder, k, image)})
    path = os.path.join(folder, "metadata.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return path, problems


def _image_file(folder: str, k: int, image) -> str:
    """A path for the manifest; an unusable value becomes a missing file, which extraction reports."""
    if isinstance(image, (str, os.PathLike)):
        return os.path.abspath(image)
    path = os.path.join(folder, f"image-{k}")
    if isinstance(image, (bytes, bytearray, memoryview)):
        with open(path, "wb") as f:
            f.write(bytes(image))
    elif hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image (duck-typed: PIL is not needed here)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        with open(path, "wb") as f:
            f.write(buf.getvalue())
    else:
        return os.path.join(folder, f"not-an-image-{k}-{type(image).__name__}")
    return path


def _read_csv(path: str, n_classes: int) -> tuple[list, list, np.ndarray]:
    """(guids, labels, probabilities) of a `--proba` predictions file (empty cells: NaN)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()[1:]
    cells = [line.rsplit(",", n_classes + 1) for line in lines]  # from the right: a guid may hold commas
    proba = np.array([[float(v) if v else np.nan for v in c[2:]] for c in cells]).reshape(-1, n_classes)
    return [c[0] for c in cells], [c[1] for c in cells], proba

