"""One pre-norm cross-attention layer: queries from one modality, keys/values from the other, residual.

There is deliberately no per-token feed-forward block: on 2 CPU cores it costs as much as the attention
projections, and every head pools the tokens and applies an MLP classifier right after, which is where
the non-linearity goes.

Written on top of `F.scaled_dot_product_attention` with a boolean key mask: masked keys get exactly zero
weight, so padded text positions cannot change any output, however large their (garbage) values are.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CrossAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm_q, self.norm_kv = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B,Lq,H) attends over ctx (B,Lk,H); ctx_mask (B,Lk) bool, True = may be attended to."""
        B, Lq, H = x.shape
        Lk, nh = ctx.shape[1], self.heads
        q = self.q(self.norm_q(x)).view(B, Lq, nh, H // nh).transpose(1, 2)
        k, v = self.kv(self.norm_kv(ctx)).view(B, Lk, 2, nh, H // nh).permute(2, 0, 3, 1, 4)
        if ctx_mask is not None:
            # Zero the padded values too: weights are exactly 0 there, but 0 * inf would still be NaN.
            v = v.masked_fill(~ctx_mask[:, None, :, None], 0.0)
            ctx_mask = ctx_mask[:, None, None, :]  # broadcast over heads and queries
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return x + self.drop(self.out(att.transpose(1, 2).reshape(B, Lq, H)))
