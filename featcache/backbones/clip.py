"""open_clip models, both towers of one model loaded once: CLIP (clip-vit-b32) and any `open_clip:<arch>@<tag or path>`,
SigLIP-style CustomTextCLIP included.

What is stored:
  text : every context position after ln_final (pre-projection width); pooled = the state at the tower's pooling
         position (EOT for CLIP's argmax, eos, first, or SigLIP's last), projected as encode_text does.
         mask = positions up to the pooled/last real token when padding cannot influence them (CLIP: causal);
         every position when it can (SigLIP: bidirectional without a padding mask, pooled at the last position).
         A transformers text tower (CustomTextCLIP with hf_model_name) stores its last hidden states, mask = not
         padding, pooled = its pooler + projection; it runs whole (no stage 2).
  image: open_clip's VisionTransformer: the patch tokens after ln_post, before the projection (class token
         excluded), pooled = the projected class embedding. A timm tower (TimmModel, SigLIP's): the trunk's
         forward_features without prefix tokens, pooled = encode_image's output (attention pool, head).
Weights: an open_clip tag (`openai` by default; `clip-vit-b32@TAG` for others), a checkpoint file, or an
open_clip model folder (open_clip_config.json + open_clip_model.safetensors, as on the HF hub).
"""
from __future__ import annotations

import functools
import json
import os

import torch

from ..errors import ConfigError
from .base import ImageEncoder, TextEncoder, get_attr_path
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
    """open_clip's own text transformer, block by block: CLIP's (its attributes on the model) or a CustomTextCLIP's
    TextTransformer (model.text: SigLIP's), pooled as the tower pools (argmax = EOT, eos, first or last position)
    and projected as encode_text does."""
    layer_table = {"layers": "clip.transformer.resblocks", "post": ("clip.ln_final", "clip.text_projection")}  # CLIP's

    def __init__(self, model, tokenizer):
        super().__init__()
        self.clip, self._tokenizer = model, tokenizer
        custom = not hasattr(model, "transformer")  # CustomTextCLIP: the tower is model.text
        self._tower = "clip.text" if custom else "clip"  # clip.*: the parameter names stage-2 runs saved
        t = self.tower
        self.pool = getattr(t, "pool_type" if custom else "text_pool_type", "argmax")
        self.eos_id = getattr(t, "eos_id" if custom else "text_eos_id", None)
        cls_emb = getattr(t, "cls_emb", None) is not None
        if self.pool not in ("argmax", "eos", "first", "last") or cls_emb:
            raise ConfigError(f"this open_clip text tower pools '{self.pool}'"
                              f"{' with an appended class token (CoCa)' if cls_emb else ''}; supported: argmax, eos, "
                              "first and last pooling without an appended class token")
        self.pad_id, self.pad_masked = getattr(t, "pad_id", 0), bool(getattr(t, "use_pad_mask", False))
        # The stored mask. Extraction and stage 2 cut positions that are padding in every row: exact only where the
        # kept positions never attend to the cut ones (causal, or padding masked as keys) and the pooled one is
        # kept. Otherwise (SigLIP: bidirectional, pooled at the last position) every position is kept.
        self.full = not (t.attn_mask is not None or self.pad_masked) or self.pool == "last"
        self.max_len = model.context_length
        self.token_dim = t.transformer.width
        proj = t.text_projection
        self.pooled_dim = self.token_dim if proj is None else \
            proj.shape[1] if isinstance(proj, torch.Tensor) else proj.out_features
        self.num_layers = len(t.transformer.resblocks)
        if custom or proj is None:  # another tower's paths (CLIP's table stays the class's)
            self.layer_table = {"layers": f"{self._tower}.transformer.resblocks",
                                "post": (f"{self._tower}.ln_final",) + ((f"{self._tower}.text_projection",) if
                                                                         proj is not None else ())}

    @property
    def tower(self):
        return get_attr_path(self, self._tower)

    def tokenize(self, texts):
        ids = self._tokenizer(list(texts))
        pos = torch.arange(ids.shape[1])[None, :]
        if self.full:
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool)}
        if self.pool == "argmax":
            end = ids.argmax(dim=-1)  # the EOT id is the largest in CLIP's vocabulary
        elif self.pool == "eos":
            end = (ids == self.eos_id).int().argmax(dim=-1)
        else:  # first: up to the last non-padding token
            end = ((ids != self.pad_id) * pos).max(dim=-1).values
        return {"input_ids": ids, "attention_mask": pos <= end[:, None]}

    def embed(self, batch):
        # Sliced to the batch length: stage 2 cuts trailing positions that are padding in every row.
        ids, t = batch["input_ids"], self.tower
        return t.token_embedding(ids) + t.positional_embedding[:ids.shape[1]]

    def run_block(self, block, hidden, batch):
        # Causal attention: positions after EOT never influence the ones we keep (which is also why a batch
        # cut to its longest text, as stage 2 runs it, is exact: the mask is sliced to match).
        n, t = hidden.shape[1], self.tower
        attn = t.attn_mask[:n, :n] if t.attn_mask is not None else None
        if self.pad_masked:  # open_clip's own (B*heads, n, n) padding mask, as TextTransformer._embeds adds it
            pad = t._build_additive_mask(batch["input_ids"], n, hidden.dtype)
            attn = pad if attn is None else attn.unsqueeze(0) + pad
        if not t.transformer.batch_first:
            return block(hidden.transpose(0, 1), attn_mask=attn).transpose(0, 1)
        return block(hidden, attn_mask=attn)

    def finish(self, hidden, batch):
        from open_clip.transformer import text_global_pool  # open_clip is loaded: this object wraps its model
        t = self.tower
        x = t.ln_final(hidden)
        pooled = text_global_pool(x, batch["input_ids"].to(x.device), self.pool, eos_token_id=self.eos_id)
        proj = t.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, torch.nn.Module) else pooled @ proj
        return {"tokens": x, "mask": batch["attention_mask"], "pooled": pooled}


