"""The fusion-head registry: `@FUSIONS.register(name)` on each head's class, in its own file (base.py has the
registry and the shared seam). `create_fusion(cfg, dims)` builds one; unknown names raise, listing the valid.

Every head takes the same batch dict (see base.py), a HeadConfig (what the user chose) and HeadDims (what the
cache dictates), and returns {"logits": ...} (+ extras such as the GMU "gate"). Adding a head = one file with
a registered class, imported below (the import order is the order `heads fusions` and the default grid list).
"""
from __future__ import annotations

from . import concat, gmu, film, cross_attn, co_attn  # noqa: F401  (each registers its head, in this order)  isort: skip
from .base import DEFAULT_FUSION, FUSIONS, MODALITIES, FusionHead, HeadConfig, HeadDims
from .legacy import LEGACY


def list_fusions() -> list[str]:
    return FUSIONS.names()


def get_fusion(name: str) -> type[FusionHead]:
    return FUSIONS.get(name)


def create_fusion(cfg: HeadConfig, dims: HeadDims) -> FusionHead:
    return FUSIONS.get(cfg.fusion)(cfg, dims)


def load_fusion(cfg: HeadConfig, dims: HeadDims, state: dict) -> FusionHead:
    """The head that a run's saved weights `state` belong to: today's head of cfg.fusion, or the one it replaced
    (heads.fusions.legacy) when the weights hold that one's layers, so older runs keep loading. The caller loads
    `state` into it, strictly: weights that fit neither are the caller's error to report."""
    model = create_fusion(cfg, dims)
    older = LEGACY.get(cfg.fusion)
    if older is not None and set(state) != set(model.state_dict()):
        legacy = older(cfg, dims)
        if set(state) == set(legacy.state_dict()):
            return legacy
    return model


__all__ = ["DEFAULT_FUSION", "FUSIONS", "MODALITIES", "FusionHead", "HeadConfig", "HeadDims", "create_fusion",
           "get_fusion", "list_fusions", "load_fusion"]
