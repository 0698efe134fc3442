"""`featcache add-text-layers FILE --layers N`: add stage-2 hidden states to an existing cache.

Stage 2 (`heads finetune --unfreeze-text N`) runs only the top N text blocks, on the hidden states that
enter block L-N (`text_hidden/states`). `featcache extract --text-layers N` stores them while extracting;
this add-on computes them for a cache made without them, running only the text backbone (no image decoding,
no image tower), once.

Trust: the states are only useful if they come from the very model and inputs that made the cached
features. So the texts are rebuilt exactly as extraction built them (`cache_texts`, shared with stage 2),
the backbone is loaded from the weights recorded in the cache, and the recomputed top-layer tokens must
equal the cached `text/tokens` (fp16 tolerance) and the masks must be identical; otherwise nothing is
written and the message says which (wrong weights, other tokenizer).

What changes in the file: the `text_hidden/states` dataset (attr start_layer), meta text.hidden_start_layer
and meta text_hidden (how and when they were added). Decided: meta preprocessing.text_layers and the cache
key are NOT changed; they describe the extraction that made the features, which hidden states do not
change (featcache.store.feature_signature ignores text_layers, so heads trained before still apply).
Safety: the work is done on a copy (FILE.addon.partial) renamed over FILE at the end; a killed run leaves
FILE untouched.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import h5py
import numpy as np
import torch

from ..cache.store import CacheError, CacheReader, _row_chunk
from ..sources.text import append_captions

TOKEN_ATOL = TOKEN_RTOL = 2e-2  # fp16 storage (~1e-3 relative) plus batch-composition noise, with margin


def text_source(meta: dict):
    from ..backbones.weights import WeightsSource
    w = (meta.get("weights") or {}).get("text")
    if not w:
        raise CacheError("the cache records no text weights (meta weights.text); re-extract it")
    return w["name"], WeightsSource.from_record(w)


def load_text_backbone(meta: dict, check_sha: bool = True):
    """The cache's text backbone, from the weights recorded at extraction; refuses changed weight files."""
    from ..backbones import create_text
    from ..backbones.weights import file_sha256
    name, src = text_source(meta)
    w = meta["weights"]["text"]
    if check_sha and os.path.exists(src.location) and file_sha256(src.location) != w.get("sha256"):
        raise CacheError(f"the text weights at {src.location} changed since this cache was extracted (sha256 "
                         "differs); the cache's features came from other weights")
    max_len = (meta.get("preprocessing") or {}).get("max_text_len") or (meta.get("text") or {}).get("max_len")
    model = create_text(name, src, max_len=max_len or 64).eval()
    if (meta.get("text") or {}).get("max_len") not in (None, model.max_len):
        raise CacheError(f"{name} now tokenizes to {model.max_len} positions, the cache has "
                         f"{meta['text']['max_len']}")
    return model


def cache_texts(reader: CacheReader, text_model) -> list[str]:
    """The strings the text backbone saw at extraction, rebuilt as extract._forward builds them."""
    texts = reader.strings("samples/text")
    prep = reader.meta.get("preprocessing") or {}
    if prep.get("captions") and prep.get("caption_mode") == "append":
        texts = append_captions(texts, reader.strings("samples/caption"), getattr(text_model, "tokenizer", None))
    return texts


