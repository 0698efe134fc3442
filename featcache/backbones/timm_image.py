"""`timm:<name>[@<checkpoint path>]`: any timm image model behind the ImageEncoder interface.

What is stored:
  tokens: `forward_features` -> a CNN's final map flattened to H*W patches, or a ViT's tokens without its prefix
          (class / register) tokens;
  pooled: `forward_head(features, pre_logits=True)`: what the model's classifier reads.
Preprocessing is timm's own data config for the model (input size, interpolation, crop, mean/std).

Weights: the checkpoint after `@` (a state dict: .pth / .safetensors, loaded without executing anything), else
$FEATCACHE_WEIGHTS/timm:<name>, else timm's HF hub repo (hub cache first; offline it names every place looked).
"""
from __future__ import annotations

import os

import torch

from ..errors import ConfigError
from .base import ImageEncoder
from .registry import OPEN_FAMILIES, BackboneSpec, Family, OpenFamily
from .weights import WeightsError, WeightsSource, hf_cached, hub_or_missing, load_state_dict, local_source



def _hf_repo(arch: str) -> str:
    import timm  # heavy: timm, only when a timm backbone is located
    cfg = timm.models.get_pretrained_cfg(arch)
    return (getattr(cfg, "hf_hub_id", None) or f"timm/{arch}") if cfg else f"timm/{arch}"


def locate(spec, tag: str, override: str | None) -> WeightsSource:
    looked: list[str] = []
    source = local_source(spec.name, override or tag or None, looked)
    if source:
        return source
    repo = _hf_repo(spec.hub)
    return hub_or_missing(spec.name, looked, hf_cached(repo), f"the HF cache for {repo} (empty)", repo,
                          f"Online: timm downloads {repo} by itself. Offline: save the model's state "
                  f"dict and name it: {spec.name}@/path/to/checkpoint.pth.")


def _state_dict(source: WeightsSource) -> dict:
    loc = str(source.location)
    if os.path.isdir(loc):  # an HF snapshot of a timm repo
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(loc, name)):
                return load_state_dict(os.path.join(loc, name))
        raise WeightsError(f"{loc} holds neither model.safetensors nor pytorch_model.bin")
    return load_state_dict(loc)


class TimmImage(ImageEncoder):
    def __init__(self, arch: str, source: WeightsSource):
        super().__init__()
        import timm  # heavy: timm, only when a timm backbone is built
        if source.kind == "hub":
            self.net = timm.create_model(arch, pretrained=True)
        else:
            self.net = timm.create_model(arch, pretrained=False)
            try:
                self.net.load_state_dict(_state_dict(source))
            except RuntimeError as e:  # wrong architecture for the file: say which, briefly
                raise WeightsError(f"the checkpoint {source.location} does not fit timm '{arch}': "
                                   f"{str(e).splitlines()[0]}") from e
        self.net.eval()
        data_cfg = timm.data.resolve_data_config({}, model=self.net)
        self._transform = timm.data.create_transform(**data_cfg)
        self.image_size = data_cfg["input_size"][-1]
        self.prefix = getattr(self.net, "num_prefix_tokens", 0)
        with torch.inference_mode():  # one blank image: the token grid and widths, whatever the model
            feats = self.net.forward_features(torch.zeros(1, *data_cfg["input_size"]))
            pooled = self.net.forward_head(feats, pre_logits=True)
        self.grid = tuple(feats.shape[2:]) if feats.ndim == 4 else None
        self.num_patches = self._tokens(feats).shape[1]
        self.token_dim, self.pooled_dim = self._tokens(feats).shape[2], pooled.shape[-1]
        if self.grid is None:  # a ViT: a square grid unless the patch embed says otherwise
            self.grid = tuple(getattr(getattr(self.net, "patch_embed", None), "grid_size", ()) or ())

    def _tokens(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.ndim == 4:  # (B, C, H, W) -> (B, H*W, C)
            return feats.flatten(2).transpose(1, 2)
        return feats[:, self.prefix:]

    def transform(self, img):
        return self._transform(img)

    def pixel_transform(self):
        return self._transform

    def forward_features(self, pixels):
        feats = self.net.forward_features(pixels)
        return {"tokens": self._tokens(feats), "pooled": self.net.forward_head(feats, pre_logits=True)}


def dims(spec, source: WeightsSource, role: str):
    return meta_dims(spec.hub)


def meta_dims(arch: str, **kwargs) -> tuple[int, int, int]:
    """(tokens, token width, pooled width): the model built on the meta device (shapes only, no memory, no
    weights) and run on a meta image; also for open_clip's timm towers (featcache.backbones.clip.dims)."""
    import timm  # heavy: timm, only when a timm backbone's size is estimated
    with torch.device("meta"):
        net = timm.create_model(arch, pretrained=False, **kwargs)
        size = timm.data.resolve_data_config({}, model=net)["input_size"]
        feats = net.forward_features(torch.empty(1, *size))
        pooled = net.forward_head(feats, pre_logits=True)
    if feats.ndim == 4:
        return feats.shape[2] * feats.shape[3], feats.shape[1], pooled.shape[-1]
    return feats.shape[1] - getattr(net, "num_prefix_tokens", 0), feats.shape[2], pooled.shape[-1]


def build_image(spec, source: WeightsSource) -> TimmImage:
    return TimmImage(spec.hub, source)


TIMM = Family("timm", locate, build_image=build_image, dims=dims)


def open_spec(name: str) -> BackboneSpec:
    import timm  # heavy: timm, to check the model name before anything is located
    arch = name.split(":", 1)[1]
    if not timm.is_model(arch):
        raise ConfigError(f"timm has no model '{arch}'; `python -c \"import timm; print(timm.list_models('*vit*'))\"` "
                          "lists them")
    return BackboneSpec(name, ("image",), TIMM, arch, f"timm {arch}: tokens = forward_features (prefix tokens "
                        "dropped, CNN maps flattened), pooled = forward_head(pre_logits=True)")


OPEN_FAMILIES.add("timm", OpenFamily(open_spec, "timm:convnext_tiny@/path/convnext_tiny.pth",
                                     "any timm image model (@ an optional checkpoint path)"))
