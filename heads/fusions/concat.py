"""`concat`: the baseline. Pooled text ‖ pooled image -> LayerNorm -> MLP.

Each pooled vector gets its own LayerNorm before the concatenation (rather than one LayerNorm over the
joint vector): a 1280-d CNN embedding would otherwise dominate a 384-d sentence embedding by sheer size and
scale. A switched-off or dropped modality is an all-zero block of the concatenation.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import FusionHead, HeadConfig, classifier


class ConcatHead(FusionHead):
    inputs = ("text_pooled", "image_pooled")

    def __init__(self, cfg: HeadConfig):
        super().__init__(cfg)
        self.norm_t = nn.LayerNorm(cfg.text_pooled_dim)
        self.norm_i = nn.LayerNorm(cfg.image_pooled_dim)
        self.mlp = classifier(cfg.text_pooled_dim + cfg.image_pooled_dim, cfg.hidden, cfg.num_classes,
                              cfg.dropout)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t, i = batch["text_pooled"], batch["image_pooled"]
        keep_t, keep_i = self.modality_keep(t.shape[0], t.device)
        x = torch.cat([self.norm_t(t) * keep_t[:, None], self.norm_i(i) * keep_i[:, None]], dim=-1)
        return {"logits": self.mlp(x)}
