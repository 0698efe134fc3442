"""The run directory: its format, its one writer (`write_run`: stage 1, stage 2 and the probe) and its readers.

    config.json              {"format": 2, "stage": "train" | "finetune" | "probe",
                              "train" (head runs) | "probe": the run's config as its flat view (heads.config:
                                  the names grids, `heads report --group-by` and the resume check address),
                              "dims": the head's input sizes and class count, "classes": the cache's class
                              names (label k is classes[k]), "env": what produced the run (featcache.env)}
    head.safetensors         head weights (state_dict)
    head.fold<k>.safetensors a cross-fit run (`heads train --folds K`): the K fold heads instead of
                             head.safetensors, listed in config.json "heads"; predict averages their
                             probabilities (heads.train.crossfit)
    text_layers.safetensors  stage 2: the unfrozen text-layer parameters only (from a cross-fit --init:
                             text_layers.fold<k>.safetensors beside each head.fold<k>.safetensors)
    cache.json               cache key, backbone, preprocessing, dataset of the cache it was trained on
    split.json               seed, split settings, training class counts, train/val/test guids (+ init);
                             "validation": the data's split that validated or "carved"; "heldout": guids
                             of the data's other labelled splits; "split_file": name, sha256, mismatches
    metrics.json             validation metrics (tuned and "untuned" with --tune-bias), classes, counts,
                             timing; roc_auc of class 1 for two classes; "test" (--test-ratio) and
                             "heldout" {split: metrics} scored once at the end; written last, so its
                             presence means the run is complete
    bias.json                per-class logit offsets (only with --tune-bias; predict applies them)
    history.json             one row per epoch
    val_predictions.csv      guid,label,pred,p_<class>... (+ pred_untuned with --tune-bias)
    *.png                    plots (drawn by the caller before metrics.json)

Written whole or not at all: write_run fills a hidden sibling folder (featcache.outdir.atomic_dir) renamed into
place at the end, so a run killed at any moment (even with -9) leaves no half directory, and a rerun into a
finished one replaces it only once the new one is complete (no stale file of the old run survives in it).

Older run directories keep loading: `read_config` upgrades their config.json (format 1: {"train": TrainConfig,
"head": HeadConfig}, stage 2 with a "finetune" section, probes {"probe": ...}; no class names, so MVSA's
three, featcache.cache.store.LEGACY_CLASSES).
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from featcache.cache.store import LEGACY_CLASSES, CacheError, feature_signature
from featcache.errors import ConfigError, UserError
from featcache.outdir import atomic_dir, atomic_file

FORMAT = 2
CACHE_FIELDS = ("key", "backbone", "preprocessing")  # recorded with every run
HEAD_FILE, TEXT_LAYERS_FILE = "head.safetensors", "text_layers.safetensors"
FOLD_FILE = "head.fold{}.safetensors"  # a cross-fit run's k-th head
TEXT_FOLD_FILE = "text_layers.fold{}.safetensors"  # stage 2 from a cross-fit run: fold k's text layers
# Format 1 stage 2: the head and loss of a run came from its "train" section (the --init run's, or the fresh
# head's), its optimisation and text layers from "finetune", under older names.
_FT1_FROM_TRAIN = ("fusion", "modality", "hidden", "dropout", "attn_heads", "modality_dropout", "loss",
                   "label_smoothing", "focal_gamma", "val_ratio", "test_ratio", "folds", "fold")
_FT1_RENAMED = {"unfreeze_text": "text_layers", "lr_head": "lr"}


class DamagedRunError(UserError, ValueError):
    """A file of a run directory that is there but cannot be read (truncated, garbage, edited by hand): the
    message names the file. Also a ValueError, so checks that treat an unreadable run as "not finished"
    (is_finished, the report's optional fields) keep working."""


_DAMAGED_HELP = "restore the file from a copy, or train the run again (`heads ablate` reruns a damaged run)"


def save_json(path: str, obj) -> None:
    """`obj` as indented JSON, written atomically (featcache.outdir.atomic_file)."""
    with atomic_file(path, encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def load_json(path: str):
    """A JSON file of a run; DamagedRunError naming the file and the line when it is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DamagedRunError(f"{path} line {exc.lineno}: {exc.msg} (column {exc.colno}): the file is damaged; "
                              f"{_DAMAGED_HELP}") from exc
    except UnicodeDecodeError as exc:
        raise DamagedRunError(f"{path} is not a text file (byte {exc.start}); the file is damaged; "
                              f"{_DAMAGED_HELP}") from exc


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """A safetensors file of a run; DamagedRunError naming it when it is truncated or not safetensors."""
    try:
        return load_file(path)
    except SafetensorError as exc:
        raise DamagedRunError(f"{path} is truncated or not a safetensors file ({exc}); {_DAMAGED_HELP}") from exc


def is_finished(run_dir: str, section: str, config: dict, cache_key: str | None, upgrade=None) -> bool:
    """A finished run of exactly this config on a cache of these features: a run directory appears whole
    (write_run) with metrics.json last in it, so its presence means complete; config.json[section] (a flat view)
    must equal `config` (a changed config is a different run) and cache.json's key `cache_key` (the same config
    on another cache is a different run; a copy of the same cache elsewhere is not).
    `upgrade(saved)` (a config class's `from_flat(...).flat()`) first gives fields added since the run was
    written their defaults: a newer version resumes an older ablation instead of retraining it."""
    try:
        saved = load_json(os.path.join(run_dir, "config.json"))[section]
        return os.path.exists(os.path.join(run_dir, "metrics.json")) and \
            load_json(os.path.join(run_dir, "cache.json")).get("key") == cache_key and \
            (saved == config or (upgrade is not None and upgrade(saved) == config))
    except (OSError, ValueError, KeyError, AttributeError, ConfigError):
        return False


def cache_info(meta: dict, path: str) -> dict:
    return {"path": os.path.abspath(path), **{k: meta.get(k) for k in CACHE_FIELDS},
            "signature": feature_signature(meta), "dataset": meta.get("dataset")}


# ------------------------------------------------------------------------------------------ reading
PROBE_NAME = "logreg-probe"  # how probe runs name their "fusion" in metrics.json and reports
# heads.fusions.HeadDims' fields: what format 1 kept in its "head" section beside the hyperparameters.
DIM_KEYS = ("text_dim", "text_pooled_dim", "image_dim", "image_pooled_dim", "num_classes")


def upgrade_config(raw: dict) -> dict:
    """Any config.json this project wrote, as format 2."""
    if raw.get("format") == FORMAT:
        return raw
    if "format" in raw:
        raise ConfigError(f"config.json has format {raw['format']}, newer than this code reads ({FORMAT})")
    out = {"format": FORMAT, "classes": list(LEGACY_CLASSES)}
    if "probe" in raw:
        return {**out, "stage": "probe", "probe": raw["probe"]}
    dims = {k: raw["head"][k] for k in DIM_KEYS}
    if "finetune" in raw:
        ft, head_run = raw["finetune"], raw["train"]
        train = {_FT1_RENAMED.get(k, k): v for k, v in ft.items() if k != "cache"}
        train.update({k: head_run[k] for k in _FT1_FROM_TRAIN if k in head_run})
        return {**out, "stage": "finetune", "train": train, "dims": dims}
    return {**out, "stage": "train", "train": raw["train"], "dims": dims}


def read_config(run_dir: str) -> dict:
    """config.json of a head run, upgraded to format 2; FileNotFoundError when `run_dir` is not one."""
    def need(name):
        if not os.path.exists(os.path.join(run_dir, name)):
            raise FileNotFoundError(f"{run_dir} is not a heads run directory (no {name}); "
                                    "point --run at a directory written by `heads train`")

    need("config.json")
    need("cache.json")
    path = os.path.join(run_dir, "config.json")
    raw = load_json(path)
    try:
        cfg = upgrade_config(raw)
        section = "probe" if cfg["stage"] == "probe" else "train"
        if not (isinstance(cfg[section], dict) and isinstance(cfg["classes"], list)
                and (section == "probe" or isinstance(cfg["dims"], dict))):
            raise TypeError(section)
    except (KeyError, TypeError, AttributeError) as exc:  # valid JSON, but not what `heads train` writes
        raise DamagedRunError(f"{path} is not a run's config.json (missing or malformed: {exc}); "
                              f"{_DAMAGED_HELP}") from exc
    for name in head_files(cfg):
        need(name)
    return cfg


def head_files(cfg: dict) -> list[str]:
    """The weight files of a run's head(s): the K fold heads of a cross-fit run, else head.safetensors."""
    return list(cfg.get("heads") or [HEAD_FILE])


def recorded_signature(recorded: dict) -> dict:
    """The feature signature of the cache a run was trained on, from its cache.json (older runs recorded the
    cache's metadata only: the signature is derived from it)."""
    return recorded.get("signature") or feature_signature(recorded)


def check_cache(run_dir: str, cfg: dict, cache_path: str, meta: dict, classes: list[str]) -> None:
    """Raise CacheError unless a cache can be fed to a run: every field of the feature signature equal to
    that of the cache it was trained on (cache.json), naming both sides of each that differs, and the same
    class names (`cfg` is the run's format-2 config).

    The dataset may differ (that is what predicting on new data means); backbones, weights and
    preprocessing may not, or the features the head sees would mean something else.
    """
    trained_on = load_json(os.path.join(run_dir, "cache.json"))
    ran = recorded_signature(trained_on)
    has = feature_signature(meta)
    diffs = [f"{k}: run has {_show(ran.get(k))}, cache has {_show(has.get(k))}"
             for k in has if ran.get(k) != has.get(k)]
    if diffs:
        raise CacheError(f"run {run_dir} was trained on cache {trained_on.get('path')}, which differs from "
                         f"{cache_path}: " + "; ".join(diffs) + ". Train a head on this cache, or extract "
                         "the cache with the run's backbone and preprocessing.")
    if list(cfg["classes"]) != list(classes):
        raise CacheError(f"run {run_dir} predicts the classes {', '.join(cfg['classes'])}, but {cache_path} has "
                         f"{', '.join(classes)}; train a head on this cache")


def _show(value) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)


def text_layer_files(cfg: dict) -> list[str]:
    """A stage-2 run's text-layer files, one per head (head_files order): fold k's beside head.fold<k>."""
    files = head_files(cfg)
    return [TEXT_LAYERS_FILE] if files == [HEAD_FILE] else [TEXT_FOLD_FILE.format(k) for k in range(len(files))]


def load_text_layers(run_dir: str, name: str = TEXT_LAYERS_FILE) -> dict[str, torch.Tensor]:
    """The unfrozen text-layer parameters a stage-2 run saved (`name`: one of its text_layer_files)."""
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir} is a finetune run without {name}; it is incomplete")
    return load_weights(path)


