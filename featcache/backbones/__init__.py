"""Backbones: frozen text, image and caption encoders behind two small interfaces (featcache.backbones.base).

Importing this package imports every family module, each registering its open family (featcache.backbones.registry),
then the short names, aliases of open specs (featcache.backbones.aliases); the registry's functions are
re-exported here as the package's API. Any model of an open family needs no code (`hf:ID`); a new short name is
one `Alias` line in aliases.py; a new family is one module plus its name in the import line below. Importing it costs torch and torchvision: light commands (`featcache info`) do not.
"""
from __future__ import annotations

from . import hf_text, clip, blip, timm_image, aliases  # noqa: F401  (aliases last: it names the families' specs)  isort: skip
from .registry import (BACKBONES, DEFAULT_BACKBONE, Alias, BackboneSpec, Family, create_captioner, create_image,
                       create_text, get_backbone_spec, list_backbones, locate, parse_backbone, sized)

__all__ = ["BACKBONES", "DEFAULT_BACKBONE", "Alias", "BackboneSpec", "Family", "create_captioner", "create_image",
           "create_text", "get_backbone_spec", "list_backbones", "locate", "parse_backbone", "sized"]
