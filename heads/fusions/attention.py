"""One pre-norm cross-attention layer: queries from one modality, keys/values from the other, residual.

There is deliberately no per-token feed-forward block: on 2 CPU cores it costs as much as the attention
projections, and every head pools the tokens and applies an MLP classifier right after, which is where
the non-linearity goes. For the same reason there is no dropout inside the block (neither on the attention
weights nor on its output): CPU dropout draws one random number per element (~16 ns each, measured), and the
(B, heads, Lq, Lk) weights and (B, Lq, H) outputs are the largest tensors of a step, so token-level dropout
cost about a third of the training time. The heads' classifiers keep dropout on the pooled vectors.

The attention is written out (matmul, masked_fill(-inf), softmax, matmul) rather than calling
`F.scaled_dot_product_attention`: at these tiny sizes (Lq ~ 60, Lk ~ 50, 32 per head) the explicit form is
as fast in fp32 and several times faster under bf16 autocast, where the fused CPU kernel is slow. A boolean
key mask gives masked keys exactly zero weight, so padded text positions cannot change any output, however
large their (garbage) values are.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CrossAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_kv = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B,Lq,H) attends over ctx (B,Lk,H); ctx_mask (B,Lk) bool, True = may be attended to."""
        B, Lq, H = x.shape
        Lk, nh = ctx.shape[1], self.heads
        q = self.q(self.norm_q(x)).view(B, Lq, nh, H // nh).transpose(1, 2)
        k, v = self.kv(self.norm_kv(ctx)).view(B, Lk, 2, nh, H // nh).permute(2, 0, 3, 1, 4)
        scores = torch.matmul(q * (H // nh) ** -0.5, k.transpose(-1, -2))  # (B, nh, Lq, Lk); q is the smaller
        if ctx_mask is not None:
            # Zero the padded values too: weights are exactly 0 there, but 0 * inf would still be NaN.
            v = v.masked_fill(~ctx_mask[:, None, :, None], 0.0)
            scores = scores.masked_fill(~ctx_mask[:, None, None, :], float("-inf"))  # callers pass safe_mask
        # Softmax in the scores' dtype: the CPU kernel accumulates bf16 in fp32 anyway, and the weights were
        # rounded to bf16 for the next matmul before; the fp32 round trip was two copies of the largest tensor.
        att = torch.matmul(F.softmax(scores, dim=-1).to(v.dtype), v)
        return x + self.out(att.transpose(1, 2).reshape(B, Lq, H))


def by_length(fn, mask: torch.Tensor, text: torch.Tensor, image: torch.Tensor, keep: torch.Tensor | None,
              groups: int = 4) -> torch.Tensor:
    """fn(mask, text, image, keep) -> (B, W), computed on `groups` sets of rows of similar text length, each cut to
    its own longest text, and put back in the original order.

    A batch is padded to its longest tweet (often the 64-token maximum; the median is ~30), and every text
    position costs the projection, the attention's scores, softmax and outputs. Rows are independent in every
    head (no batch statistics; dropout comes after fn), so grouping changes nothing but float rounding, and it
    removes most of the padding before anything is computed: text (B, L, D) is cut per group, image (B, P, D)
    and keep (B, 2) only split. Cutting beats packing the real tokens (boolean indexing): the gather, the zero
    fill and the scatter back cost more than the few padded positions left in a group.
    On a GPU it runs once on the whole batch: the group lengths would be a host sync per step."""
    B, L = mask.shape
    if mask.is_cuda or B < 2 * groups:
        return fn(mask, text, image, keep)
    last = (torch.arange(1, L + 1, device=mask.device) * mask).amax(1)  # used positions per row
    order = last.argsort()
    parts = []
    for rows in order.tensor_split(groups):
        n = int(last[rows[-1]])  # sorted: the group's last row is its longest
        parts.append(fn(mask[rows, :n], text[rows, :n], image[rows], None if keep is None else keep[rows]))
    return torch.cat(parts).index_select(0, order.argsort())
