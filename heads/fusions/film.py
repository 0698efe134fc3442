"""`film`: text-conditioned FiLM (Perez et al., 2018) on the image patch tokens.

The pooled text embedding produces a per-channel scale and shift (gamma, beta) that modulate every projected
image patch token; the modulated tokens are pooled and classified:

    x_p = LN(W_i img_p),   (gamma, beta) = W_f gelu(W_t text),   h = mean_p gelu(x_p * (1 + gamma) + beta)

The FiLM layer starts at zero so training begins from the plain image model (identity modulation) and the
text learns what to change. With the image switched off the tokens are zero and h = gelu(beta(text)): a
text-only model. With the text switched off its projection is zero and (gamma, beta) reduce to the learned
biases: a fixed modulation, i.e. an image-only model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import FUSIONS, NORMED, FusionHead, HeadConfig, HeadDims, project, projector


@FUSIONS.register("film")
class FiLMHead(FusionHead):
    """pooled text -> FiLM scale/shift of the image patch tokens, then pool"""

    inputs = ("text_pooled", "image_tokens")
    prenorm = ("image_tokens",)

    def build(self, cfg: HeadConfig, dims: HeadDims) -> int:
        self.proj_t = projector(dims.text_pooled_dim, cfg.hidden)
        self.proj_i = projector(dims.image_dim, cfg.hidden)
        self.norm_i = nn.LayerNorm(cfg.hidden)
        self.film = nn.Linear(cfg.hidden, 2 * cfg.hidden)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        return cfg.hidden

    def fuse(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        tokens = batch.get("image_tokens" + NORMED, batch.get("image_tokens"))
        keep_t, keep_i = self.modality_keep(tokens.shape[0], tokens.device)
        t = F.gelu(self.proj_t(batch["text_pooled"])) * keep_t[:, None]
        gamma, beta = self.film(t).unsqueeze(1).chunk(2, dim=-1)
        x = self.norm_i(project(self.proj_i, batch, "image_tokens")) * keep_i[:, None, None] if self.active("image") else \
            tokens.new_zeros(*tokens.shape[:2], self.cfg.hidden, dtype=torch.float)
        # GELU, not ReLU: with the image off x = 0 and the zero-initialised FiLM gives beta = 0, where ReLU's
        # gradient is 0 and the text-only model would never learn; GELU'(0) = 0.5.
        return F.gelu(x * (1 + gamma) + beta).mean(1), {}  # image tokens have no padding: a plain mean
