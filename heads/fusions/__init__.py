"""The fusion-head registry: name -> FusionSpec. `create_fusion(name, cfg)` builds one; unknown names raise.

Every head takes the same batch dict (see base.py) and a HeadConfig, and returns {"logits": ...} (+ extras
such as the GMU "gate"). Adding a head = one file + one line in FUSIONS.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import MODALITIES, FusionHead, HeadConfig
from .co_attn import CoAttnHead
from .concat import ConcatHead
from .cross_attn import CrossAttnHead
from .film import FiLMHead
from .gmu import GMUHead


@dataclass(frozen=True)
class FusionSpec:
    name: str
    cls: type
    description: str
    uses_tokens: bool  # True: reads token/patch features (and masks), not only the pooled vectors


FUSIONS: dict[str, FusionSpec] = {s.name: s for s in [
    FusionSpec("concat", ConcatHead, "pooled text ‖ pooled image -> LayerNorm -> MLP (baseline)", False),
    FusionSpec("gmu", GMUHead, "gated multimodal unit on pooled vectors; exports the per-sample gate", False),
    FusionSpec("film", FiLMHead, "pooled text -> FiLM scale/shift of the image patch tokens, then pool", True),
    FusionSpec("cross-attn", CrossAttnHead, "text tokens attend over image patches; masked text pooling", True),
    FusionSpec("co-attn", CoAttnHead, "text->image and image->text attention (masked), pooled and fused",
               True),
]}

# Set from measurements on the shared data (README); until then the cheapest token-level head.
DEFAULT_FUSION = "film"


def list_fusions() -> list[str]:
    return list(FUSIONS)


def get_fusion(name: str) -> FusionSpec:
    if name not in FUSIONS:
        raise ValueError(f"unknown fusion {name!r}; valid: {', '.join(FUSIONS)}")
    return FUSIONS[name]


def create_fusion(name: str, cfg: HeadConfig) -> FusionHead:
    return get_fusion(name).cls(cfg)


__all__ = ["DEFAULT_FUSION", "FUSIONS", "MODALITIES", "FusionHead", "FusionSpec", "HeadConfig",
           "create_fusion", "get_fusion", "list_fusions"]
