"""BLIP captioner (transformers): one caption per image, generated once at extraction time.

Greedy decoding keeps captions deterministic, so a resumed extraction writes the same strings. The caption
transform (resize to the processor's square size, its mean/std) runs in the DataLoader workers like the
image backbone's, so captioning adds model time but no decode time.
"""
from __future__ import annotations

import os

import torch
from torchvision import transforms as T

from .hf_text import locate_hf
from .registry import BackboneSpec, Family
from .weights import WeightsSource, offline


def locate(spec, tag: str, override: str | None) -> WeightsSource:
    return locate_hf(spec, override, f"Online: it downloads {spec.hub} by itself. Offline: copy that HF repo "
                     "(config.json, preprocessor_config.json, tokenizer files, model.safetensors) to a folder.")


class BlipCaptioner(torch.nn.Module):
    def __init__(self, location: str, max_new_tokens: int = 30):
        super().__init__()
        from transformers import BlipForConditionalGeneration, BlipProcessor  # heavy: transformers, only when BLIP is built
        local = os.path.exists(location)
        self.processor = BlipProcessor.from_pretrained(location, local_files_only=local or offline())
        self.model = BlipForConditionalGeneration.from_pretrained(location,
                                                                  local_files_only=local or offline()).eval()
        ip = self.processor.image_processor
        # a dict in transformers 4, a SizeDict (dict-like, not a dict) in transformers 5
        size = ip.size.get("height", 384) if hasattr(ip.size, "get") else int(ip.size)
        self.image_size = size
        self._transform = T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC),
                                     T.ToTensor(), T.Normalize(ip.image_mean, ip.image_std)])
        self.max_new_tokens = max_new_tokens

    def transform(self, img):
        return self._transform(img)

    def pixel_transform(self):
        """The transform without the model (see featcache.backbones.base.ImageEncoder.pixel_transform)."""
        return self._transform

    def caption(self, pixels: torch.Tensor) -> list[str]:
        ids = self.model.generate(pixel_values=pixels, max_new_tokens=self.max_new_tokens, num_beams=1,
                                  do_sample=False)
        return [c.strip() for c in self.processor.batch_decode(ids, skip_special_tokens=True)]


def build_captioner(spec, source: WeightsSource) -> BlipCaptioner:
    return BlipCaptioner(str(source.location))


BLIP = Family("blip", locate, build_captioner=build_captioner)
BLIP_BASE = BackboneSpec("blip-base", ("caption",), BLIP, "Salesforce/blip-image-captioning-base",
                         "BLIP base captioner (greedy decoding, up to 30 tokens)")  # the blip-base alias's spec
