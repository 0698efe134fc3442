"""The cache's text tower, as stage 2 needs it: the backbone that made the features, its inputs, and the check
that the two still agree. `heads` import this module (with featcache.cache, registry, env and device) to train;
the extraction code only to predict raw data (heads.predict.extract_for_run, featcache.extract.engine).

Trust: stored hidden states and fine-tuned text layers are only useful with the very model and inputs that made
the cached features. So the texts are rebuilt exactly as extraction built them (`cache_texts`), the backbone is
loaded from the weights recorded in the cache (`load_text_backbone` refuses changed weight files), re-tokenizing
must reproduce the cached masks (`tokenize_cache`), and recomputed top-layer tokens must equal the cached
`text/tokens` to fp16 tolerance (`check_tokens`).
"""
from __future__ import annotations

import os

import torch

from .cache.store import CacheError, CacheReader
from .digest import file_sha256
from .sources.text import append_captions

TOKEN_ATOL = TOKEN_RTOL = 2e-2  # fp16 storage (~1e-3 relative) plus batch-composition noise, with margin


def load_text_backbone(meta: dict, check_sha: bool = True):
    """The cache's text backbone, from the weights recorded at extraction; refuses changed weight files."""
    # heavy: the backbone registry imports every family (torchvision, timm, ...); only stage 2 builds one
    from .backbones import create_text
    from .backbones.weights import WeightsSource
    w = (meta.get("weights") or {}).get("text")
    if not w:
        raise CacheError("the cache records no text weights (meta weights.text); re-extract it")
    name, src = w["name"], WeightsSource.from_record(w)
    if check_sha and os.path.exists(src.location) and file_sha256(src.location) != w.get("sha256"):
        raise CacheError(f"the text weights at {src.location} changed since this cache was extracted (sha256 "
                         "differs); the cache's features came from other weights")
    max_len = (meta.get("preprocessing") or {}).get("max_text_len") or (meta.get("text") or {}).get("max_len")
    pooling = (meta.get("preprocessing") or {}).get("text_pooling") or ""
    model = create_text(name, src, max_len=max_len or 64, pooling=pooling).eval()
    if (meta.get("text") or {}).get("max_len") not in (None, model.max_len):
        raise CacheError(f"{name} now tokenizes to {model.max_len} positions, the cache has "
                         f"{meta['text']['max_len']}")
    return model


def encoded_texts(texts: list[str], captions: list[str] | None, meta: dict, text_model) -> list[str]:
    """The strings the text backbone saw at extraction (text, or `text [SEP] caption` with --caption-mode
    append), rebuilt from a cache's texts and captions as featcache.extract.forward builds them."""
    prep = meta.get("preprocessing") or {}
    if prep.get("captions") and prep.get("caption_mode") == "append":
        return append_captions(texts, captions, getattr(text_model, "tokenizer", None))
    return texts


def text_inputs(texts: list[str], targets: list[str] | None, text_model) -> list:
    """What `text_model.tokenize` takes for these rows: the texts, or with targets (Twitter: the label belongs to
    the target) each text with its target as the second segment: (text, target) pairs for the tokenizer's pair
    input (`sentence [SEP] target`), or joined as captions are appended when the backbone has no pair input
    (CLIP: `sentence . target`). Extraction and stage 2 both call this, so the inputs match."""
    if targets is None:
        return texts
    if getattr(text_model, "pair_input", False):
        return list(zip(texts, targets))
    return append_captions(texts, targets, getattr(text_model, "tokenizer", None))


def tokenize_texts(texts: list[str], cached_mask: torch.Tensor, text_model,
                   chunk: int = 4096, targets: list[str] | None = None) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask for every row (with `targets`: as text_inputs pairs them); the mask must equal
    the cached text/mask exactly."""
    texts = text_inputs(texts, targets, text_model)
    parts = [text_model.tokenize(texts[i:i + chunk]) for i in range(0, len(texts), chunk)]
    batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    mask = batch["attention_mask"]
    if mask.shape != cached_mask.shape or not torch.equal(mask, cached_mask):
        bad = int((mask != cached_mask).any(1).sum()) if mask.shape == cached_mask.shape else len(texts)
        raise CacheError(f"re-tokenizing the cached texts gives other masks than the cache's text/mask "
                         f"({bad} rows differ): the tokenizer of {text_model.__class__.__name__} at the recorded "
                         "weights is not the one that made this cache")
    return batch


def require_texts(reader, what: str) -> None:
    """CacheError naming the missing texts when the cache was made without them (--no-text, strip-text)."""
    if not reader.has("samples/text"):
        raise CacheError(f"{reader.path} holds no texts (samples/text, samples/raw_text: it was extracted with "
                         f"--no-text or stripped by `featcache strip-text`), and {what} re-tokenizes them. Use the "
                         "cache the texts were stripped from, or extract the dataset again without --no-text")


def cache_targets(reader) -> list[str] | None:
    """The rows' targets (samples/target, written when the dataset has them: Twitter), else None."""
    return reader.strings("samples/target") if reader.has("samples/target") else None


def tokenize_cache(reader: CacheReader, text_model, what: str = "this command") -> dict[str, torch.Tensor]:
    """tokenize_texts over every row of an open cache (its texts, captions and targets)."""
    require_texts(reader, what)
    captions = reader.strings("samples/caption") if reader.has("samples/caption") else None
    texts = encoded_texts(reader.strings("samples/text"), captions, reader.meta, text_model)
    return tokenize_texts(texts, torch.from_numpy(reader.array("text/mask")), text_model,
                          targets=cache_targets(reader))


def trim(batch: dict[str, torch.Tensor], mask_key: str = "attention_mask") -> tuple[dict, int]:
    """Cut trailing positions that are padding in every row (exact: HF masks them, CLIP is causal)."""
    used = batch[mask_key].any(0).nonzero()
    n = int(used[-1]) + 1 if used.numel() else 1
    return {k: (v[:, :n] if v.dim() >= 2 else v) for k, v in batch.items()}, n


def check_tokens(final: torch.Tensor, cached: torch.Tensor, mask: torch.Tensor, path: str, then: str = "") -> None:
    """Raise CacheError unless recomputed top-layer tokens `final` equal the cached ones where `mask` is set."""
    a, b = final[mask].float(), cached[mask].float()
    bad = (a - b).abs() > TOKEN_ATOL + TOKEN_RTOL * b.abs()
    if bad.any():
        raise CacheError(f"the recomputed text tokens differ from {path}'s text/tokens (max abs diff "
                         f"{(a - b).abs().max().item():.3g} at {int(bad.sum())} values): the recorded text weights "
                         f"are not the ones that made this cache (wrong weights){then}")