def tokenize_cache(reader: CacheReader, text_model, chunk: int = 4096) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask for every row; the mask must equal the cached text/mask exactly."""
    texts = cache_texts(reader, text_model)
    parts = [text_model.tokenize(texts[i:i + chunk]) for i in range(0, len(texts), chunk)]
    batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    cached = torch.from_numpy(reader.array("text/mask"))
    if batch["attention_mask"].shape != cached.shape or not torch.equal(batch["attention_mask"], cached):
        bad = int((batch["attention_mask"] != cached).any(1).sum()) if batch["attention_mask"].shape == \
            cached.shape else len(texts)
        raise CacheError(f"re-tokenizing the cached texts gives other masks than the cache's text/mask "
                         f"({bad} rows differ): the tokenizer of {text_model.__class__.__name__} at the recorded "
                         "weights is not the one that made this cache")
    return batch


def trim(batch: dict[str, torch.Tensor], mask_key: str = "attention_mask") -> tuple[dict, int]:
    """Cut trailing positions that are padding in every row (exact: HF masks them, CLIP is causal)."""
    used = batch[mask_key].any(0).nonzero()
    n = int(used[-1]) + 1 if used.numel() else 1
    return {k: (v[:, :n] if v.dim() >= 2 else v) for k, v in batch.items()}, n


@torch.inference_mode()
def compute_states(text_model, tokens: dict, start: int, batch_size: int = 64, device="cpu", progress=None):
    """(hidden entering block `start`, final tokens) for every row, fp16, full max_len (zeros past a chunk's
    longest text: padding, never read unmasked). Runs the tower as extraction does (text_features)."""
    from .forward import text_features
    n, L = tokens["input_ids"].shape
    hidden = torch.zeros(n, L, text_model.token_dim, dtype=torch.float16)
    final = torch.zeros_like(hidden)
    for i in range(0, n, batch_size):
        b = {k: v[i:i + batch_size].to(device) for k, v in tokens.items()}
        out = text_features(text_model, b, keep_from=start)
        hidden[i:i + batch_size] = out["hidden"].half().cpu()
        final[i:i + batch_size] = out["tokens"].half().cpu()
        if progress:
            progress(min(n, i + batch_size))
    return hidden, final


def add_text_layers(path: str, layers: int, batch_size: int = 64, device: str = "auto", console=None,
                    progress: bool = True) -> str:
    from filelock import FileLock, Timeout
    from rich.console import Console

    from .engine import resolve_device
    say = (console or Console(stderr=True)).print
    with CacheReader(path) as r:
        meta = r.meta
        num_layers = (meta.get("text") or {}).get("num_layers")
        if num_layers is None:
            raise CacheError(f"{path} records no text num_layers; re-extract it")
        if not 1 <= layers <= num_layers:
            raise ValueError(f"--layers {layers}: the text backbone {meta['backbone']['text']} has {num_layers} "
                             f"layers (give 1..{num_layers})")
        start = num_layers - layers
        if r.has("text_hidden/states") and meta["text"].get("hidden_start_layer") == start:
            say(f"{path} already holds the hidden states entering layer {start}; nothing to do")
            return path
        lock = FileLock(path + ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise CacheError(f"another featcache command is writing {path} ({path}.lock is held)") from None
        try:
            dev = resolve_device(device)
            t0 = time.perf_counter()
            model = load_text_backbone(meta).to(dev)
            tokens = tokenize_cache(r, model)
            say(f"running {meta['backbone']['text']} once over {len(r)} texts (states entering layer {start} "
                f"of {num_layers})")
            hidden, final = compute_states(model, tokens, start, batch_size, dev)
            _check_tokens(final, torch.from_numpy(r.array("text/tokens")), tokens["attention_mask"], path,
                          "; nothing was written")
            compute_s = time.perf_counter() - t0
        except BaseException:
            _unlock(lock, path)
            raise
    try:
        _write(path, hidden.numpy(), start, layers, meta, compute_s)
    finally:
        _unlock(lock, path)
    say(f"[green]added[/] text_hidden/states {tuple(hidden.shape)} (entering layer {start}) to {path} "
        f"in {compute_s:.1f}s")
    return path


def _unlock(lock, path: str) -> None:
    lock.release()
    if not lock.is_locked and os.path.exists(path + ".lock"):  # as extract does: leave no lock file behind
        try:
            os.remove(path + ".lock")
        except OSError:
            pass


def _check_tokens(final: torch.Tensor, cached: torch.Tensor, mask: torch.Tensor, path: str, then: str = "") -> None:
    a, b = final[mask].float(), cached[mask].float()
    bad = (a - b).abs() > TOKEN_ATOL + TOKEN_RTOL * b.abs()
    if bad.any():
        raise CacheError(f"the recomputed text tokens differ from {path}'s text/tokens (max abs diff "
                         f"{(a - b).abs().max().item():.3g} at {int(bad.sum())} values): the recorded text weights "
                         f"are not the ones that made this cache (wrong weights){then}")


def _write(path: str, hidden: np.ndarray, start: int, layers: int, meta: dict, compute_s: float) -> None:
    tmp = path + ".addon.partial"
    shutil.copyfile(path, tmp)
    try:
        with h5py.File(tmp, "r+") as f:
            if "text_hidden/states" in f:
                del f["text_hidden/states"]
            ds = f.create_dataset("text_hidden/states", data=hidden,
                                  chunks=_row_chunk(hidden.shape, hidden.dtype.itemsize))
            ds.attrs["start_layer"] = start
            meta = dict(meta)
            meta["text"] = {**meta["text"], "hidden_start_layer": start}
            meta["text_hidden"] = {"layers": layers, "start_layer": start, "added_by": "featcache add-text-layers",
                                   "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "compute_s": round(compute_s, 2)}
            f.attrs["meta"] = json.dumps(meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
