"""`cross-attn`: text tokens (queries) attend over image patch tokens (keys/values); text mask pools.

Each text token gathers the image evidence relevant to it; the fused token states are averaged over the
real (unpadded) text positions only. Padded text positions are queries whose outputs are dropped by the
masked mean, so their values never matter. With the image switched off the patch tokens are zero and every
query receives the same constant: the head reduces to a token-level text model. With the text switched off
all queries are equal and the result is an attention-weighted pool of the image patches.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from .attention import CrossAttention, by_length
from .base import FUSIONS, FusionHead, HeadConfig, HeadDims, mean_unpadded, projector, safe_mask


@FUSIONS.register("cross-attn")
class CrossAttnHead(FusionHead):
    """text tokens attend over image patches; masked text pooling"""

    inputs = ("text_tokens", "text_mask", "image_tokens")
    prenorm = ("text_tokens", "image_tokens")

    def build(self, cfg: HeadConfig, dims: HeadDims) -> int:
        self.proj_t = projector(dims.text_dim, cfg.hidden)
        self.proj_i = projector(dims.image_dim, cfg.hidden)
        self.block = CrossAttention(cfg.hidden, cfg.attn_heads)
        self.norm = nn.LayerNorm(cfg.hidden)
        return cfg.hidden

    def fuse(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        text, image, keep, normed = self.token_inputs(batch)
        return by_length(partial(self._pooled, normed=normed), safe_mask(batch["text_mask"]), text, image, keep), {}

    def _pooled(self, mask, text, image, keep, normed) -> torch.Tensor:
        t, i = self.project_tokens(text, image, keep, normed)
        x = self.block(t, i)  # image patches are all valid: no key mask
        return mean_unpadded(self.norm(x), mask)
