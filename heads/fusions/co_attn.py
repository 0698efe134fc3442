"""`co-attn`: co-attention, both directions, then fused.

Text tokens attend over image patches and image patches attend over the (masked) text tokens; each side is
pooled (masked mean for text, mean for image) and the classifier sees [h_t, h_i, h_t * h_i], the product
giving it an explicit agreement term. Padded text positions are excluded twice: as keys (attention mask) and
from the text pooling. A switched-off modality has zero projected tokens, so the other direction receives a
constant and the head reduces to the remaining modality's self-contained path.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from .attention import CrossAttention, by_length
from .base import FUSIONS, FusionHead, HeadConfig, HeadDims, mean_unpadded, projector, safe_mask


@FUSIONS.register("co-attn")
class CoAttnHead(FusionHead):
    """text->image and image->text attention (masked), pooled and fused"""

    inputs = ("text_tokens", "text_mask", "image_tokens")
    prenorm = ("text_tokens", "image_tokens")

    def build(self, cfg: HeadConfig, dims: HeadDims) -> int:
        self.proj_t = projector(dims.text_dim, cfg.hidden)
        self.proj_i = projector(dims.image_dim, cfg.hidden)
        self.text_to_image = CrossAttention(cfg.hidden, cfg.attn_heads)
        self.image_to_text = CrossAttention(cfg.hidden, cfg.attn_heads)
        self.norm_t, self.norm_i = nn.LayerNorm(cfg.hidden), nn.LayerNorm(cfg.hidden)
        return 3 * cfg.hidden

    def fuse(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        text, image, keep, normed = self.token_inputs(batch)
        return by_length(partial(self._pooled, normed=normed), safe_mask(batch["text_mask"]), text, image, keep), {}

    def _pooled(self, mask, text, image, keep, normed) -> torch.Tensor:
        t, i = self.project_tokens(text, image, keep, normed)
        t2 = self.text_to_image(t, i)
        i2 = self.image_to_text(i, t, mask)
        ht = mean_unpadded(self.norm_t(t2), mask)
        hi = self.norm_i(i2).mean(1)
        return torch.cat([ht, hi, ht * hi], dim=-1)
