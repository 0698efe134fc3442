"""The run directory: what `train` writes and what `predict` reads back.

    config.json          {"train": TrainConfig, "head": HeadConfig}; both rebuilt with Cls(**cfg)
    head.safetensors     head weights (state_dict)
    cache.json           cache key, backbone, preprocessing, dataset of the cache it was trained on
    split.json           seed, val_ratio, train/val guids, training class counts
    metrics.json         validation metrics (tuned and "untuned" with --tune-bias), counts, timing
    bias.json            per-class logit offsets (only with --tune-bias; predict applies them)
    history.json         one row per epoch
    val_predictions.csv  guid,label,pred,p_<class>... (+ pred_untuned with --tune-bias)
    *.png                plots
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict

import numpy as np
import torch

from featcache.dataset import LABELS
from featcache.store import feature_signature

from .fusions import HeadConfig, create_fusion

CACHE_FIELDS = ("key", "backbone", "preprocessing")  # recorded with every run


def save_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def load_json(path: str):
    with open(path) as f:
        return json.load(f)


def is_finished(run_dir: str, section: str, config: dict) -> bool:
    """A finished run of exactly this config: metrics.json is written last, so its presence means complete,
    and config.json[section] must equal `config` (a changed config is a different run)."""
    try:
        return (os.path.exists(os.path.join(run_dir, "metrics.json"))
                and load_json(os.path.join(run_dir, "config.json"))[section] == config)
    except (OSError, ValueError, KeyError):
        return False


def cache_info(meta: dict, path: str) -> dict:
    return {"path": os.path.abspath(path), **{k: meta.get(k) for k in CACHE_FIELDS},
            "signature": feature_signature(meta), "dataset": meta.get("dataset")}


def save_head(run_dir: str, model: torch.nn.Module, train_cfg, head_cfg: HeadConfig) -> None:
    from safetensors.torch import save_file
    save_json(os.path.join(run_dir, "config.json"), {"train": asdict(train_cfg), "head": asdict(head_cfg)})
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(run_dir, "head.safetensors"))


def load_head(run_dir: str, device="cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the head from config.json + head.safetensors. Returns (model in eval mode, config dict)."""
    from safetensors.torch import load_file
    for name in ("config.json", "head.safetensors", "cache.json"):
        if not os.path.exists(os.path.join(run_dir, name)):
            raise FileNotFoundError(f"{run_dir} is not a heads run directory (no {name}); "
                                    "point --run at a directory written by `heads train`")
    cfg = load_json(os.path.join(run_dir, "config.json"))
    model = create_fusion(cfg["train"]["fusion"], HeadConfig(**cfg["head"]))
    model.load_state_dict(load_file(os.path.join(run_dir, "head.safetensors")))
    return model.to(device).eval(), cfg


def head_params(run_dir: str, metrics: dict) -> int | None:
    """Parameter count of a run's head: metrics.json["head_params"] (recorded since the report page), else
    counted from the shapes in head.safetensors' header (the heads have no buffers, so the state dict is
    exactly the parameters). Probes record their coefficient count. None when neither is there."""
    if "head_params" in metrics:
        return int(metrics["head_params"])
    path = os.path.join(run_dir, "head.safetensors")
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:  # safetensors: u64 little-endian header size, then a JSON header
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return int(sum(np.prod(t["shape"], dtype=np.int64) for k, t in header.items() if k != "__metadata__"))


def write_predictions(path: str, guids, labels, probs: np.ndarray, pred, pred_untuned=None) -> None:
    """Validation predictions; label and pred are class names, p_<class> the softmax of the raw logits."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["guid", "label", "pred", *[f"p_{c}" for c in LABELS]]
                   + (["pred_untuned"] if pred_untuned is not None else []))
        for k, guid in enumerate(guids):
            row = [guid, LABELS[labels[k]], LABELS[pred[k]], *[f"{p:.6f}" for p in probs[k]]]
            w.writerow(row + ([LABELS[pred_untuned[k]]] if pred_untuned is not None else []))


def read_predictions(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
