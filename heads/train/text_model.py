"""Stage-2 model: the top N text blocks + the backbone's finish (norm / pooling / projection) feeding a
fusion head through the same batch keys the heads read from the cache.

    FinetuneModel(head, text, N)(batch) -> {"logits": ...}

With N = 0 nothing of the text tower changes, so the cached text features ARE its output: the model is the
head on the cache, bit for bit stage 1. With N > 0 the batch carries either `hidden` (states entering block
L-N, from the cache) or only the token ids, in which case the frozen part runs first without autograd (the
`--text-forward full` fallback and the bench's baseline).

Only the unfrozen parameters are saved (text_layers.safetensors); predict rebuilds the backbone from the
cache's recorded weights and loads them on top.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from ..data.text_layers import IMAGE_KEYS, TextInputs, model_batch

LAYERS_FILE = "text_layers.safetensors"


class FinetuneModel(nn.Module):
    def __init__(self, head: nn.Module, text: nn.Module | None = None, unfreeze: int = 0):
        super().__init__()
        self.head, self.unfreeze = head, unfreeze
        self.text = text if unfreeze else None  # N=0: the backbone is not needed at all
        self.start = text.num_layers - unfreeze if self.text is not None else None
        self.inputs = head.inputs  # cache keys gathered per batch (stage-1 path when N=0)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.text is None:
            return self.head(batch)
        tb = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        hidden = batch.get("hidden")
        if hidden is None:
            with torch.no_grad():  # frozen: no graph, no activations kept
                hidden = self.text.embed(tb)
                for block in list(self.text.layers())[:self.start]:
                    hidden = self.text.run_block(block, hidden, tb)
        out = self.text.forward_layers(hidden, tb, self.start)
        hb = {k: batch[k] for k in IMAGE_KEYS if k in batch}
        hb.update(text_tokens=out["tokens"], text_mask=out["mask"], text_pooled=out["pooled"])
        return self.head(hb)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.text is not None:  # frozen blocks stay in eval (no dropout), as when their states were cached
            self.text.eval()
            for block in list(self.text.layers())[self.start:]:
                block.train(mode)
        return self

    def text_params(self) -> dict[str, torch.Tensor]:
        if self.text is None:
            return {}
        return {n: p for n, p in self.text.named_parameters() if p.requires_grad}


def save_text_layers(run_dir: str, model: FinetuneModel) -> None:
    from safetensors.torch import save_file
    state = {k: v.detach().cpu().contiguous() for k, v in model.text_params().items()}
    save_file(state, os.path.join(run_dir, LAYERS_FILE))


def load_text_layers(run_dir: str, text: nn.Module) -> None:
    from safetensors.torch import load_file
    path = os.path.join(run_dir, LAYERS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir} is a finetune run without {LAYERS_FILE}; it is incomplete")
    state = load_file(path)
    missing, unexpected = text.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{path} holds parameters the text backbone does not have: {', '.join(unexpected[:5])}")


@torch.inference_mode()
def ft_logits(model: FinetuneModel, data, text: TextInputs | None, rows, device, batch_size: int = 512,
              autocast=None) -> np.ndarray:
    """Logits for `rows` in eval mode (the stage-1 `infer` path when no text layer trains)."""
    from ..infer import infer
    if text is None:
        return infer(model.head, data, rows, device, batch_size)["logits"]
    model.eval()
    rows = np.asarray(rows, dtype=np.int64)
    outs = [torch.zeros(0, model.head.cfg.num_classes)]
    for i in range(0, len(rows), batch_size):
        b = model_batch(data, text, rows[i:i + batch_size], device, model.inputs)
        outs.append(model(b)["logits"].float().cpu())
    return torch.cat(outs).numpy()


def finetune_logits(run_dir: str, cfg: dict, head: nn.Module, data, rows, device, say=None) -> np.ndarray:
    """What `heads predict` runs for a finetune run: the cache's text backbone + the run's saved layers."""
    from featcache.addon import load_text_backbone

    from ..data.text_layers import prepare_text_inputs
    fcfg = cfg["finetune"]
    n = int(fcfg["unfreeze_text"])
    if n == 0:
        return ft_logits(FinetuneModel(head), data, None, rows, device)
    text = load_text_backbone(data.meta)
    text.lock(n)
    text.to(device)
    say = say or (lambda m: None)
    # before loading the run's layers: the states are checked against the cache with the original weights
    inputs = prepare_text_inputs(data, text, n, fcfg.get("text_forward", "cached"), device, say)
    load_text_layers(run_dir, text)
    return ft_logits(FinetuneModel(head, text, n).to(device), data, inputs, rows, device)
