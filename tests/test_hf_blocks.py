"""Any transformers encoder split at a block (issue 16): the block list is found from the model, and the top N
blocks run on stored states give the model's own forward, for a BERT, a DeBERTa-v2 (relative attention, its
ConvLayer after block 0) and an MPNet (relative position bias), each with 5 layers (more than 2N for N = 1, 2).
Also: lock(N) unfreezes exactly the top N blocks, and the sentence-transformers pooling config of a hub id is
read from the HF cache (a fake one: no network).
"""
from __future__ import annotations

import json
import socket

import pytest
import torch

import tiny_models as tm
from featcache.backbones.hf_text import HFTextEncoder, st_pooling
from featcache.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore")
KINDS = ("bert", "deberta-v2", "mpnet")


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_blocks")
    return {kind: HFTextEncoder(tm.make_tiny_encoder(str(root / kind), kind), max_len=16).eval() for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_top_blocks_on_stored_states_equal_the_full_forward(encoders, kind):
    enc = encoders[kind]
    batch = enc.tokenize(tm.TEXTS)
    m = batch["attention_mask"]
    with torch.no_grad():
        ref = enc.model(input_ids=batch["input_ids"], attention_mask=m.long(), output_hidden_states=True)
        full = enc.forward_features(batch)
        torch.testing.assert_close(full["tokens"], ref.last_hidden_state, atol=1e-6, rtol=1e-6)
        for n in (1, 2):
            k = enc.num_layers - n
            out = enc.forward_features(batch, start_layer=k)  # what --text-layers N stores
            torch.testing.assert_close(out["hidden"], ref.hidden_states[k], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(out["tokens"], full["tokens"])
            top = enc.forward_layers(out["hidden"], batch, k)  # stage 2, cached mode
            torch.testing.assert_close(top["tokens"][m], full["tokens"][m], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(top["pooled"], full["pooled"], atol=1e-5, rtol=1e-5)
            stored = out["hidden"].half().float()  # as the cache holds them
            torch.testing.assert_close(enc.forward_layers(stored, batch, k)["tokens"][m], full["tokens"][m],
                                       atol=2e-2, rtol=2e-2)
            frozen = enc.run_blocks(enc.embed(batch), batch, 0, k)  # stage 2, full mode
            torch.testing.assert_close(frozen, out["hidden"], atol=1e-6, rtol=1e-6)
            if k > 1:  # run_frozen: from states stored lower down
                torch.testing.assert_close(enc.run_blocks(ref.hidden_states[1], batch, 1, k), out["hidden"],
                                           atol=1e-5, rtol=1e-5)
    assert [n for n, _ in enc.named_parameters()] == [n for n, _ in enc.model.named_parameters(prefix="model")]


@pytest.mark.parametrize("kind", KINDS)
def test_lock_unfreezes_exactly_the_top_blocks(encoders, kind):
    enc = encoders[kind]
    assert enc.layer_table["layers"] == "model.encoder.layer"

    def trainable():
        return {n for n, p in enc.named_parameters() if p.requires_grad}

    def blocks(*ids):
        return {n for n, _ in enc.named_parameters() if any(n.startswith(f"model.encoder.layer.{i}.") for i in ids)}
    try:
        enc.lock(2)
        assert trainable() == blocks(3, 4) and blocks(3, 4)
        enc.lock(1)  # idempotent: the state of lock(1), whatever came before
        assert trainable() == blocks(4)
        enc.lock(0)
        assert trainable() == set()
        with pytest.raises(ConfigError):
            enc.lock(6)
    finally:
        enc.lock(0)


def test_an_encoder_without_a_block_list_says_so(tmp_path):
    """ALBERT shares one block among its layers: it runs as a whole, and --text-layers is refused by name."""
    from transformers import AlbertConfig, AlbertModel, BertTokenizerFast
    folder = str(tmp_path / "albert")
    tok = BertTokenizerFast(tm._wordpiece_vocab(str(tmp_path), ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    AlbertModel(AlbertConfig(vocab_size=len(tok), embedding_size=16, hidden_size=32, num_hidden_layers=3,
                             num_attention_heads=2, intermediate_size=64, max_position_embeddings=66)
                ).save_pretrained(folder)
    tok.save_pretrained(folder)
    enc = HFTextEncoder(folder, max_len=16).eval()
    batch = enc.tokenize(["a great day"])
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(batch)["tokens"], enc.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long()).last_hidden_state)
    with pytest.raises(ConfigError, match="albert encoder"):
        enc.layers()
    with pytest.raises(ConfigError, match="albert encoder"):
        enc.forward_features(batch, start_layer=2)


def _fake_hub_repo(cache, repo: str, pooling: dict | None) -> None:
    """The HF cache layout: models--org--name/refs/main -> snapshots/<rev>/ (files there)."""
    base = cache / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text("0" * 40)
    (snap / "config.json").write_text("{}")
    if pooling is not None:
        (snap / "1_Pooling").mkdir()
        (snap / "1_Pooling" / "config.json").write_text(json.dumps(pooling))


def test_pooling_config_of_a_hub_id_comes_from_the_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants as hfc
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(cache))  # read once at import

    def no_network(*a, **k):
        raise AssertionError(f"network connection attempted: {a}")
    monkeypatch.setattr(socket, "create_connection", no_network)
    _fake_hub_repo(cache, "org/cls-model", {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    _fake_hub_repo(cache, "org/mean-model", {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True})
    _fake_hub_repo(cache, "org/plain", None)
    for offline in ("1", "0"):  # a cached config is used online too, without asking the hub
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        assert st_pooling("org/cls-model") == "cls"
        assert st_pooling("org/mean-model") == "mean"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert st_pooling("org/plain") == "mean"  # offline and not cached: the masked mean
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online and not cached: the hub is asked for that file
    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: asked.append((repo, name)) or str(
        cache / "models--org--cls-model" / "snapshots" / ("0" * 40) / "1_Pooling" / "config.json"))
    assert st_pooling("org/plain") == "cls" and asked == [("org/plain", "1_Pooling/config.json")]
    assert st_pooling(str(cache / "models--org--cls-model" / "snapshots" / ("0" * 40))) == "cls"  # a local folder
