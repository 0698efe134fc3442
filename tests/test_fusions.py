"""Every registered fusion head: shapes, finiteness, masks, modality modes, modality dropout, and that it
actually fuses (learns a task that no single modality can solve)."""
from __future__ import annotations

import pytest
import torch

from heads.fusions import DEFAULT_FUSION, FUSIONS, MODALITIES, HeadConfig, HeadDims, create_fusion, list_fusions

DIMS = dict(text_dim=16, text_pooled_dim=12, image_dim=10, image_pooled_dim=14)
NAMES = list_fusions()


def head(name: str, num_classes: int = 3, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = HeadConfig(fusion=name, **{"hidden": 32, "attn_heads": 4, **kw})
    return create_fusion(cfg, HeadDims(**DIMS, num_classes=num_classes)).eval()


def make_batch(B: int = 8, L: int = 7, P: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    lengths[0] = L  # one full row, so that "extend the padding" really adds columns beyond every length
    return {
        "text_tokens": torch.randn(B, L, DIMS["text_dim"], generator=g),
        "text_mask": torch.arange(L)[None, :] < lengths[:, None],
        "text_pooled": torch.randn(B, DIMS["text_pooled_dim"], generator=g),
        "image_tokens": torch.randn(B, P, DIMS["image_dim"], generator=g),
        "image_pooled": torch.randn(B, DIMS["image_pooled_dim"], generator=g),
    }


def test_registry():
    assert {"concat", "gmu", "film", "cross-attn", "co-attn"} <= set(NAMES)
    assert DEFAULT_FUSION in FUSIONS
    with pytest.raises(ValueError, match="valid: concat, gmu"):
        create_fusion(HeadConfig(fusion="nope"), HeadDims(**DIMS, num_classes=3))
    with pytest.raises(ValueError, match="modality"):
        HeadConfig(modality="audio")
    # What `heads fusions` shows comes from the classes themselves
    assert not FUSIONS.get("concat").uses_tokens() and FUSIONS.get("film").uses_tokens()
    assert FUSIONS.get("gmu").description().startswith("gated multimodal unit")


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_finite(name, modality):
    m = head(name, modality=modality, num_classes=3)
    out = m(make_batch())
    assert out["logits"].shape == (8, 3)
    assert torch.isfinite(out["logits"]).all()
    if name == "gmu":
        gate = out["gate"]
        assert gate.shape == (8,) and ((gate >= 0) & (gate <= 1)).all()
        if modality != "both":  # the present modality gets the full weight
            assert torch.all(gate == (1.0 if modality == "text" else 0.0))
    m.train()  # with dropout active too
    assert torch.isfinite(m(make_batch())["logits"]).all()


@pytest.mark.parametrize("name", NAMES)
def test_padding_changes_nothing(name):
    m, b = head(name), make_batch()
    ref = m(b)["logits"]
    # 1) garbage (huge values) in the padded positions
    garbage = dict(b)
    garbage["text_tokens"] = torch.where(b["text_mask"][..., None], b["text_tokens"],
                                         1e4 * torch.randn_like(b["text_tokens"]))
    torch.testing.assert_close(m(garbage)["logits"], ref, rtol=0, atol=1e-5)
    # 2) more padding columns
    B, L, D = b["text_tokens"].shape
    longer = dict(b)
    longer["text_tokens"] = torch.cat([b["text_tokens"], 100 * torch.randn(B, 5, D)], 1)
    longer["text_mask"] = torch.cat([b["text_mask"], torch.zeros(B, 5, dtype=torch.bool)], 1)
    torch.testing.assert_close(m(longer)["logits"], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_single_modality_ignores_the_other(name):
    b, other = make_batch(seed=0), make_batch(seed=1)
    m = head(name, modality="text")
    swapped = {**b, "image_tokens": other["image_tokens"], "image_pooled": other["image_pooled"]}
    torch.testing.assert_close(m(swapped)["logits"], m(b)["logits"])
    m = head(name, modality="image")
    swapped = {**b, "text_tokens": other["text_tokens"], "text_pooled": other["text_pooled"]}
    torch.testing.assert_close(m(swapped)["logits"], m(b)["logits"])


def test_modality_dropout_never_both():
    m = head("concat", modality_dropout=0.9).train()
    torch.manual_seed(1)
    keep_t, keep_i = m.modality_keep(20000)
    assert not ((keep_t == 0) & (keep_i == 0)).any()
    dropped = (keep_t == 0) | (keep_i == 0)
    assert 0.88 < dropped.float().mean() < 0.92
    assert 0.4 < (keep_t == 0).float().sum() / dropped.sum() < 0.6  # both modalities get dropped
    m.eval()  # never at inference
    assert all(k.all() for k in m.modality_keep(100))
    m = head("concat", modality="text", modality_dropout=0.9).train()  # never drop the only modality
    keep_t, keep_i = m.modality_keep(1000)
    assert keep_t.all() and not keep_i.any()


def xor_data(n: int, seed: int, task: str = "xor") -> tuple[dict, torch.Tensor]:
    """task "xor": label = (text sign) XOR (image sign), either modality alone is at chance (50%);
    task "text" / "image": the label is that modality's sign alone."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    c = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    gd = torch.Generator().manual_seed(1234)  # the same feature directions for train and test
    u_tok, u_pool = torch.randn(DIMS["text_dim"], generator=gd), torch.randn(DIMS["text_pooled_dim"], generator=gd)
    v_tok, v_pool = torch.randn(DIMS["image_dim"], generator=gd), torch.randn(DIMS["image_pooled_dim"], generator=gd)
    b = make_batch(B=n, seed=seed)
    s = 0.5  # noise scale relative to the unit-ish signal directions
    b["text_tokens"] = s * b["text_tokens"] + a[:, None, None] * u_tok
    b["text_pooled"] = s * b["text_pooled"] + a[:, None] * u_pool
    b["image_tokens"] = s * b["image_tokens"] + c[:, None, None] * v_tok
    b["image_pooled"] = s * b["image_pooled"] + c[:, None] * v_pool
    return b, {"xor": a * c > 0, "text": a > 0, "image": c > 0}[task].long()


def fit_accuracy(name: str, modality: str = "both", steps: int = 150, task: str = "xor") -> float:
    train_b, train_y = xor_data(512, seed=0, task=task)
    test_b, test_y = xor_data(256, seed=1, task=task)
    m = head(name, modality=modality, num_classes=2, dropout=0.0).train()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(m(train_b)["logits"], train_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (m.eval()(test_b)["logits"].argmax(1) == test_y).float().mean().item()


@pytest.mark.parametrize("name", NAMES)
def test_learns_a_task_that_needs_both_modalities(name):
    assert fit_accuracy(name) > 0.9


def test_single_modality_cannot_solve_the_xor_task():
    # The control for the test above: the task really needs both modalities.
    assert fit_accuracy("concat", modality="text") < 0.65
    assert fit_accuracy("concat", modality="image") < 0.65


@pytest.mark.parametrize("modality", ["text", "image"])
@pytest.mark.parametrize("name", NAMES)
def test_single_modality_mode_learns(name, modality):
    # Every head must be trainable with one modality switched off (a zero-initialised or dead path that
    # blocks gradients would leave it at chance: film text-only once predicted one class forever).
    assert fit_accuracy(name, modality=modality, task=modality) > 0.9


@pytest.mark.parametrize("name", [n for n in NAMES if FUSIONS.get(n).prenorm])
def test_prenormalised_inputs_give_the_plain_logits(name):
    """Training reads the `prenorm` token arrays LayerNorm-normalised once per load (key + "_normed", without
    the raw key) and folds the projector's affine into its Linear: the same logits as LayerNorm then Linear."""
    m = head(name)
    with torch.no_grad():  # a non-trivial LayerNorm affine, so that the fold is really exercised
        for mod in m.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
        for mod in m.modules():  # FiLM starts at zero (ignores the text): make it count
            if isinstance(mod, torch.nn.Linear) and not mod.weight.any():
                mod.weight.normal_(0, 0.3)
    batch = make_batch()
    pre = {k: v for k, v in batch.items() if k not in m.prenorm}
    for k in m.prenorm:
        x = batch[k]
        pre[k + "_normed"] = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(m(pre)["logits"], m(batch)["logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["cross-attn", "co-attn"])
def test_attention_pooled_per_sample_equals_attention_per_token(name):
    """The attention heads pool attention weights before gathering (heads.fusions.attention): the same numbers as
    the textbook layer, where every real token gathers with its own softmax and the masked mean follows (the
    projection after it is linear, so applying it before or after the mean is the same)."""
    import torch.nn.functional as F
    m, b = head(name, attn_heads=2), make_batch()
    t = F.layer_norm(b["text_tokens"], (DIMS["text_dim"],))
    x = F.layer_norm(b["image_tokens"], (DIMS["image_dim"],))
    q, k = m.space(t, x)  # (B, heads, L, d), (B, heads, P, d)
    rows = []
    for r in range(len(t)):
        real = b["text_mask"][r]
        qr, kr, tr = q[r][:, real], k[r], t[r][real]  # only this row's real tokens
        per_token = torch.stack([F.softmax(qr[h] @ kr[h].T, -1) @ x[r] for h in range(2)], 1)  # (L, heads, Di)
        gathered_i = per_token.mean(0).flatten()  # what the tokens gathered, averaged over the real tokens
        if name == "cross-attn":
            rows.append(m.norm(m.fused(torch.cat([tr.mean(0), gathered_i]))))
            continue
        kbar = kr.mean(1)  # (heads, d): the mean patch's key as the one image query over the real text tokens
        gathered_t = torch.stack([F.softmax(qr[h] @ kbar[h], 0) @ tr for h in range(2)]).flatten()  # (heads * Dt)
        ht = m.norm_t(m.text_side(torch.cat([tr.mean(0), gathered_i])))
        hi = m.norm_i(m.image_side(torch.cat([x[r].mean(0), gathered_t])))
        rows.append(torch.cat([ht, hi, ht * hi]))
    torch.testing.assert_close(m(b)["logits"], m.forward_head(torch.stack(rows)), rtol=1e-4, atol=1e-5)
