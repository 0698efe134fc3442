"""Apply a model to rows of an in-memory cache in large batches, without autograd: THE inference loop.

Shared by training (per-epoch validation, both stages) and `predict`, for a fusion head on cached features
and for a stage-2 model (top text layers + head) alike: a model names the batch keys it reads (`inputs`) and
the cache's one batcher gathers them, so validation numbers and predictions on new data come from exactly
the same code path.
"""
from __future__ import annotations

import os
from dataclasses import fields

import numpy as np
import torch

from featcache.errors import ConfigError

from .data.cache import CacheData
from .fusions import HeadConfig, HeadDims, load_fusion
from .rundir import DamagedRunError, head_files, load_weights, read_config


@torch.inference_mode()
def infer(model: torch.nn.Module, data: CacheData, rows, device="cpu", batch_size: int = 1024) -> dict:
    """{"logits": (n,C) float32 numpy, and "gate": (n,) when the head exports one}. Leaves the model in eval."""
    model.eval()
    rows = np.asarray(rows, dtype=np.int64)
    # A head that reads text tokens gets rows in order of text length, in smaller batches: each is cut to its
    # own longest text (CacheData.batch) instead of every batch to the longest of all. Rows are independent in
    # eval mode, so only float rounding can differ. Not for rows a streamed cache reads from disk: their batches
    # follow its blocks (rows it keeps in memory, validation's, are sorted).
    lengths = data.sort_lengths(rows) if "text_tokens" in model.inputs else None
    order = np.argsort(lengths[rows].numpy(), kind="stable") if lengths is not None else None
    if order is not None:
        rows, batch_size = rows[order], min(batch_size, SORTED_BATCH)
    # Heads that compute on normalised tokens only (normed_eval) read them normalised by the batcher on the host
    # (from per-token statistics: heads.data.normstats), as their training steps do.
    normed = model.prenorm if getattr(model, "normed_eval", False) and torch.device(device).type == "cpu" else ()
    data.schedule(rows)  # a streamed cache reads these rows' blocks ahead (heads.data.stream)
    outs: dict[str, list] = {}
    for start in range(0, len(rows), batch_size):
        out = model(data.batch(rows[start:start + batch_size], device, model.inputs, normed=normed))
        for k, v in out.items():
            outs.setdefault(k, []).append(v.float().cpu())
    if not outs:  # no rows: keep the shapes downstream code expects
        return {"logits": np.zeros((0, model.num_classes), dtype=np.float32)}
    res = {k: torch.cat(v).numpy() for k, v in outs.items()}
    return res if order is None else {k: v[np.argsort(order)] for k, v in res.items()}


SORTED_BATCH = 256  # rows per inference batch of a head that reads text tokens (sorted by length)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def load_head(run_dir: str, device="cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the head from config.json + head.safetensors. Returns (model in eval mode, format-2 config).
    A cross-fit run has K heads: use load_heads."""
    models, cfg = load_heads(run_dir, device)
    if len(models) != 1:
        raise ConfigError(f"{run_dir} is a cross-fit run with {len(models)} fold heads; this command takes a "
                          "run with one head (`heads train` without --folds)")
    return models[0], cfg


def load_heads(run_dir: str, device="cpu") -> tuple[list[torch.nn.Module], dict]:
    """Every head of a run (one, or a cross-fit run's K fold heads), in eval mode, and its format-2 config."""
    cfg = read_config(run_dir)
    flat = cfg["train"]
    head = HeadConfig(**{f.name: flat[f.name] for f in fields(HeadConfig) if f.name in flat})
    models = []
    for name in head_files(cfg):
        path = os.path.join(run_dir, name)
        state = load_weights(path)
        model = load_fusion(head, HeadDims(**cfg["dims"]), state)  # a run of a since rebuilt head: the old one
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:  # load_state_dict: missing/unexpected keys or other shapes than config.json's
            raise DamagedRunError(f"{path} does not hold the head config.json describes ({str(exc).splitlines()[0]}"
                                  f"); restore the file from a copy, or train the run again") from exc
        models.append(model.to(device).eval())
    return models, cfg


def mean_log_proba(models: list[torch.nn.Module], data: CacheData, rows, device="cpu",
                   batch_size: int = 1024) -> np.ndarray:
    """log of the heads' averaged softmax probabilities (n,C): one head's is its log-softmax, which has the
    argmax (and, with per-class offsets, the decisions) of its logits."""
    probs = np.mean([softmax(infer(m, data, rows, device, batch_size)["logits"]) for m in models], axis=0)
    return np.log(np.clip(probs, 1e-12, None)).astype(np.float32)
