"""Stage 2's inputs on the loaded cache: token ids for the top N text layers and the states they start from.

    data = load_cache(path, keys=(..., "text_states"), texts=True)
    data = with_text_inputs(data, text_model, text_layers=N)

adds `input_ids` (the cache texts re-tokenized exactly as extraction tokenized them; their mask must equal
the cache's text/mask, which then is the attention mask too) and, in "cached" mode, leaves `text_states`
holding the states entering layer L-N (`start_layer`). Both are per-row arrays like any other feature, so
CacheData.batch gathers and trims them with the rest; no second batcher, no second read of the file.

The cache's text_hidden/states may start lower than L-N (extracted with more --text-layers than are unfrozen
now): the frozen layers in between run ONCE here, without autograd, and their output is what training reads.
The frozen lower layers therefore never run inside the training loop. Without usable stored states the
whole text tower runs every step ("full" mode) and a message says so.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from featcache.cache.store import CacheError, cache_precision
from featcache.device import precision_autocast
from featcache.errors import ConfigError
from featcache.text_tower import check_tokens, encoded_texts, tokenize_texts

from .cache import CacheData

IMAGE_KEYS = ("image_tokens", "image_pooled")
TEXT_FORWARDS = ("cached", "full")
FALLBACK = ("{path} has no text_hidden/states covering the top {n} text layers ({why}); falling back to the "
            "full text forward every step (slower). Add them once with `featcache add-text-layers {path} "
            "--layers {n}`.")


def stage2_keys(mode: str = "cached") -> tuple[str, ...]:
    """What load_cache must read for the text layers besides the head's inputs (with texts=True): the cached
    tokens and mask (checks), and the stored states unless the whole tower runs anyway."""
    return ("text_tokens", "text_mask") + (("text_states",) if mode == "cached" else ())


def with_text_inputs(data: CacheData, text_model, text_layers: int, mode: str = "cached", device="cpu",
                     say=print, batch_size: int = 128) -> CacheData:
    """`data` plus `input_ids`, and in 'cached' mode `text_states` entering layer L-N (see module docstring).
    Without usable states the result has no `text_states` (start_layer None): the full text forward."""
    target = text_model.num_layers - text_layers
    features = {**data.features, "input_ids": _tokenize(data, text_model)}
    start, has = data.start_layer, "text_states" in data.features
    if mode == "cached" and not (has and start <= target):
        why = "none stored" if not has else f"they enter layer {start}, above {target}"
        say(FALLBACK.format(path=data.path, n=text_layers, why=why))
        mode = "full"
    if mode == "full":
        features.pop("text_states", None)
        return replace(data, features=features, start_layer=None)
    out = replace(data, features=features)
    if start < target:
        say(f"running frozen text layers {start}..{target - 1} once over {len(data)} rows (the cache's states "
            f"enter layer {start}; the top {text_layers} train)")
        states = run_frozen(text_model, out, start, target, batch_size, device)
        out = replace(out, features={**features, "text_states": states}, start_layer=target)
    _verify(text_model, out, device)
    return out


def _tokenize(data: CacheData, text_model) -> torch.Tensor:
    """input_ids for every row, from the strings the text backbone saw at extraction (featcache.text_tower
    rebuilds them as extraction did); the re-tokenized mask must be the cache's."""
    if data.texts is None:
        raise ConfigError("stage 2 needs the cache texts: load the cache with load_cache(..., texts=True)")
    texts = encoded_texts(data.texts, data.captions, data.meta, text_model)
    return tokenize_texts(texts, data.features["text_mask"], text_model, targets=data.targets)["input_ids"]


def text_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch a text backbone's layers read (its attention mask is the cache's text mask)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["text_mask"]}


@torch.no_grad()
def run_frozen(text_model, data: CacheData, start: int, stop: int, batch_size: int, device) -> torch.Tensor:
    """States entering layer `stop` from the stored ones entering `start`; fp16 like the cache, zeros in cut
    padding. On CUDA in the cache's precision (fp16 autocast for a cache extracted on a GPU), as extraction
    would have computed them; on the CPU in fp32 (check_tokens' tolerance covers the difference)."""
    device = torch.device(device)
    precision = cache_precision(data.meta) if device.type == "cuda" else "fp32"
    states = data.features["text_states"]
    out = torch.zeros_like(states)
    for i in range(0, states.shape[0], batch_size):
        b = data.batch(torch.arange(i, min(i + batch_size, states.shape[0])), device,
                       ("text_states", "input_ids", "text_mask"))
        h = b["text_states"]
        with precision_autocast(precision, device):
            h = text_model.run_blocks(h, text_batch(b), start, stop)
        out[i:i + batch_size, :h.shape[1]] = h.half().cpu()
    return out


@torch.no_grad()
def _verify(text_model, data: CacheData, device, rows: int = 64) -> None:
    """The top layers on the stored states must give the cached tokens: catches states or weights that do not
    belong to this cache before any training."""
    idx = torch.arange(min(rows, len(data)))
    b = data.batch(idx, device, ("text_states", "input_ids", "text_mask"))
    was = text_model.training
    text_model.eval()
    out = text_model.forward_layers(b["text_states"], text_batch(b), data.start_layer)
    text_model.train(was)
    n = out["tokens"].shape[1]
    try:
        check_tokens(out["tokens"].cpu(), data.features["text_tokens"][idx, :n], b["text_mask"].cpu(), data.path)
    except CacheError as exc:
        raise CacheError(f"{exc} (checked the top {text_model.num_layers - data.start_layer} text layers on the "
                         "stored text_hidden/states)") from None
