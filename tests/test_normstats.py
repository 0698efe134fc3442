"""Token arrays normalised per batch from per-token statistics (heads.data.normstats).

What must hold: a normalised batch is the LayerNorm of its rows (without affine); a row first read in a short
text batch and later in a longer one gets its remaining positions filled in, giving bit for bit what a fresh
reader gives, whatever the batches it was read in before; an image view cannot be read normalised (its
statistics are not the stored row's).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from heads.data.normstats import LN_EPS, TokenStats


def _tokens(n=12, length=9, dim=16):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, length, dim, generator=g) * 3 + 1).half()
    x[:, 6:] = 0  # padding, as extraction writes it
    x[3, 4:] = 0  # one shorter text
    return x


def test_a_normalised_batch_is_the_layer_norm_of_its_rows():
    x, idx = _tokens(), torch.tensor([7, 3, 0, 11])
    got = TokenStats(len(x), x.shape[1]).normalize(x[idx, :6], idx)
    want = F.layer_norm(x[idx, :6].float(), (x.shape[-1],), eps=LN_EPS)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rows_read_again_in_a_longer_batch_are_filled_in():
    x = _tokens()
    stats = TokenStats(len(x), x.shape[1])
    first = torch.tensor([2, 5])
    stats.normalize(x[first, :3], first)  # positions 3.. of rows 2 and 5 are not known yet
    assert stats.known.tolist() == [0, 0, 3, 0, 0, 3] + [0] * 6
    idx = torch.tensor([5, 2, 8])
    got = stats.normalize(x[idx, :9], idx)
    fresh = TokenStats(len(x), x.shape[1]).normalize(x[idx, :9], idx)
    assert torch.equal(got, fresh)  # the same numbers, whatever was read before
    assert torch.equal(stats.normalize(x[idx, :2], idx), fresh[:, :2])  # a shorter batch reads what is known
    torch.testing.assert_close(got, F.layer_norm(x[idx].float(), (x.shape[-1],), eps=LN_EPS), atol=1e-5, rtol=1e-5)


def test_image_views_are_not_read_normalised(tmp_path):
    from conftest import build_synthetic_cache

    from heads.data.cache import load_cache
    data = load_cache(build_synthetic_cache(str(tmp_path / "c.h5"), n_train=20))
    with pytest.raises(ValueError, match="without image views"):
        data.batch([0, 1], normed=("image_tokens",), views=[0, 1])
    a = data.batch([0, 1], keys=("image_tokens",), normed=("image_tokens",))["image_tokens_normed"]
    b = data.batch([1, 0], keys=("image_tokens",), normed=("image_tokens",))["image_tokens_normed"]
    assert torch.equal(a, b.flip(0))  # rows do not depend on the batch they come in
