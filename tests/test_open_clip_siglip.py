"""SigLIP-style open_clip models (issue 16): a CustomTextCLIP with open_clip's bidirectional text transformer pooled at
the last position, and a timm image tower with an attention-pool head (TimmModel), as ViT-B-16-SigLIP.json builds
them; also such a text tower with open_clip's classic VisionTransformer, and with a transformers text tower.

Tiny configs are registered with open_clip.add_model_config (what a user does for an architecture open_clip does
not ship), given seeded random weights saved to a file, and run through `featcache extract --backbone
open_clip:ARCH@FILE`; the stored features must equal the model's own encode_text / encode_image and tower outputs.
"""
from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from featcache.backbones import create_image, create_text, locate
from featcache.backbones.weights import ENV_DIR
from featcache.cache.store import CacheReader
from featcache.errors import ConfigError
from featcache.text_tower import tokenize_cache

import tiny_models as tm
from test_open_backbones import make_tiny_bert

pytestmark = pytest.mark.filterwarnings("ignore")

SIGLIP_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, "no_causal_mask": True,
               "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}}
TIMM_VISION = {"image_size": 160, "timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "map",
               "timm_proj": "none"}  # test_vit: 64 wide, a class token, a 10 x 10 grid
# Not named *siglip*: open_clip.get_tokenizer gives such names its SigLIP tokenizer (a hub download)
CONFIGS = {  # embed_dim = the trunk width: with timm_proj none the attention pool's output is the embedding
    "tiny-sl": {"embed_dim": 64, "custom_text": True, "init_logit_bias": -10, "vision_cfg": TIMM_VISION,
                    "text_cfg": SIGLIP_TEXT},
    "tiny-sl-vit": {"embed_dim": 16, "custom_text": True, "text_cfg": SIGLIP_TEXT,
                        "vision_cfg": tm.TINY_CLIP_CFG["model_cfg"]["vision_cfg"]},
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(ENV_DIR, raising=False)


def _perturbed(model):
    """Seeded weights with non-trivial final norms, so a skipped ln_final or head shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_final" in name or name.endswith(("norm.weight", "norm.bias")):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    import open_clip
    root = tmp_path_factory.mktemp("siglip")
    configs = dict(CONFIGS, **{"tiny-sl-hf": {  # a transformers text tower (as nllb-clip-base-siglip.json)
        "embed_dim": 16, "custom_text": True, "vision_cfg": tm.TINY_CLIP_CFG["model_cfg"]["vision_cfg"],
        "text_cfg": {"hf_model_name": make_tiny_bert(str(root / "bert")), "hf_tokenizer_name": str(root / "bert"),
                     "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler", "context_length": 16}}})
    (root / "cfg").mkdir()
    for arch, cfg in configs.items():
        (root / "cfg" / f"{arch}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(root / "cfg"))
    files = {}
    for arch in configs:
        torch.manual_seed(0)
        files[arch] = str(root / f"{arch}.pt")
        torch.save(_perturbed(open_clip.create_model(arch)).state_dict(), files[arch])
    return {"files": files, "data": tm.make_mvsa(str(root / "mvsa"), n=N, n_test=4)}


def _model(siglip, arch):
    from featcache.backbones.clip import load_clip
    return load_clip(arch, siglip["files"][arch])[0]


N = 20  # dataset rows
TEXTS = ["a great day", "rain again today, staying home with tea and a book", ""]


@pytest.mark.parametrize("arch", ["tiny-sl", "tiny-sl-vit"])
def test_siglip_towers_equal_the_models_own_outputs(siglip, arch):
    name = f"open_clip:{arch}@{siglip['files'][arch]}"
    text, image = create_text(name, locate(name)).eval(), create_image(name, locate(name)).eval()
    model = _model(siglip, arch)
    batch = text.tokenize(TEXTS)
    assert batch["attention_mask"].all()  # bidirectional, pooled at the last position: every position counts
    x = torch.randn(2, 3, image.image_size, image.image_size)
    with torch.inference_mode():
        t, i = text.forward_features(batch), image.forward_features(x)
        model.text.output_tokens = True
        try:
            ref_pooled, ref_tokens = model.text(batch["input_ids"])
        finally:
            model.text.output_tokens = False
        torch.testing.assert_close(t["pooled"], model.encode_text(batch["input_ids"]))
        torch.testing.assert_close(t["tokens"], ref_tokens)
        torch.testing.assert_close(i["pooled"], model.encode_image(x))
        if arch == "tiny-sl":  # the timm trunk's tokens without its class token
            torch.testing.assert_close(i["tokens"], model.visual.trunk.forward_features(x)[:, 1:])
    assert t["tokens"].shape == (3, 16, 32) and t["pooled"].shape == (3, text.pooled_dim)
    assert i["tokens"].shape == (2, image.num_patches, image.token_dim) and image.grid[0] * image.grid[1] == image.num_patches
    assert (image.num_patches, image.token_dim, image.pooled_dim) == ((100, 64, 64) if arch == "tiny-sl" else (4, 32, 16))


def test_padding_masked_tower_keeps_real_tokens_and_cuts_exactly(siglip):
    """A bidirectional tower that masks padding keys (TextTransformer.use_pad_mask), EOT-pooled: its mask is the real
    tokens, and a batch cut to its longest row (as extraction and stage 2 run it) gives encode_text's output."""
    from featcache.text_tower import trim
    name = f"open_clip:tiny-sl-vit@{siglip['files']['tiny-sl-vit']}"
    text = create_text(name, locate(name)).eval()
    model = _model(siglip, "tiny-sl-vit")
    model.text.use_pad_mask, model.text.pool_type = True, "argmax"
    try:
        from featcache.backbones.clip import CLIPText
        enc = CLIPText(model, text._tokenizer).eval()
        batch = enc.tokenize(TEXTS)
        assert not batch["attention_mask"].all() and batch["attention_mask"].sum(1).tolist()[2] == 2  # SOT, EOT
        with torch.inference_mode():
            cut, n = trim(batch)
            out = enc.forward_features(cut)
            torch.testing.assert_close(out["pooled"], model.encode_text(batch["input_ids"]))
            model.text.output_tokens = True
            ref = model.text(batch["input_ids"])[1]
        m = cut["attention_mask"]
        torch.testing.assert_close(out["tokens"][m], ref[:, :n][m])
    finally:
        model.text.use_pad_mask, model.text.pool_type, model.text.output_tokens = False, "last", False


def _cli(app, *args):
    import cli
    r = CliRunner().invoke(getattr(cli, f"{app}_app"), list(args))
    assert r.exit_code == 0, r.output
    return r


def _extract(siglip, backbone, out, *extra):
    return _cli("featcache", "extract", "--data", siglip["data"], "--backbone", backbone, "--out", out, "--no-progress",
                "--workers", "0", "--batch-size", "4", *extra)


def test_cli_siglip_extract_train_and_stage2(siglip, tmp_path):
    arch = "tiny-sl"
    cache = str(tmp_path / "siglip.h5")
    r = _extract(siglip, f"open_clip:{arch}@{siglip['files'][arch]}", cache, "--text-layers", "1")
    line = " ".join(r.output.split())
    assert f"{N} rows x (text 16 x 32 fp16 x 2 (states) + image 100 x 64 fp16)" in line, line[:300]  # planned size
    model = _model(siglip, arch)
    with h5py.File(cache, "r") as f:
        assert f["text/tokens"].shape == (N, 16, 32) and f["text_hidden/states"].shape == (N, 16, 32)
        assert f["image/tokens"].shape == (N, 100, 64) and f["image/pooled"].shape == (N, 64)
        assert f["text/mask"][()].all() and f["text/pooled"].shape == (N, 64)
        for k in ("text/tokens", "text/pooled", "image/tokens", "image/pooled", "text_hidden/states"):
            assert np.isfinite(f[k][()].astype(np.float32)).all(), k
        pooled, tokens = f["text/pooled"][()].astype(np.float32), f["text/tokens"][()].astype(np.float32)
    with CacheReader(cache) as r, torch.inference_mode():
        ids = tokenize_cache(r, create_text(f"open_clip:{arch}@{siglip['files'][arch]}",
                                            locate(f"open_clip:{arch}@{siglip['files'][arch]}")))["input_ids"]
        np.testing.assert_allclose(pooled, model.encode_text(ids).numpy(), atol=2e-2, rtol=2e-2)
        model.text.output_tokens = True
        try:
            np.testing.assert_allclose(tokens, model.text(ids)[1].numpy(), atol=2e-2, rtol=2e-2)
        finally:
            model.text.output_tokens = False
    run = str(tmp_path / "run")
    _cli("heads", "train", "--cache", cache, "--epochs", "2", "--hidden", "16", "--no-plots", "--out", run)
    assert 0 <= json.load(open(os.path.join(run, "metrics.json")))["macro_f1"] <= 1
    ft = str(tmp_path / "ft")  # stage 2 checks the recomputed top-layer tokens against the cached ones itself
    _cli("heads", "finetune", "--cache", cache, "--unfreeze-text", "1", "--init", run, "--epochs", "1",
         "--batch-size", "4", "--out", ft)
    assert os.path.exists(os.path.join(ft, "text_layers.safetensors"))


def test_cli_hf_text_tower_extracts_and_refuses_stage2(siglip, tmp_path):
    arch = "tiny-sl-hf"
    backbone = f"open_clip:{arch}@{siglip['files'][arch]}"
    cache = str(tmp_path / "hf.h5")
    _extract(siglip, backbone, cache)
    model = _model(siglip, arch)
    with h5py.File(cache, "r") as f, CacheReader(cache) as r, torch.inference_mode():
        mask = f["text/mask"][()]
        assert f["text/tokens"].shape == (N, 16, 32) and f["image/tokens"].shape == (N, 4, 32)
        assert mask.any(1).all() and not mask.all()  # real tokens only: the tower masks its padding
        ids = tokenize_cache(r, create_text(backbone, locate(backbone)))["input_ids"]
        np.testing.assert_allclose(f["text/pooled"][()].astype(np.float32), model.encode_text(ids).numpy(),
                                   atol=2e-2, rtol=2e-2)
    _cli("heads", "train", "--cache", cache, "--epochs", "1", "--hidden", "16", "--no-plots", "--out",
         str(tmp_path / "run"))
    enc = create_text(backbone, locate(backbone))
    with pytest.raises(ConfigError, match="run as a whole"):
        enc.lock(1)
