"""`gmu`: Gated Multimodal Unit (Arevalo et al., 2017) on the pooled vectors.

    h_t = tanh(W_t t),  h_i = tanh(W_i i),  z = sigmoid(W_z [t; i]),  h = z * h_t + (1 - z) * h_i

z is per hidden unit; its mean over units is exported per sample as "gate" (1 = all text, 0 = all image),
which is what the gate histograms in the run directory show. A missing modality has no say: the gate is
forced to give the present modality full weight (z = 1 when only text is kept, z = 0 when only image),
so the gate statistics stay interpretable under modality dropout and single-modality runs.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import FUSIONS, FusionHead, HeadConfig, HeadDims, projector


@FUSIONS.register("gmu")
class GMUHead(FusionHead):
    """gated multimodal unit on pooled vectors; exports the per-sample gate"""

    inputs = ("text_pooled", "image_pooled")

    def build(self, cfg: HeadConfig, dims: HeadDims) -> int:
        self.proj_t = projector(dims.text_pooled_dim, cfg.hidden)
        self.proj_i = projector(dims.image_pooled_dim, cfg.hidden)
        self.gate = nn.Linear(2 * cfg.hidden, cfg.hidden)
        return cfg.hidden

    def fuse(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        t, i = batch["text_pooled"], batch["image_pooled"]
        keep_t, keep_i = (k[:, None] for k in self.modality_keep(t.shape[0], t.device))
        xt, xi = self.proj_t(t) * keep_t, self.proj_i(i) * keep_i
        z = torch.sigmoid(self.gate(torch.cat([xt, xi], dim=-1)))
        z = z * keep_t * keep_i + keep_t * (1 - keep_i)  # both kept: learned; one kept: that one gets all
        h = z * torch.tanh(xt) + (1 - z) * torch.tanh(xi)
        return h, {"gate": z.mean(-1)}
