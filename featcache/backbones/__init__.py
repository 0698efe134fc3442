"""Backbones: frozen text, image and caption encoders behind two small interfaces (featcache.backbones.base).

Importing this package imports every family module, and each registers the backbones it builds
(featcache.backbones.registry); the registry's functions are re-exported here as the package's API. A new
backbone of an existing family is one spec in that family's module; a new family is one module plus its name
in the import line below. Importing it costs torch and torchvision: light commands (`featcache info`) do not.
"""
from __future__ import annotations

from . import hf_text, clip, cnn, blip, timm_image  # noqa: F401  (order = the order `featcache backbones` lists them)  isort: skip
from .registry import (BACKBONES, DEFAULT_BACKBONE, BackboneSpec, Family, create_captioner, create_image, create_text,
                       get_backbone_spec, list_backbones, locate, parse_backbone)

__all__ = ["BACKBONES", "DEFAULT_BACKBONE", "BackboneSpec", "Family", "create_captioner", "create_image",
           "create_text", "get_backbone_spec", "list_backbones", "locate", "parse_backbone"]
