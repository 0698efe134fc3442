"""`featcache add-text-layers FILE --layers N`: add stage-2 hidden states to an existing cache.

Stage 2 (`heads finetune --unfreeze-text N`) runs only the top N text blocks, on the hidden states that
enter block start_layer = L-N (`text_hidden/states`). `featcache extract --text-layers N` stores them while
extracting; this command computes them for a cache made without them, running only the text backbone (no image
decoding, no image tower), once. The backbone, its inputs and the check that it reproduces the cached tokens
come from featcache.text_tower: otherwise nothing is written and the message says what differs.

What changes in the file: the `text_hidden/states` dataset (attr start_layer), meta text.start_layer and meta
text_hidden (how and when they were added). Decided: meta preprocessing.text_layers and the cache key are NOT
changed; they describe the extraction that made the features, which hidden states do not change
(featcache.cache.store.feature_signature ignores text_layers, so heads trained before still apply).
Precision: the states are computed as the cache's features were (fp16 autocast for a cache extracted on CUDA,
fp32 otherwise: featcache.device.precision_autocast), so they match the cached tokens; an fp16 cache needs a
CUDA device here.
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
from filelock import FileLock, Timeout
from rich.console import Console

from ..cache.store import CacheError, CacheReader, cache_precision, row_chunk
from ..device import precision_autocast, resolve_device
from ..errors import ConfigError
from ..outdir import check_room, check_writable, write_failed
from ..text_tower import check_tokens, load_text_backbone, require_texts, tokenize_cache
from .forward import TEXT_CHUNK, text_features


@torch.inference_mode()
def compute_states(text_model, tokens: dict, start_layer: int, batch_size: int = 64, device="cpu", progress=None,
                   precision: str = "fp32"):
    """(hidden entering block `start_layer`, final tokens) for every row, fp16, full max_len (zeros past a
    chunk's longest text: padding, never read unmasked). Runs the tower as extraction does (text_features, in
    `precision`: the cache's; whole batches on CUDA, as extraction runs them there)."""
    device = torch.device(device)
    n, L = tokens["input_ids"].shape
    hidden = torch.zeros(n, L, text_model.token_dim, dtype=torch.float16)
    final = torch.zeros_like(hidden)
    for i in range(0, n, batch_size):
        b = {k: v[i:i + batch_size].to(device) for k, v in tokens.items()}
        with precision_autocast(precision, device):
            out = text_features(text_model, b, start_layer=start_layer,
                                chunk=batch_size if device.type == "cuda" else TEXT_CHUNK)
        hidden[i:i + batch_size] = out["hidden"].half().cpu()
        final[i:i + batch_size] = out["tokens"].half().cpu()
        if progress:
            progress(min(n, i + batch_size))
    return hidden, final


def add_text_layers(path: str, text_layers: int, batch_size: int = 64, device: str = "auto", console=None,
                    progress: bool = True) -> str:
    say = (console or Console(stderr=True)).print
    with CacheReader(path) as r:
        meta = r.meta
        num_layers = (meta.get("text") or {}).get("num_layers")
        if num_layers is None:
            raise CacheError(f"{path} records no text num_layers; re-extract it")
        if not 1 <= text_layers <= num_layers:
            raise ConfigError(f"--layers {text_layers}: the text backbone {meta['backbone']['text']} has "
                             f"{num_layers} layers (give 1..{num_layers})")
        start_layer = num_layers - text_layers
        require_texts(r, "`featcache add-text-layers`")  # before any model loads
        if r.has("text_hidden/states") and r.start_layer == start_layer:
            say(f"{path} already holds the hidden states entering layer {start_layer}; nothing to do")
            return path
        check_writable(path, "the cache")  # it is rewritten beside itself (a .addon.partial copy)
        states = np.prod(r.datasets()["text/tokens"][0], dtype=np.int64) * 2  # fp16, the tokens' shape
        check_room(path + ".addon.partial", 1.05 * (os.path.getsize(path) + states),
                   "free some space (the cache is copied with the states added, then replaces it)")
        lock = FileLock(path + ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise CacheError(f"another featcache command is writing {path} ({path}.lock is held)") from None
        except OSError as exc:  # the folder turned read-only since check_writable: name the lock file
            err = write_failed(exc, path + ".lock", "make the folder writable")
            if err is None:
                raise
            raise err from exc
        try:
            dev, precision = resolve_device(device), cache_precision(meta)
            precision_autocast(precision, dev)  # an fp16 cache on the CPU: refused before the model loads
            t0 = time.perf_counter()
            model = load_text_backbone(meta).to(dev)
            tokens = tokenize_cache(r, model, "`featcache add-text-layers`")
            say(f"running {meta['backbone']['text']} once over {len(r)} texts (states entering layer "
                f"{start_layer} of {num_layers})")
            hidden, final = compute_states(model, tokens, start_layer, batch_size, dev, precision=precision)
            check_tokens(final, torch.from_numpy(r.array("text/tokens")), tokens["attention_mask"], path,
                         "; nothing was written")
            compute_s = time.perf_counter() - t0
        except BaseException:
            _unlock(lock, path)
            raise
    try:
        _write(path, hidden.numpy(), start_layer, text_layers, meta, compute_s)
    finally:
        _unlock(lock, path)
    say(f"[green]added[/] text_hidden/states {tuple(hidden.shape)} (entering layer {start_layer}) to {path} "
        f"in {compute_s:.1f}s")
    return path


def _unlock(lock, path: str) -> None:
    lock.release()
    if not lock.is_locked and os.path.exists(path + ".lock"):  # as extract does: leave no lock file behind
        try:
            os.remove(path + ".lock")
        except OSError:
            pass


def _write(path: str, hidden: np.ndarray, start_layer: int, text_layers: int, meta: dict, compute_s: float) -> None:
    tmp = path + ".addon.partial"
    try:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r+") as f:
            if "text_hidden/states" in f:
                del f["text_hidden/states"]
            ds = f.create_dataset("text_hidden/states", data=hidden,
                                  chunks=row_chunk(hidden.shape, hidden.dtype.itemsize))
            ds.attrs["start_layer"] = start_layer
            meta = dict(meta)  # the reader's: in today's form (featcache.cache.store.upgrade_meta)
            meta["text"] = {**meta["text"], "start_layer": start_layer}
            meta["text_hidden"] = {"text_layers": text_layers, "start_layer": start_layer,
                                   "added_by": "featcache add-text-layers",
                                   "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "compute_s": round(compute_s, 2)}
            f.attrs["meta"] = json.dumps(meta)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        err = write_failed(exc, tmp, f"{path} is unchanged; free some space (or fix the disk) and run the "
                           "command again")
        if err is None:  # not a disk's fault (or Ctrl-C): as it is
            raise
        raise err from exc
