"""Heads that read text tokens train on batches of similar text length and infer in length order (#17): the
order is still a seeded permutation of every training row, batches really get shorter, and predictions do not
depend on it beyond float rounding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from heads.data.cache import GROUP_BATCHES, length_grouped, load_cache
from heads.fusions import HeadDims, create_fusion
from heads.config import TrainConfig
from heads.infer import infer
from tests.conftest import build_synthetic_cache


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    return build_synthetic_cache(str(tmp_path_factory.mktemp("groups") / "c.h5"), n_train=120, n_test=20, L=24)


def test_length_grouped_is_a_permutation_of_sorted_chunks():
    g = torch.Generator().manual_seed(0)
    n, bs = 1000, 16
    perm = torch.randperm(n, generator=g)
    lengths = torch.randint(1, 65, (n,), generator=g)
    order = length_grouped(perm, lengths[perm], bs, torch.Generator().manual_seed(1))
    assert sorted(order.tolist()) == list(range(n))  # every row once
    assert torch.equal(order, length_grouped(perm, lengths[perm], bs, torch.Generator().manual_seed(1)))
    span = GROUP_BATCHES * bs
    chunk_of = {int(r): i // span for i, r in enumerate(perm)}
    batches = order.split(bs)
    assert [len(b) for b in batches] == [bs] * (n // bs) + [n % bs]  # the one short batch comes last
    for b in batches:
        assert len({chunk_of[int(r)] for r in b}) == 1  # a batch is drawn from one random chunk
    # batches are length quantiles of their chunk: every other row of the chunk lies outside a batch's range,
    # up to ties at the edges
    for b in batches[:-1]:
        chunk = perm[chunk_of[int(b[0])] * span:][:span]
        lo, hi = lengths[b].min(), lengths[b].max()
        inside = ((lengths[chunk] > lo) & (lengths[chunk] < hi)).sum()
        assert inside <= bs - 2
    # the batch order is shuffled, not longest-last
    maxima = [int(lengths[b].max()) for b in batches[:-1]]
    assert maxima != sorted(maxima)


def test_grouped_epochs_have_shorter_batches_and_only_for_token_heads(small_cache):
    data = load_cache(small_cache)
    rows = np.flatnonzero(data.valid)
    lengths = data.text_lengths()
    assert lengths is not None and len(lengths) == len(data)

    def mean_batch_length(group):
        pos = data.epoch_order(rows, torch.Generator().manual_seed(0), group)
        return np.mean([int(lengths[rows[b.numpy()]].max()) for b in pos.split(8)])
    assert mean_batch_length(8) < mean_batch_length(0)
    plain = data.epoch_order(rows, torch.Generator().manual_seed(0))
    assert torch.equal(plain, torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)))


def test_length_ordered_inference_gives_the_same_predictions(small_cache):
    data = load_cache(small_cache)
    torch.manual_seed(0)
    model = create_fusion(TrainConfig.from_flat(fusion="co-attn", hidden=32).head,
                          HeadDims(**data.dims(), num_classes=len(data.classes)))
    rows = np.flatnonzero(data.valid)[::-1].copy()  # any order in, the same order out
    sorted_ = infer(model, data, rows, batch_size=7)["logits"]
    one_by_one = np.concatenate([infer(model, data, rows[i:i + 1])["logits"] for i in range(len(rows))])
    np.testing.assert_allclose(sorted_, one_by_one, rtol=1e-5, atol=1e-6)
