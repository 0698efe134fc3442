"""Stage-2 model: the top N text layers + the backbone's finish (norm / pooling / projection) feeding a fusion
head through the same batch keys the heads read from the cache.

    FinetuneModel(head, text, N, cached=True)(batch) -> {"logits": ...}

With N = 0 nothing of the text tower changes, so the cached text features ARE its output: the model is the
head on the cache, bit for bit stage 1. With N > 0 the batch carries `input_ids` and either `text_states`
(the states entering layer L-N, from the cache: heads.data.text_layers) or nothing more, in which case the
frozen part runs first without autograd (the `--text-forward full` fallback and the bench's baseline).

Only the unfrozen parameters are saved (rundir's text_layers.safetensors); predict rebuilds the backbone from
the cache's recorded weights and loads them on top.
"""
from __future__ import annotations

import torch
from torch import nn

from featcache.errors import ConfigError

from ..data.text_layers import IMAGE_KEYS, text_batch
from ..fusions.base import NORMED


class FinetuneModel(nn.Module):
    def __init__(self, head: nn.Module, text: nn.Module | None = None, text_layers: int = 0, cached: bool = True):
        super().__init__()
        self.head, self.text_layers = head, text_layers
        self.text = text if text_layers else None  # N=0: the backbone is not needed at all
        self.start_layer = text.num_layers - text_layers if self.text is not None else None
        # the batch keys it reads (the stage-1 head's when N=0)
        self.inputs = head.inputs if self.text is None else (
            *[k for k in head.inputs if k in IMAGE_KEYS], "input_ids", "text_mask",
            *(("text_states",) if cached else ()))
        # what a training batch may carry pre-normalised (FusionHead.prenorm, as in stage 1): the head's own list,
        # less the text tokens, which the unfrozen layers recompute
        self.prenorm = head.prenorm if self.text is None else tuple(k for k in head.prenorm if k in IMAGE_KEYS)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.text is None:
            return self.head(batch)
        tb = text_batch(batch)
        hidden = batch.get("text_states")
        if hidden is None:
            with torch.no_grad():  # frozen: no graph, no activations kept
                hidden = self.text.run_blocks(self.text.embed(tb), tb, 0, self.start_layer)
        out = self.text.forward_layers(hidden, tb, self.start_layer)
        hb = {k: v for k, v in batch.items() if k.removesuffix(NORMED) in IMAGE_KEYS}
        hb.update(text_tokens=out["tokens"], text_mask=out["mask"], text_pooled=out["pooled"])
        return self.head(hb)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.text is not None:  # frozen blocks stay in eval (no dropout), as when their states were cached
            self.text.eval()
            for block in list(self.text.layers())[self.start_layer:]:
                block.train(mode)
        return self

    def text_params(self) -> dict[str, torch.Tensor]:
        if self.text is None:
            return {}
        return {n: p for n, p in self.text.named_parameters() if p.requires_grad}

    def load_text_params(self, state: dict[str, torch.Tensor], source: str) -> None:
        """The unfrozen parameters a stage-2 run saved (rundir.load_text_layers), on top of the backbone."""
        _, unexpected = self.text.load_state_dict(state, strict=False)
        if unexpected:
            raise ConfigError(f"{source} holds parameters the text backbone does not have: "
                             f"{', '.join(unexpected[:5])}")
