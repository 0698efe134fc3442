"""`concat`: the baseline. Pooled text ‖ pooled image -> LayerNorm -> MLP.

Each pooled vector gets its own LayerNorm before the concatenation (rather than one LayerNorm over the
joint vector): a 1280-d CNN embedding would otherwise dominate a 384-d sentence embedding by sheer size and
scale. A switched-off or dropped modality is an all-zero block of the concatenation.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import FUSIONS, FusionHead, HeadConfig, HeadDims


@FUSIONS.register("concat")
class ConcatHead(FusionHead):
    """pooled text ‖ pooled image -> LayerNorm -> MLP (baseline)"""

    inputs = ("text_pooled", "image_pooled")

    def build(self, cfg: HeadConfig, dims: HeadDims) -> int:
        self.norm_t = nn.LayerNorm(dims.text_pooled_dim)
        self.norm_i = nn.LayerNorm(dims.image_pooled_dim)
        return dims.text_pooled_dim + dims.image_pooled_dim

    def fuse(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        t, i = batch["text_pooled"], batch["image_pooled"]
        keep_t, keep_i = self.modality_keep(t.shape[0], t.device)
        return torch.cat([self.norm_t(t) * keep_t[:, None], self.norm_i(i) * keep_i[:, None]], dim=-1), {}
