"""Token arrays LayerNorm-normalised per batch from per-token statistics kept beside the array.

The heads' projectors start with a LayerNorm (heads.fusions.base.Projector), and CPU training reads the token
arrays already normalised without the affine (FusionHead.prenorm; the affine is folded into the Linear). A
normalised copy of the arrays would double the memory of a load (#21), so the batcher normalises every batch.
LayerNorm on the stored fp16 rows is slow on the CPU, though: for a batch of 128 tweets it took 1.3 ms per token
array, against 0.33 ms for an fp32 copy, one subtraction and one multiplication in place (measured on this
machine). The statistics are per token (a mean and 1/std over the feature dim), tiny beside the array (8 bytes
per token against 2 x 384 or 2 x 320), and do not depend on which rows share a batch.

So `TokenStats` keeps them for every row of one array and fills them in as batches first read the rows (the
first epoch, or the first inference pass, pays a LayerNorm on them once):

    x_hat[r, l] = (x[r, l] - mean[r, l]) * rstd[r, l]          rstd = 1 / sqrt(var + eps), as nn.LayerNorm

A text batch is cut to its longest text; a row's statistics are known up to the length of the longest batch
that read it, and are filled further when a longer batch reads it. In memory and streamed (heads.data.stream)
alike: each token's statistics come from its own values only, so both give the same batches bit for bit.
"""
from __future__ import annotations

import torch

LN_EPS = 1e-5  # nn.LayerNorm's default, which every head's projector uses


class TokenStats:
    """The per-token LayerNorm mean and 1/std of one (N, L, D) token array, filled in row by row."""

    def __init__(self, rows: int, positions: int):
        self.mean = torch.zeros(rows, positions)
        self.rstd = torch.zeros(rows, positions)
        self.known = torch.zeros(rows, dtype=torch.long)  # per row: positions [0, known) are filled in

    def normalize(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Rows idx (B,) of the array, gathered as stored and cut to `x.shape[1]` positions: (B, L, D) fp32,
        each token normalised over D without affine."""
        length, y = x.shape[1], x.float()
        todo = self.known.index_select(0, idx) < length
        if todo.any():  # rows read for the first time, or only in shorter batches so far
            new = todo.all()
            rows = idx if new else idx[todo]
            _, mean, rstd = torch.native_layer_norm(y if new else y[todo], x.shape[-1:], None, None, LN_EPS)
            self.mean[rows, :length] = mean.squeeze(-1)
            self.rstd[rows, :length] = rstd.squeeze(-1)
            self.known[rows] = length
        mean = self.mean[:, :length].index_select(0, idx).unsqueeze(-1)
        rstd = self.rstd[:, :length].index_select(0, idx).unsqueeze(-1)
        return y.sub_(mean).mul_(rstd)
