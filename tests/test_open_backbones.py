"""Open backbone families (issue 16): `hf:DIR`, `timm:NAME@FILE`, `open_clip:ARCH@FILE`, and --max-image-tokens.

Tiny random models of each family are saved locally and loaded back through the code users run (hub offline):
`featcache extract` end to end, then `heads train`, and stage 2 on the hf one (recomputed top-layer tokens must
equal the cached ones, checked by `heads finetune` itself, and the split forward must equal the model's own).
"""
from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from featcache.backbones import create_image, create_text, get_backbone_spec, locate, parse_backbone
from featcache.backbones.base import BudgetedImage, pool_tokens
from featcache.backbones.weights import ENV_DIR
from featcache.errors import ConfigError

import tiny_models as tm

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(ENV_DIR, raising=False)


def make_tiny_bert(folder: str, pooling: str | None = None) -> str:
    """A 2-layer BERT on the MiniLM vocab; with `pooling`, a sentence-transformers 1_Pooling/config.json."""
    from transformers import BertConfig, BertModel, BertTokenizerFast
    tok = BertTokenizerFast.from_pretrained(tm.minilm_path())
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=66)
    BertModel(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    if pooling:
        os.makedirs(os.path.join(folder, "1_Pooling"))
        with open(os.path.join(folder, "1_Pooling", "config.json"), "w") as f:
            json.dump({"pooling_mode_cls_token": pooling == "cls", "pooling_mode_mean_tokens": pooling == "mean"}, f)
    return folder


def save_timm(arch: str, path: str, **kw) -> str:
    import timm
    torch.manual_seed(0)
    torch.save(timm.create_model(arch, pretrained=False, **kw).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import open_clip
    root = tmp_path_factory.mktemp("open")
    cfg_dir = root / "configs"
    cfg_dir.mkdir()
    (cfg_dir / "tiny-clip16.json").write_text(json.dumps(tm.TINY_CLIP_CFG["model_cfg"]))
    open_clip.add_model_config(str(cfg_dir))  # what a user does for an architecture open_clip does not ship
    clip_file = str(root / "tiny_clip.pt")
    torch.save(tm.tiny_clip_model().state_dict(), clip_file)
    return {"bert": make_tiny_bert(str(root / "bert"), pooling="cls"),
            "vit": save_timm("test_vit", str(root / "test_vit.pth")),
            "cnn": save_timm("test_resnet", str(root / "test_resnet.pth")),
            "clip": clip_file, "data": tm.make_mvsa(str(root / "mvsa"), n=24, n_test=4), "root": root}


def test_names_resolve_to_specs_and_unknown_ones_are_refused(models):
    assert parse_backbone(f"hf:{models['bert']}+timm:test_vit@{models['vit']}") == \
        (f"hf:{models['bert']}", f"timm:test_vit@{models['vit']}")
    assert get_backbone_spec("timm:test_resnet").family.name == "timm"
    assert get_backbone_spec(f"open_clip:tiny-clip16@{models['clip']}").modalities == ("text", "image")
    for bad in ("timm:no_such_net", "open_clip:No-Such-Arch@x", "nope:thing", "hf:"):
        with pytest.raises(ConfigError):
            get_backbone_spec(bad)
    with pytest.raises(ConfigError):  # an image-only model cannot be the text side
        parse_backbone(f"timm:test_vit+timm:test_vit")


def test_weights_are_located_as_the_registry_does(models, tmp_path):
    src = locate(f"hf:{models['bert']}")
    assert src.kind == "path" and src.location == os.path.abspath(models["bert"])
    assert locate(f"timm:test_vit@{models['vit']}").location == models["vit"]
    from featcache.backbones.weights import WeightsError
    with pytest.raises(WeightsError, match="HF_HUB_OFFLINE"):  # nothing local: every place looked is named
        locate("timm:test_vit")
    with pytest.raises(WeightsError, match="does not exist"):
        locate(f"timm:test_vit@{tmp_path / 'missing.pth'}")


def test_hf_forward_equals_model_forward_and_pooling_follows_config(models):
    name = f"hf:{models['bert']}"
    enc = create_text(name, locate(name), max_len=16).eval()
    assert enc.pooling == "cls" and enc.layer_table["layers"] == "model.encoder.layer"
    batch = enc.tokenize(["a great day", "rain again today, staying home"])
    with torch.inference_mode():
        out = enc.forward_features(batch)
        ref = enc.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long())
    m = batch["attention_mask"]
    torch.testing.assert_close(out["tokens"][m], ref.last_hidden_state[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["pooled"], out["tokens"][:, 0])
    assert create_text(name, locate(name), max_len=16, pooling="mean").pooling == "mean"


@pytest.mark.parametrize("arch", ["test_vit", "test_resnet"])
def test_timm_tokens_and_pooled(models, arch):
    import timm
    key = "vit" if arch == "test_vit" else "cnn"
    enc = create_image(f"timm:{arch}@{models[key]}", locate(f"timm:{arch}@{models[key]}")).eval()
    ref = timm.create_model(arch, pretrained=False)
    ref.load_state_dict(torch.load(models[key], weights_only=True))
    ref.eval()
    x = torch.randn(2, 3, enc.image_size, enc.image_size)
    with torch.inference_mode():
        out = enc.forward_features(x)
        feats = ref.forward_features(x)
        pre = ref.forward_head(feats, pre_logits=True)
    tokens = feats[:, ref.num_prefix_tokens:] if feats.ndim == 3 else feats.flatten(2).transpose(1, 2)
    torch.testing.assert_close(out["tokens"], tokens)
    torch.testing.assert_close(out["pooled"], pre)
    assert out["tokens"].shape[1:] == (enc.num_patches, enc.token_dim) and out["pooled"].shape[1] == enc.pooled_dim


def test_token_budget_pools_a_24x24_grid_to_49(models, tmp_path):
    path = save_timm("vit_tiny_patch16_384", str(tmp_path / "vit384.pth"))  # 384 px, 16 px patches: 24 x 24
    name = f"timm:vit_tiny_patch16_384@{path}"
    enc = create_image(name, locate(name)).eval()
    assert enc.num_patches == 576 and tuple(enc.grid) == (24, 24)
    budget = BudgetedImage(enc, 49)
    assert budget.num_patches == 49
    x = torch.randn(2, 3, enc.image_size, enc.image_size)
    with torch.inference_mode():
        full, small = enc.forward_features(x), budget.forward_features(x)
    assert small["tokens"].shape == (2, 49, enc.token_dim)
    torch.testing.assert_close(small["tokens"], pool_tokens(full["tokens"], (24, 24), (7, 7)))
    # bin (0, 0) of a 24 -> 7 adaptive pool covers rows/cols 0..3 (floor(0*24/7) to ceil(24/7))
    torch.testing.assert_close(small["tokens"][:, 0], full["tokens"].reshape(2, 24, 24, -1)[:, :4, :4].mean((1, 2)))
    torch.testing.assert_close(small["pooled"], full["pooled"])


def _extract(models, backbone: str, out: str, *extra: str):
    from cli import featcache_app
    r = CliRunner().invoke(featcache_app, ["extract", "--data", models["data"], "--backbone", backbone, "--out", out,
                                           "--no-progress", "--workers", "0", "--batch-size", "4",
                                           "--max-text-len", "16", *extra])
    assert r.exit_code == 0, r.output
    return r


def _train(cache: str, out: str):
    from cli import heads_app
    r = CliRunner().invoke(heads_app, ["train", "--cache", cache, "--epochs", "2", "--hidden", "16", "--no-plots",
                                       "--out", out])
    assert r.exit_code == 0, r.output
    return json.load(open(os.path.join(out, "metrics.json")))


def test_cli_hf_and_timm_extract_train_and_stage2(models, tmp_path):
    from cli import heads_app
    cache = str(tmp_path / "hf_timm.h5")
    _extract(models, f"hf:{models['bert']}+timm:test_resnet@{models['cnn']}", cache, "--text-layers", "1")
    with h5py.File(cache, "r") as f:
        meta = json.loads(f.attrs["meta"])
        assert f["text/tokens"].shape == (24, 16, 32) and f["text_hidden/states"].shape == (24, 16, 32)
        assert f["image/tokens"].shape[0] == 24 and f["image/tokens"].shape[1] > 1
        text_pooled, text_tokens = f["text/pooled"][:], f["text/tokens"][:]
    np.testing.assert_allclose(text_pooled, text_tokens[:, 0], atol=1e-2)  # cls pooling, from 1_Pooling
    assert meta["weights"]["text"]["name"] == f"hf:{models['bert']}"
    assert meta["weights"]["image"]["location"] == models["cnn"] and len(meta["weights"]["image"]["sha256"]) == 64
    s1 = str(tmp_path / "s1")
    assert 0 <= _train(cache, s1)["macro_f1"] <= 1
    ft = str(tmp_path / "ft")  # stage 2 checks recomputed top-layer tokens against the cached ones itself
    r = CliRunner().invoke(heads_app, ["finetune", "--cache", cache, "--unfreeze-text", "1", "--init", s1,
                                       "--epochs", "1", "--batch-size", "4", "--out", ft])
    assert r.exit_code == 0, r.output
    assert os.path.exists(os.path.join(ft, "text_layers.safetensors"))


def test_cli_open_clip_and_timm_vit_with_budget(models, tmp_path):
    cache = str(tmp_path / "clip.h5")
    _extract(models, f"open_clip:tiny-clip16@{models['clip']}", cache)
    with h5py.File(cache, "r") as f:
        assert f["text/tokens"].shape == (24, 77, 32) and f["image/tokens"].shape == (24, 4, 32)
    _train(cache, str(tmp_path / "run_clip"))
    vit = str(tmp_path / "vit.h5")
    r = _extract(models, f"hf:{models['bert']}+timm:test_vit@{models['vit']}", vit, "--max-image-tokens", "9")
    with h5py.File(vit, "r") as f:
        assert f["image/tokens"].shape[1] == 9  # test_vit: a 10 x 10 grid pooled to 3 x 3
        assert json.loads(f.attrs["meta"])["preprocessing"]["max_image_tokens"] == 9
    _train(vit, str(tmp_path / "run_vit"))


def test_cli_backbones_lists_open_families():
    from cli import featcache_app
    r = CliRunner().invoke(featcache_app, ["backbones"])
    assert r.exit_code == 0, r.output
    for example in ("hf:", "timm:", "open_clip:"):
        assert example in r.output


def test_extract_prints_the_planned_size_and_it_matches_the_file(models, tmp_path):
    cache = str(tmp_path / "sized.h5")
    r = _extract(models, f"hf:{models['bert']}+timm:test_vit@{models['vit']}", cache, "--max-image-tokens", "9")
    line = " ".join(r.output.split())  # rich wraps long lines
    line = line[line.index("writing "):]
    assert "24 rows x (text 16 x 32 fp16 + image 9 x" in line
    with h5py.File(cache, "r") as f:
        arrays = sum(f[k].size * f[k].dtype.itemsize for k in ("text/tokens", "text/mask", "text/pooled",
                                                               "image/tokens", "image/pooled"))
    from featcache.info import human_bytes
    assert human_bytes(arrays) in line


def test_extract_refuses_when_the_disk_is_too_small(models, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple
    from cli import featcache_app
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("U", "total used free")(10, 10, 1000))
    r = CliRunner().invoke(featcache_app, ["extract", "--data", models["data"], "--backbone",
                                           f"hf:{models['bert']}+timm:test_resnet@{models['cnn']}", "--out",
                                           str(tmp_path / "big.h5"), "--no-progress", "--workers", "0"])
    out = " ".join(r.output.split())
    assert r.exit_code != 0 and "1000.0 B free" in out and "--max-image-tokens" in out, out
    assert not os.path.exists(tmp_path / "big.h5")


def test_hf_mpnet_extract_text_layers_and_stage2(models, tmp_path):
    """MPNet (all-mpnet-base-v2's architecture: relative position bias in its encoder) end to end: the hidden
    states entering layer L-2, then stage 2 on the top layer (one frozen layer run once over the stored states,
    the recomputed tokens checked against the cached ones by `heads finetune` itself)."""
    from cli import heads_app
    name = f"hf:{tm.make_tiny_encoder(str(tmp_path / 'mpnet'), 'mpnet', num_layers=3)}"
    cache = str(tmp_path / "mpnet.h5")
    _extract(models, f"{name}+efficientnet-lite0", cache, "--text-layers", "2")
    with h5py.File(cache, "r") as f:
        assert f["text_hidden/states"].shape == (24, 16, 32) and json.loads(f.attrs["meta"])["text"]["start_layer"] == 1
    ft = str(tmp_path / "ft")
    r = CliRunner().invoke(heads_app, ["finetune", "--cache", cache, "--unfreeze-text", "1", "--epochs", "1",
                                       "--batch-size", "4", "--out", ft])
    assert r.exit_code == 0, r.output
    assert "running frozen text layers 1..1" in " ".join(r.output.split()), r.output
    with safe_open(os.path.join(ft, "text_layers.safetensors"), "pt") as f:
        assert f.keys() and all(k.startswith("model.encoder.layer.2.") for k in f.keys())


def test_hf_encoder_without_block_list_runs_whole_and_refuses_text_layers(models, tmp_path):
    """ALBERT (one block shared by its layers, no list of them) runs its own forward; --text-layers is refused
    before a file is made."""
    from transformers import AlbertConfig, AlbertModel, BertTokenizerFast
    from cli import featcache_app
    folder = str(tmp_path / "albert")
    tok = BertTokenizerFast.from_pretrained(tm.minilm_path())
    AlbertModel(AlbertConfig(vocab_size=len(tok), embedding_size=16, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=64, max_position_embeddings=66)
                ).save_pretrained(folder)
    tok.save_pretrained(folder)
    backbone = f"hf:{folder}+timm:test_resnet@{models['cnn']}"
    _extract(models, backbone, str(tmp_path / "albert.h5"))
    r = CliRunner().invoke(featcache_app, ["extract", "--data", models["data"], "--backbone", backbone,
                                           "--text-layers", "1", "--out", str(tmp_path / "alb2.h5"), "--no-progress",
                                           "--workers", "0"])
    out = " ".join(r.output.split())
    assert r.exit_code != 0 and "albert encoder was found" in out and "--text-layers" in out, out
    assert not any(p.name.startswith("alb2") for p in tmp_path.iterdir())  # refused before a file is made


def test_extract_with_budget_stores_the_pooled_full_grid(models, tmp_path):
    """Through `featcache extract`: a 24 x 24 ViT with --max-image-tokens 49 stores 49 tokens per image, equal
    (to fp16 storage) to pooling the tokens a full extraction stored."""
    vit = save_timm("vit_tiny_patch16_384", str(tmp_path / "vit384.pth"))
    backbone = f"hf:{models['bert']}+timm:vit_tiny_patch16_384@{vit}"
    full, small = str(tmp_path / "full.h5"), str(tmp_path / "small.h5")
    _extract(models, backbone, full, "--limit", "3")
    _extract(models, backbone, small, "--limit", "3", "--max-image-tokens", "49")
    with h5py.File(full, "r") as f, h5py.File(small, "r") as g:
        assert f["image/tokens"].shape[1:] == (576, 192) and g["image/tokens"].shape[1:] == (49, 192)
        pooled = pool_tokens(torch.from_numpy(f["image/tokens"][:].astype(np.float32)), (24, 24), (7, 7))
        np.testing.assert_allclose(g["image/tokens"][:].astype(np.float32), pooled.numpy(), atol=2e-2, rtol=2e-2)
        np.testing.assert_array_equal(f["image/pooled"][:], g["image/pooled"][:])
        assert json.loads(f.attrs["meta"])["key"] != json.loads(g.attrs["meta"])["key"]


def test_image_size_feeds_a_cnn_larger_images_and_is_recorded(models, tmp_path):
    """--image-size: a timm CNN fed twice its own size stores four times the patches (and the size printed before
    extraction says so), the preprocessing records the size (its own cache key; ExtractConfig.like reproduces it
    for `heads predict --data`). A ViT of a fixed size, and CLIP's tower, are refused by name, no file left."""
    from cli import featcache_app
    from featcache.extract.config import ExtractConfig
    backbone = f"hf:{models['bert']}+timm:test_resnet@{models['cnn']}"
    own, big = str(tmp_path / "own.h5"), str(tmp_path / "big.h5")
    _extract(models, backbone, own, "--limit", "3")
    r = _extract(models, backbone, big, "--limit", "3", "--image-size", "320")  # test_resnet's own: 160 px
    with h5py.File(own, "r") as f, h5py.File(big, "r") as g:
        P, meta = f["image/tokens"].shape[1], json.loads(g.attrs["meta"])
        assert g["image/tokens"].shape[1] == 4 * P and g["image/pooled"].shape == f["image/pooled"].shape
        assert not np.allclose(f["image/pooled"][:], g["image/pooled"][:], atol=1e-3)
        assert meta["preprocessing"]["image_size"] == 320 and "image_size" not in json.loads(f.attrs["meta"])["preprocessing"]
        assert meta["key"] != json.loads(f.attrs["meta"])["key"]
    assert f"image {4 * P} x" in " ".join(r.output.split())
    assert ExtractConfig.like(meta, models["data"]).image_size == 320
    name = f"timm:test_resnet@{models['cnn']}"  # JPEGs decode at least at the side the transform resizes to
    assert create_image(name, locate(name), image_size=320).decode_side() == 336  # floor(320 / crop_pct 0.95)
    from featcache.cache.store import feature_signature  # a head trained at one size refuses caches of another
    assert feature_signature(meta) != feature_signature(json.loads(h5py.File(own, "r").attrs["meta"]))
    vit = save_timm("vit_tiny_patch16_224", str(tmp_path / "vit224.pth"))  # fixed size (test_vit takes any)
    for bad, name in ((f"hf:{models['bert']}+timm:vit_tiny_patch16_224@{vit}", "vit_tiny_patch16_224"),
                      (f"open_clip:tiny-clip16@{models['clip']}", "tiny-clip16")):
        out_file = tmp_path / f"bad-{name}.h5"
        r = CliRunner().invoke(featcache_app, ["extract", "--data", models["data"], "--backbone", bad, "--out",
                                               str(out_file), "--no-progress", "--workers", "0", "--limit", "3",
                                               "--image-size", "96"])
        out = " ".join(r.output.split())
        assert r.exit_code == 2 and "--image-size" in out and name in out and "Traceback" not in out, out
        assert not os.path.exists(out_file)
