"""open_clip CLIP (ViT-B/32 by default): one model, two towers, loaded once when both are asked for.

What is stored (documented in the registry too):
  text : the 77 context positions after ln_final (pre-projection width), mask = positions up to EOT;
         pooled = the EOT state projected by text_projection (the CLIP text embedding).
  image: the patch tokens after ln_post, before the projection (class token excluded);
         pooled = the projected class embedding (the CLIP image embedding).
Weights: an open_clip tag (`openai` by default; `clip-vit-b32@TAG` for others), a checkpoint file, or an
open_clip model folder (open_clip_config.json + open_clip_model.safetensors, as on the HF hub).
`open_clip:<arch>@<tag or path>` names any open_clip architecture the same way (OPEN_FAMILIES); the towers must be
open_clip's own (a timm or HF tower, as SigLIP's, is refused when built).
"""
from __future__ import annotations

import functools
import json
import os

import torch

from ..errors import ConfigError
from .base import ImageEncoder, TextEncoder
from .registry import OPEN_FAMILIES, BackboneSpec, Family, OpenFamily
from .weights import WeightsError, WeightsSource, hf_cached, hub_or_missing, local_source


def locate(spec, tag: str, override: str | None) -> WeightsSource:
    import open_clip  # heavy: open_clip, only when CLIP is located or built
    if spec.name.startswith("open_clip:"):
        if not tag:
            raise WeightsError(f"'{spec.name}' needs @TAG or @PATH, e.g. {spec.name}@openai; tags for it: "
                               f"{', '.join(open_clip.list_pretrained_tags_by_model(spec.hub)) or 'none'}")
        if not override and (os.path.exists(tag) or os.sep in tag):
            override = tag  # open_clip:ARCH@PATH: the checkpoint file or folder (must exist)
    looked: list[str] = []
    source = local_source(spec.name, override, looked)
    if source:
        return source
    cfg = open_clip.get_pretrained_cfg(spec.hub, tag)
    if not cfg:
        raise WeightsError(f"open_clip has no pretrained tag '{tag}' for {spec.hub}; tags: "
                           f"{', '.join(open_clip.list_pretrained_tags_by_model(spec.hub))}")
    hf_id = cfg.get("hf_hub", "").rstrip("/")
    return hub_or_missing(
        spec.name, looked, hf_cached(hf_id) if hf_id else None, f"the HF cache for {hf_id} (empty)" if hf_id else "",
        f"{spec.hub}@{tag}", f"Online: open_clip downloads '{spec.hub}' tag '{tag}' by itself. Offline: download "
        f"HF repo {hf_id or 'of the tag'} (open_clip_config.json + open_clip_model.safetensors) to a folder, or any "
        "open_clip checkpoint file for ViT-B-32.", cached_target=f"{spec.hub}@{tag}")


@functools.lru_cache(maxsize=2)
def load_clip(arch: str, location: str):
    """(model, preprocess, open_clip name: what get_tokenizer takes) for a folder, a checkpoint file or 'ARCH@TAG'; cached so the text and
    image towers of one --backbone share a single model in memory."""
    import open_clip  # heavy: open_clip, only when CLIP is located or built
    if os.path.isdir(location):
        name, pretrained = f"local-dir:{location}", None
    elif os.path.isfile(location):
        name, pretrained = arch, location
    else:
        name, pretrained = location.split("@", 1)
    # require_pretrained: a CLIP with random weights must never pass silently as "ViT-B-32".
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained,
                                                                 require_pretrained=True)
    return model.eval(), preprocess, name


class CLIPText(TextEncoder):
    layer_table = {"layers": "clip.transformer.resblocks", "post": ("clip.ln_final", "clip.text_projection")}

    def __init__(self, model, tokenizer):
        super().__init__()
        self.clip, self._tokenizer = model, tokenizer
        self.max_len = model.context_length
        self.token_dim = model.transformer.width
        proj = model.text_projection
        self.pooled_dim = proj.shape[1] if isinstance(proj, torch.Tensor) else proj.out_features
        self.num_layers = len(model.transformer.resblocks)

    def tokenize(self, texts):
        ids = self._tokenizer(list(texts))
        eot = ids.argmax(dim=-1)  # the EOT id is the largest in CLIP's vocabulary
        mask = torch.arange(ids.shape[1])[None, :] <= eot[:, None]
        return {"input_ids": ids, "attention_mask": mask}

    def embed(self, batch):
        # Sliced to the batch length: stage 2 cuts trailing positions that are padding in every row.
        ids = batch["input_ids"]
        return self.clip.token_embedding(ids) + self.clip.positional_embedding[:ids.shape[1]]

    def run_block(self, block, hidden, batch):
        # Causal attention: positions after EOT never influence the ones we keep (which is also why a batch
        # cut to its longest text, as stage 2 runs it, is exact: the mask is sliced to match).
        n = hidden.shape[1]
        attn = self.clip.attn_mask[:n, :n] if self.clip.attn_mask is not None else None
        if not self.clip.transformer.batch_first:
            return block(hidden.transpose(0, 1), attn_mask=attn).transpose(0, 1)
        return block(hidden, attn_mask=attn)

    def finish(self, hidden, batch):
        x = self.clip.ln_final(hidden)
        eot = x[torch.arange(x.shape[0], device=x.device), batch["input_ids"].argmax(dim=-1)]  # one device
        proj = self.clip.text_projection
        pooled = proj(eot) if isinstance(proj, torch.nn.Module) else eot @ proj
        return {"tokens": x, "mask": batch["attention_mask"], "pooled": pooled}