def head_params(run_dir: str, metrics: dict) -> int | None:
    """Parameter count of a run's head: metrics.json["head_params"] (recorded since the report page), else
    counted from the shapes in head.safetensors' header (the heads have no buffers, so the state dict is
    exactly the parameters). Probes record their coefficient count. None when neither is there."""
    if "head_params" in metrics:
        return int(metrics["head_params"])
    path = os.path.join(run_dir, HEAD_FILE)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:  # safetensors: u64 little-endian header size, then a JSON header
        size = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(min(size, 100_000_000)))
            shapes = [t["shape"] for k, t in header.items() if k != "__metadata__"]
        except (ValueError, AttributeError, KeyError, TypeError) as exc:
            raise DamagedRunError(f"{path} is truncated or not a safetensors file; {_DAMAGED_HELP}") from exc
    return int(sum(np.prod(shape, dtype=np.int64) for shape in shapes))


def read_predictions(path: str) -> list[dict]:
    """val_predictions.csv; DamagedRunError naming the line when a row is cut short or has extra cells."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DamagedRunError(f"{path} is not a CSV file ({exc}); {_DAMAGED_HELP}") from exc
    for k, row in enumerate(rows):
        if None in row or None in row.values():  # DictReader: restkey None / restval None
            raise DamagedRunError(f"{path} line {k + 2} has {'more' if None in row else 'fewer'} cells than its "
                                  f"header: the file is damaged; {_DAMAGED_HELP}")
    return rows


# ------------------------------------------------------------------------------------------ writing
@dataclass
class RunRecord:
    """Everything a run directory holds except its plots."""
    stage: str  # train | finetune | probe
    config: dict  # the run's flat config view (FlatConfig.flat())
    classes: list[str]
    env: dict  # featcache.env.environment(device, threads)
    cache: dict  # cache_info(meta, path)
    split: dict  # split.json (Split.record)
    metrics: dict
    predictions: dict  # write_predictions' guids, labels, probs, pred (+ pred_untuned)
    dims: dict | None = None  # head runs: asdict(HeadDims)
    history: list | None = None
    bias: list | None = None  # --tune-bias offsets, in class order
    weights: dict = field(default_factory=dict)  # file name -> state dict (HEAD_FILE, TEXT_LAYERS_FILE)
    heads: list | None = None  # cross-fit runs: the fold heads' weight files (config.json "heads")


RUN_FILES = ("config.json", "cache.json", "split.json", "metrics.json", "bias.json", "history.json",
             "val_predictions.csv")  # with *.safetensors and *.png: everything a run directory holds


def check_out_dir(out_dir: str) -> None:
    """ConfigError when `out_dir` exists and is not a run directory (a file, or a folder holding other files):
    a run replaces its directory as a whole, which must never delete what a user keeps there. Called before
    training (cli.py) and again by write_run."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"{out_dir} is a file, not a run directory; choose another --out")
    foreign = [n for n in sorted(os.listdir(out_dir)) if n not in RUN_FILES and not n.startswith(".")
               and not n.endswith((".safetensors", ".png"))] if os.path.isdir(out_dir) else []
    if foreign:
        raise ConfigError(f"{out_dir} holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, which "
                          "no run directory holds; a run replaces its whole directory, so choose another --out "
                          "(or move those files away)")