class HFTowerText(TextEncoder):
    """A CustomTextCLIP's transformers text tower (open_clip.hf_model.HFTextEncoder), run whole: tokens = every
    position's last hidden state (its CLS too), mask = not padding, pooled = its pooler + projection (encode_text).
    Its blocks are not open_clip's, so --text-layers / stage 2 are refused."""
    layer_table: dict = {}

    def __init__(self, model, tokenizer):
        super().__init__()
        self.clip, self._tokenizer = model, tokenizer
        cfg = model.text.transformer.config
        self.max_len = getattr(tokenizer, "context_length", model.context_length)
        self.token_dim, self.pooled_dim = cfg.hidden_size, model.text.output_dim
        self.num_layers, self.pad_id = cfg.num_hidden_layers, model.text.config.pad_token_id

    def layers(self):
        raise ConfigError("this open_clip model's text tower is a transformers model run as a whole; --text-layers "
                          "and stage 2 need open_clip's own text transformer")

    def tokenize(self, texts):
        ids = self._tokenizer(list(texts))
        return {"input_ids": ids, "attention_mask": ids != self.pad_id}

    def forward_features(self, batch, start_layer=None):
        if start_layer is not None:
            self.layers()
        t, mask = self.clip.text, batch["attention_mask"].long()
        out = t.transformer(input_ids=batch["input_ids"], attention_mask=mask)
        return {"tokens": out.last_hidden_state, "mask": batch["attention_mask"], "pooled": t.proj(t.pooler(out, mask))}


class CLIPImage(ImageEncoder):
    def __init__(self, model, preprocess):
        super().__init__()
        v = model.visual
        if getattr(v, "attn_pool", None) is not None or getattr(v, "pool_type", "tok") not in ("tok", "avg"):
            raise ConfigError("this open_clip image tower pools with an attention pooler or keeps its class token "
                              "among the tokens; supported: class-token or average pooling")
        self.visual, self._preprocess = v, preprocess
        size = v.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else size
        self.grid = tuple(v.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.token_dim = v.transformer.width
        self.pooled_dim = v.output_dim

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


class TimmTowerImage(CLIPImage):
    """A CustomTextCLIP's timm image tower (open_clip.timm_model.TimmModel: SigLIP's, attention-pooled): tokens =
    trunk.forward_features without the prefix (class / register) tokens, or a CNN's map flattened; pooled =
    head(trunk.forward_head(features)), which is encode_image (TimmModel runs head(trunk(x)))."""

    def __init__(self, model, preprocess):
        ImageEncoder.__init__(self)
        self.visual, self._preprocess = model.visual, preprocess
        size = tuple(model.visual.image_size)
        self.image_size, self.prefix = size[0], getattr(model.visual.trunk, "num_prefix_tokens", 0)
        with torch.inference_mode():  # one blank image: the token grid and widths, whatever the trunk
            feats = model.visual.trunk.forward_features(torch.zeros(1, 3, *size))
            out = self.forward_features(torch.zeros(1, 3, *size))
        self.grid = tuple(feats.shape[2:]) if feats.ndim == 4 else \
            tuple(getattr(getattr(model.visual.trunk, "patch_embed", None), "grid_size", ()) or ())
        self.num_patches, self.token_dim = out["tokens"].shape[1:]
        self.pooled_dim = out["pooled"].shape[-1]

    def forward_features(self, pixels):
        trunk = self.visual.trunk
        feats = trunk.forward_features(pixels)
        tokens = feats.flatten(2).transpose(1, 2) if feats.ndim == 4 else feats[:, self.prefix:]
        return {"tokens": tokens, "pooled": self.visual.head(trunk.forward_head(feats))}


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
    if v.get("timm_model_name"):  # a timm tower (SigLIP's): its trunk's tokens; pooled = the embedding
        from .timm_image import meta_dims  # a sibling family module, only for this estimate
        return (*meta_dims(v["timm_model_name"], num_classes=0)[:2], cfg["embed_dim"])
    return (v["image_size"] // v["patch_size"]) ** 2, v["width"], cfg["embed_dim"]


def build_text(spec, source: WeightsSource, max_len: int = 77) -> TextEncoder:
    import open_clip  # heavy: open_clip, only when CLIP is built
    model, _, name = load_clip(spec.hub, str(source.location))
    hf = type(getattr(model, "text", None)).__name__ == "HFTextEncoder"
    return (HFTowerText if hf else CLIPText)(model, open_clip.get_tokenizer(name))


def build_image(spec, source: WeightsSource) -> ImageEncoder:
    model, preprocess, _ = load_clip(spec.hub, str(source.location))
    if type(model.visual).__name__ == "TimmModel":
        return TimmTowerImage(model, preprocess)
    if not hasattr(model.visual, "transformer"):
        raise ConfigError(f"this open_clip model's image tower is a {type(model.visual).__name__}, not open_clip's "
                          "VisionTransformer or a timm model; name its image tower with timm:NAME instead")
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
