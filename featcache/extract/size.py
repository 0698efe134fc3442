"""The size of the cache `featcache extract` is about to write, known before any model loads.

Each backbone family reads its widths from config files (featcache.backbones.registry.planned_dims: an HF
config.json, open_clip's model config, timm on the meta device, a table for the CNNs), so a ViT-L/14 at 336 px
(576 x 1024 fp16 per image) announces its gigabytes, and a disk without room for them fails, before the hour
of loading and running the model. The arrays are those of featcache.cache.store (fp16 tokens, fp32 pooled).
"""
from __future__ import annotations

from ..backbones.base import budget_grid
from ..backbones.registry import get_backbone_spec, planned_dims
from ..backbones.weights import WeightsSource
from ..info import human_bytes
from ..outdir import check_room  # the check before any model loads; CacheWriter checks the exact shapes

FP16, FP32 = 2, 4
HEADROOM = 1.05  # strings, HDF5 metadata and chunk padding on top of the feature arrays


def planned_bytes(plan) -> tuple[int, str] | None:
    """(bytes of the feature arrays, a one-line breakdown), or None when a backbone's widths are unknown."""
    cfg, w, n = plan.cfg, plan.weights, len(plan.ds.samples)
    text = planned_dims(w["text"]["name"], WeightsSource.from_record(w["text"]), "text")
    image = planned_dims(w["image"]["name"], WeightsSource.from_record(w["image"]), "image", cfg.image_size)
    if text is None or image is None:
        return None
    # HF encoders keep --max-text-len positions (capped by the model); CLIP always its context length
    hf = get_backbone_spec(w["text"]["name"]).family.name == "hf_text"
    L = min(cfg.max_text_len, text[0]) if hf else text[0]
    P = image[0]
    if cfg.max_image_tokens and P > cfg.max_image_tokens:
        side = int(round(P ** 0.5))
        h, w2 = budget_grid((side, side), cfg.max_image_tokens)
        P = h * w2
    text_b = L * text[1] * FP16 * (2 if cfg.text_layers else 1) + L + text[2] * FP32
    image_b = (P * image[1] * FP16 + image[2] * FP32) * (1 + cfg.image_views)
    line = (f"{n} rows x (text {L} x {text[1]} fp16{' x 2 (states)' if cfg.text_layers else ''} + image {P} x "
            f"{image[1]} fp16{f' x {1 + cfg.image_views} views' if cfg.image_views else ''})")
    return n * (text_b + image_b), line


def announce(plan, say) -> None:
    """Print the size about to be written; refuse (outdir.DiskSpaceError) when the output's disk cannot hold it."""
    planned = planned_bytes(plan)
    if planned is None:
        say("cache size: known once the backbones load (their widths are not in a config file)")
        return
    nbytes, line = planned
    say(f"writing {plan.out}: about {human_bytes(nbytes)} ({line})")
    check_room(plan.out, nbytes * HEADROOM, "free some space, choose another --out, or store fewer tokens "
               "(--max-image-tokens, --max-text-len)")