def write_run(out_dir: str, rec: RunRecord, draw=None) -> str:
    """Write the run directory, whole or not at all (atomic_dir); `draw(folder)` (plots) draws into the folder
    being filled, before metrics.json, which comes last."""
    check_out_dir(out_dir)
    with atomic_dir(out_dir, "nothing of this run was kept (an earlier run there is unchanged); free some "
                    "space (or fix the disk) and train again") as tmp:
        section = "probe" if rec.stage == "probe" else "train"
        config = {"format": FORMAT, "stage": rec.stage, section: rec.config, "classes": list(rec.classes),
                  "env": rec.env}
        if rec.dims is not None:
            config["dims"] = rec.dims
        if rec.heads is not None:
            config["heads"] = list(rec.heads)
        save_json(os.path.join(tmp, "config.json"), config)
        for name, state in rec.weights.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(tmp, name))
        save_json(os.path.join(tmp, "cache.json"), rec.cache)
        save_json(os.path.join(tmp, "split.json"), rec.split)
        if rec.bias is not None:
            save_json(os.path.join(tmp, "bias.json"), {"labels": list(rec.classes), "offsets": list(rec.bias)})
        if rec.history is not None:
            save_json(os.path.join(tmp, "history.json"), rec.history)
        write_predictions(os.path.join(tmp, "val_predictions.csv"), classes=rec.classes, **rec.predictions)
        if draw is not None:
            draw(tmp)
        save_json(os.path.join(tmp, "metrics.json"), rec.metrics)
    return out_dir


def write_predictions(path: str, guids, labels, probs: np.ndarray, pred, classes, pred_untuned=None) -> None:
    """Validation predictions; label and pred are class names, p_<class> the softmax of the raw logits."""
    with atomic_file(path, newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["guid", "label", "pred", *[f"p_{c}" for c in classes]]
                   + (["pred_untuned"] if pred_untuned is not None else []))
        for k, guid in enumerate(guids):
            row = [guid, classes[labels[k]], classes[pred[k]], *[f"{p:.6f}" for p in probs[k]]]
            w.writerow(row + ([classes[pred_untuned[k]]] if pred_untuned is not None else []))
