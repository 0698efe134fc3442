"""Stage-2 inputs: what the top N text blocks need, per cache row, kept in memory next to the CacheData.

    TextInputs.input_ids / attention_mask  the cache texts re-tokenized (checked equal to text/mask)
    TextInputs.hidden                      (N, L, D) fp16 states entering block `start` = num_layers - N,
                                           or None: the full text forward runs every step (the fallback)

The cache's text_hidden/states may start lower than L-N (extracted with more --text-layers than are
unfrozen now): the frozen blocks in between run ONCE here, without autograd, and their output is what
training reads. The frozen lower blocks therefore never run inside the training loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from featcache.addon import _check_tokens, tokenize_cache, trim
from featcache.manifest import open_cache
from featcache.store import CacheError

from .cache import CacheData

IMAGE_KEYS = ("image_tokens", "image_pooled")
FALLBACK = ("{path} has no text_hidden/states covering the top {n} text layers ({why}); falling back to the "
            "full text forward every step (slower). Add them once with `featcache add-text-layers {path} "
            "--layers {n}`.")


@dataclass
class TextInputs:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    start: int  # first block that runs per step
    hidden: torch.Tensor | None = None  # states entering block `start`; None = run embed + all blocks

    def batch(self, rows: torch.Tensor, device) -> dict[str, torch.Tensor]:
        """Rows as a trimmed text batch (positions that are padding in every row cut off: exact)."""
        b = {"input_ids": self.input_ids[rows], "attention_mask": self.attention_mask[rows]}
        if self.hidden is not None:
            b["hidden"] = self.hidden[rows]
        b, _ = trim(b)
        return {k: (v.float() if v.is_floating_point() else v).to(device, non_blocking=True) for k, v in b.items()}


def prepare_text_inputs(data: CacheData, text_model, unfreeze: int, mode: str = "cached", device="cpu",
                        say=print, batch_size: int = 128) -> TextInputs:
    """Tokens for every row and, in 'cached' mode, the states entering block L-N (see module docstring)."""
    L = text_model.num_layers
    target = L - unfreeze
    with open_cache(data.path) as r:
        tokens = tokenize_cache(r, text_model)
        start = (r.meta.get("text") or {}).get("hidden_start_layer")
        has = r.has("text_hidden/states") and start is not None
        if mode == "cached" and not (has and start <= target):
            why = "none stored" if not has else f"they enter layer {start}, above {target}"
            say(FALLBACK.format(path=data.path, n=unfreeze, why=why))
            mode = "full"
        if mode == "full":
            return TextInputs(tokens["input_ids"], tokens["attention_mask"], start=0)
        hidden = torch.from_numpy(r.array("text_hidden/states"))
    if start < target:
        say(f"running frozen text layers {start}..{target - 1} once over {len(data)} rows (the cache's states "
            f"enter layer {start}; the top {unfreeze} train)")
        hidden = run_frozen(text_model, hidden, tokens, start, target, batch_size, device)
    inputs = TextInputs(tokens["input_ids"], tokens["attention_mask"], start=target, hidden=hidden)
    _verify(text_model, inputs, data, device)
    return inputs


@torch.no_grad()
def run_frozen(text_model, hidden, tokens, start: int, stop: int, batch_size: int, device) -> torch.Tensor:
    """States entering block `stop` from those entering `start`; fp16 like the cache, zeros in cut padding."""
    out = torch.zeros_like(hidden)
    blocks = list(text_model.layers())[start:stop]
    for i in range(0, hidden.shape[0], batch_size):
        b, n = trim({"hidden": hidden[i:i + batch_size], **{k: v[i:i + batch_size] for k, v in tokens.items()}})
        h = b.pop("hidden").float().to(device)
        b = {k: v.to(device) for k, v in b.items()}
        for block in blocks:
            h = text_model.run_block(block, h, b)
        out[i:i + batch_size, :n] = h.half().cpu()
    return out


@torch.no_grad()
def _verify(text_model, inputs: TextInputs, data: CacheData, device, rows: int = 64) -> None:
    """The top blocks on the stored states must give the cached tokens: catches states or weights that do not
    belong to this cache before any training."""
    idx = torch.arange(min(rows, len(data)))
    b = inputs.batch(idx, device)
    was = text_model.training
    text_model.eval()
    out = text_model.forward_layers(b.pop("hidden"), b, inputs.start)
    text_model.train(was)
    n = out["tokens"].shape[1]
    try:
        _check_tokens(out["tokens"].cpu(), data.features["text_tokens"][idx, :n], b["attention_mask"].cpu(),
                      data.path)
    except CacheError as exc:
        raise CacheError(f"{exc} (checked the top {text_model.num_layers - inputs.start} text layers on the "
                         "stored text_hidden/states)") from None


def model_batch(data: CacheData, text: TextInputs | None, rows, device, head_inputs) -> dict:
    """The dict a FinetuneModel reads: cached image features (+ cached text features when no text layer
    trains, exactly as stage 1) and the text inputs of the top blocks."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    if text is None:
        return data.batch(rows, device, head_inputs)
    out = data.batch(rows, device, [k for k in head_inputs if k in IMAGE_KEYS])
    out.update(text.batch(rows, device))
    return out