class CLIPImage(ImageEncoder):
    def __init__(self, model, preprocess):
        super().__init__()
        if not hasattr(model.visual, "transformer"):
            raise ConfigError(f"this open_clip model's image tower is a {type(model.visual).__name__}, not "
                              "open_clip's VisionTransformer; name its image tower with timm:NAME instead")
        self.visual, self._preprocess = model.visual, preprocess
        size = model.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else size
        grid = model.visual.grid_size
        self.num_patches = grid[0] * grid[1]
        self.token_dim = model.visual.transformer.width
        self.pooled_dim = model.visual.output_dim

    def transform(self, img):
        return self._preprocess(img)

    def pixel_transform(self):
        return self._preprocess

    def forward_features(self, pixels):
        # output_tokens is a flag on the shared model: set it only for this call, so encode_image stays intact.
        self.visual.output_tokens = True
        try:
            pooled, tokens = self.visual(pixels)
        finally:
            self.visual.output_tokens = False
        return {"tokens": tokens, "pooled": pooled}


def dims(spec, source: WeightsSource, role: str):
    """From the folder's open_clip_config.json or open_clip's config of the architecture."""
    import open_clip  # heavy: open_clip, only when a CLIP's size is estimated
    path = os.path.join(str(source.location), "open_clip_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            cfg = json.load(f)["model_cfg"]
    else:
        cfg = open_clip.get_model_config(spec.hub)
    if role == "text":
        t = cfg["text_cfg"]
        return t.get("context_length", 77), t["width"], cfg["embed_dim"]
    v = cfg["vision_cfg"]
    return (v["image_size"] // v["patch_size"]) ** 2, v["width"], cfg["embed_dim"]


def build_text(spec, source: WeightsSource, max_len: int = 77) -> CLIPText:
    import open_clip  # heavy: open_clip, only when CLIP is built
    model, _, name = load_clip(spec.hub, str(source.location))
    if not hasattr(model, "transformer") or getattr(model, "text_pool_type", "argmax") != "argmax":
        # checked before its tokenizer is made: a SigLIP tokenizer would first download its vocabulary
        raise ConfigError(f"this open_clip model's text tower ({type(model).__name__}, pooling "
                          f"'{getattr(model, 'text_pool_type', '?')}') is not CLIP's causal EOT-pooled one "
                          "(SigLIP-style) and is not supported yet; name the towers separately instead, "
                          "e.g. hf:ID+timm:NAME")
    return CLIPText(model, open_clip.get_tokenizer(name))


def build_image(spec, source: WeightsSource) -> CLIPImage:
    model, preprocess, _ = load_clip(spec.hub, str(source.location))
    return CLIPImage(model, preprocess)


CLIP = Family("clip", locate, build_text=build_text, build_image=build_image, dims=dims)


def open_spec(name: str) -> BackboneSpec:
    """`open_clip:<arch>`: both towers of any open_clip architecture; the @TAG/@PATH is the weights."""
    import open_clip  # heavy: open_clip, to check the architecture name before anything is located
    arch = name.split(":", 1)[1]
    if arch not in open_clip.list_models():
        raise ConfigError(f"open_clip has no architecture '{arch}'; `python -c \"import open_clip; "
                          "print(open_clip.list_models())\"` lists them")
    return BackboneSpec(name, ("text", "image"), CLIP, arch, f"open_clip {arch}: stored as for clip-vit-b32")


OPEN_FAMILIES.add("open_clip", OpenFamily(open_spec, "open_clip:ViT-L-14-336@openai",
                                          "both towers of an open_clip model (@pretrained tag or checkpoint path)"))
