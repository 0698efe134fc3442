"""Stage 2's layer wiring (heads.train.text_model) against a small pure-torch text tower with more layers than
2N: states cached at the entry of layer L-N and the whole tower give the same logits, for a head whose output
depends on the text; feeding the states into another layer would not. Written for `make mutate` (TESTING.md)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from heads.data.text_layers import stage2_keys, text_batch
from heads.fusions import HeadConfig, HeadDims, create_fusion
from heads.fusions.base import NORMED
from heads.train.text_model import FinetuneModel
from tests.word_tower import BlockTower

L, D, VOCAB, B, T = 7, 16, 50, 6, 9


class TinyTower(BlockTower):
    """tests/word_tower.py's BlockTower with L blocks, seeded by torch.manual_seed(0)."""

    token_dim = pooled_dim = D
    max_len = T
    num_layers = L
    vocab = VOCAB

    def __init__(self):
        torch.manual_seed(0)
        super().__init__()


def text_head(fusion: str) -> nn.Module:
    torch.manual_seed(1)
    dims = HeadDims(text_dim=D, text_pooled_dim=D, image_dim=5, image_pooled_dim=5, num_classes=3)
    head = create_fusion(HeadConfig(fusion=fusion, hidden=16, attn_heads=2), dims)
    with torch.no_grad():  # fresh FiLM/gates can start text-blind: make every weight count
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return head.eval()


def batch() -> dict:
    g = torch.Generator().manual_seed(2)
    mask = torch.arange(T)[None] < torch.tensor([T, 3, 5, 9, 1, 7])[:, None]
    return {"input_ids": torch.randint(0, VOCAB, (B, T), generator=g), "text_mask": mask,
            "image_tokens": torch.randn(B, 4, 5, generator=g), "image_pooled": torch.randn(B, 5, generator=g)}


def reference(head, tower, b) -> torch.Tensor:
    """The head on the whole tower's output (embed, every block, finish): what stage 2 must compute."""
    out = tower.forward_features({"input_ids": b["input_ids"], "attention_mask": b["text_mask"]})
    return head({**{k: v for k, v in b.items() if k.startswith("image")}, "text_tokens": out["tokens"],
                 "text_mask": out["mask"], "text_pooled": out["pooled"]})["logits"]


@pytest.mark.parametrize("fusion", ["concat", "film", "cross-attn"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_cached_states_and_full_forward_agree_and_other_layers_differ(fusion, n):
    tower, head, b = TinyTower().eval(), text_head(fusion), batch()
    tower.lock(n)
    tb = {"input_ids": b["input_ids"], "attention_mask": b["text_mask"]}
    with torch.no_grad():
        states = {k: tower.run_blocks(tower.embed(tb), tb, 0, k) for k in range(L + 1)}
        full = FinetuneModel(head, tower, n, cached=False).eval()
        cached = FinetuneModel(head, tower, n, cached=True).eval()
        want = full(b)["logits"]
        torch.testing.assert_close(want, reference(head, tower, b))
        assert full.start_layer == L - n
        image_inputs = {k for k in head.inputs if k.startswith("image")}
        assert set(full.inputs) == image_inputs | {"input_ids", "text_mask"}  # never the cached text features
        assert cached.inputs[-1] == "text_states" and "text_states" not in full.inputs
        torch.testing.assert_close(cached({**b, "text_states": states[L - n]})["logits"], want)
        for wrong in (L - n - 1, L - n + 1, n):  # the states of another layer give other logits
            if wrong != L - n:
                got = cached({**b, "text_states": states[wrong]})["logits"]
                assert not torch.allclose(got, want, atol=1e-4), wrong
        # the head sees the top layers' text, not the image only
        noise = {**b, "input_ids": torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(9))}
        assert not torch.allclose(full(noise)["logits"], want, atol=1e-4)


def test_train_mode_unfreezes_only_the_top_blocks_and_saves_only_them():
    tower, n = TinyTower(), 2
    tower.lock(n)
    model = FinetuneModel(text_head("concat"), tower, n).train()
    assert [blk.training for blk in tower.blocks] == [False] * (L - n) + [True] * n
    assert model.head.training and not tower.training
    saved = model.text_params()
    assert set(saved) == {f"blocks.{k}.{p}" for k in range(L - n, L) for p in ("weight", "bias")} | \
        {"post.weight", "post.bias"}
    model.eval()
    assert not any(blk.training for blk in tower.blocks) and not model.head.training


def test_n0_is_the_head_alone_also_in_forward():
    head = text_head("cross-attn")
    model = FinetuneModel(head, TinyTower(), 0)
    assert model.text is None and model.start_layer is None and model.text_params() == {}
    assert model.inputs == head.inputs and model.num_classes == 3 and model.prenorm == head.prenorm != ()
    b = batch()
    b.update(text_tokens=torch.randn(B, T, D), text_pooled=torch.randn(B, D))
    torch.testing.assert_close(model(b)["logits"], head(b)["logits"])


def test_prenormalised_image_tokens_reach_the_head():
    """A training batch may carry the image tokens LayerNorm-normalised (key + NORMED, FusionHead.prenorm):
    stage 2 passes them on, and only image keys are pre-normalised (the text tokens are recomputed)."""
    tower, head, b = TinyTower().eval(), text_head("cross-attn"), batch()
    tower.lock(2)
    model = FinetuneModel(head, tower, 2, cached=False).eval()
    assert model.prenorm == ("image_tokens",) and head.prenorm == ("text_tokens", "image_tokens")
    normed = torch.nn.functional.layer_norm(b["image_tokens"], b["image_tokens"].shape[-1:])
    with torch.no_grad():
        want = model(b)["logits"]
        got = model({**b, "image_tokens": torch.full_like(normed, 99.0), "image_tokens" + NORMED: normed})
    torch.testing.assert_close(got["logits"], want, atol=1e-5, rtol=1e-5)


def test_stage2_reads_the_stored_states_only_in_cached_mode():
    assert stage2_keys("cached") == ("text_tokens", "text_mask", "text_states")
    assert stage2_keys("full") == ("text_tokens", "text_mask")
    b = batch()
    assert text_batch(b).keys() == {"input_ids", "attention_mask"}
    assert text_batch(b)["attention_mask"] is b["text_mask"] and text_batch(b)["input_ids"] is b["input_ids"]
