"""A pure-torch text backbone for stage-2 tests that must stay fast (tests/test_mut_predict.py, run per mutant by
`make mutate`): WordTower is registered as the text backbone NAME while `registered()` is active, a cache's text
features and text_hidden/states are computed with it directly (no extraction, no transformers), and
`stage2_runs` trains a cached, a full and a cross-fit (K = 2) stage-2 run of N = 1 on such a cache.
"""
from __future__ import annotations

import contextlib
import os
import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from featcache.backbones import BACKBONES
from featcache.backbones.base import TextEncoder, masked_mean
from featcache.backbones.registry import Alias, BackboneSpec, Family
from featcache.backbones.weights import WeightsSource
from featcache.cache.store import CacheWriter
from featcache.sources.base import Sample
from heads.config import FinetuneConfig, TrainConfig
from heads.data.cache import load_cache
from heads.data.text_layers import with_text_inputs
from heads.infer import infer, softmax
from heads.rundir import FOLD_FILE, HEAD_FILE, TEXT_FOLD_FILE, TEXT_LAYERS_FILE
from heads.train.crossfit import train_crossfit
from heads.train.stage2 import finetune
from heads.train.text_model import FinetuneModel

NAME, L, D, T, VOCAB = "mut-word-tower", 4, 16, 8, 61
N_TRAIN, N_TEST, INVALID = 60, 24, (3, 11, 23)  # test rows (indices within the split) marked invalid
FAST = dict(epochs=1, patience=0, hidden=8, plots=False)
WORDS = [[f"w{c}{k}" for k in range(6)] for c in range(3)] + [[f"any{k}" for k in range(10)]]
ATOL = 2e-6  # predict writes probabilities with 6 decimals


class BlockTower(TextEncoder):
    """Embedding, num_layers tanh(linear) blocks, a final linear; pooled = masked mean of the tokens. A subclass
    sets token_dim = pooled_dim, max_len, num_layers and vocab (also used by tests/test_mut_stage2.py)."""

    layer_table = {"layers": "blocks", "post": ("post",)}
    vocab: int

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(self.vocab, self.token_dim)
        self.blocks = nn.ModuleList(nn.Linear(self.token_dim, self.token_dim) for _ in range(self.num_layers))
        self.post = nn.Linear(self.token_dim, self.token_dim)

    def embed(self, batch):
        return self.emb(batch["input_ids"])

    def run_block(self, block, hidden, batch):
        return torch.tanh(block(hidden)) * batch["attention_mask"][..., None]

    def finish(self, hidden, batch):
        tokens = self.post(hidden)
        return {"tokens": tokens, "mask": batch["attention_mask"].bool(),
                "pooled": masked_mean(tokens, batch["attention_mask"])}


class WordTower(BlockTower):
    """Word ids (crc32 of each word) -> BlockTower, with fixed weights."""

    token_dim = pooled_dim = D
    max_len = T
    num_layers = L
    vocab = VOCAB

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)  # the same weights every time it is built (as a checkpoint)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.6 * torch.randn(p.shape, generator=g))

    def tokenize(self, texts):
        ids, mask = torch.zeros(len(texts), T, dtype=torch.long), torch.zeros(len(texts), T, dtype=torch.bool)
        for i, text in enumerate(texts):
            words = text.split()[:T]
            ids[i, :len(words)] = torch.tensor([zlib.crc32(w.encode()) % (VOCAB - 1) + 1 for w in words])
            mask[i, :len(words)] = True
        return {"input_ids": ids, "attention_mask": mask}


def write_cache(path: str) -> str:
    """Train rows then test rows (INVALID of them invalid); text features and the states entering layer L-1
    computed by WordTower; words and image features carry the label."""
    rng = np.random.default_rng(0)
    n = N_TRAIN + N_TEST
    labels = rng.integers(0, 3, n)
    texts = [" ".join(rng.choice(WORDS[labels[k]] + WORDS[3], size=rng.integers(2, T + 1)).tolist())
             for k in range(n)]
    invalid = [N_TRAIN + k for k in INVALID]
    samples = [Sample(guid=str(500 + k), split="train" if k < N_TRAIN else "test",
                      label=int(labels[k]) if k < N_TRAIN else -1, raw_text=texts[k], text=texts[k],
                      image_path=f"/nowhere/{k}.jpg", valid=k not in invalid) for k in range(n)]
    tower = WordTower().eval()
    batch = tower.tokenize(texts)
    with torch.no_grad():
        out = tower.forward_features(batch, start_layer=L - 1)
    v = rng.normal(size=(3, 12))
    arrays = {"text/tokens": out["tokens"].numpy().astype(np.float16), "text/mask": batch["attention_mask"].numpy(),
              "text/pooled": out["pooled"].numpy().astype(np.float32),
              "text_hidden/states": out["hidden"].numpy().astype(np.float16),
              "image/tokens": (2.0 * rng.normal(size=(n, 4, 12)) + v[labels][:, None]).astype(np.float16),
              "image/pooled": (2.0 * rng.normal(size=(n, 12)) + v[labels]).astype(np.float32)}
    meta = {"key": "mut-stage2", "backbone": {"name": f"{NAME}+synthetic-image", "text": NAME,
                                              "image": "synthetic-image"},
            "weights": {"text": {"name": NAME, "source": "path", "location": "/nowhere/word-tower",
                                 "sha256": "0" * 64}},
            "preprocessing": {"clean_text": False, "max_text_len": T},
            "text": {"max_len": T, "token_dim": D, "pooled_dim": D, "num_layers": L, "start_layer": L - 1},
            "dataset": {"root": "/synthetic", "fingerprint": "0" * 8}, "counts": {"samples": n}}
    writer = CacheWriter(path, meta, samples, {k: a.shape for k, a in arrays.items()})
    writer.write(0, arrays, invalid=invalid)
    return writer.finish(meta)


def perturb_and_save(model: FinetuneModel, run_dir: str, head_file: str, text_file: str, seed: int) -> None:
    """Move the trained head and text layers well away from where one epoch left them (near-uniform
    probabilities, text layers barely changed), in memory and in the run's files, so that a prediction that
    skipped the layers, or read other text inputs, would differ beyond the written precision."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*model.head.parameters(), *(p for p in model.text.parameters() if p.requires_grad)]:
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, os.path.join(run_dir, head_file))
    save_file({k: v.contiguous() for k, v in model.text_params().items()}, os.path.join(run_dir, text_file))


@contextlib.contextmanager
def registered():
    """WordTower as the text backbone NAME (the registry has no removal: its entries are restored after)."""
    spec = BackboneSpec(name=NAME, modalities=("text",), hub="", description="test word tower",
                        family=Family(name="test", locate=lambda *a: WeightsSource("path", "/nowhere"),
                                      build_text=lambda spec, source, max_len: WordTower()))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(BACKBONES._entries, NAME, Alias(NAME, "", ("text",), "test word tower", own=spec))
        yield


def stage2_runs(root) -> dict:
    """{"cache": path, "cached" | "full" | "crossfit": (run dir, its models in memory)}: stage-2 runs of N = 1
    (the cross-fit one from a K = 2 stage-1 run, cached states); call inside `registered()`."""
    cache = write_cache(str(root / "cache.h5"))
    out = {"cache": cache}
    for mode in ("cached", "full"):
        res = finetune(FinetuneConfig.from_flat(text_layers=1, fusion="concat", text_forward=mode, **FAST), cache,
                       str(root / mode))
        perturb_and_save(res.model, str(root / mode), HEAD_FILE, TEXT_LAYERS_FILE, seed=len(mode))
        out[mode] = (str(root / mode), [res.model])
    train_crossfit(TrainConfig.from_flat(fusion="concat", folds=2, **FAST), cache, str(root / "cv1"))
    res = finetune(FinetuneConfig.from_flat(text_layers=1, init=str(root / "cv1"), **FAST), cache, str(root / "cv"))
    models = [fold.model for fold in res.folds]
    for k, model in enumerate(models):
        perturb_and_save(model, str(root / "cv"), FOLD_FILE.format(k), TEXT_FOLD_FILE.format(k), seed=10 + k)
    out["crossfit"] = (str(root / "cv"), models)
    return out


KEYS = ("text_tokens", "text_mask", "text_pooled", "image_tokens", "image_pooled", "text_states")


def in_memory(runs, models, mode: str, layers: bool = True):
    """(valid test rows, probabilities of `models` there): the text layers on the stored states (mode
    "cached") or the whole tower ("full") then the head, K models' probabilities averaged; layers=False: the
    heads alone on the cache's text features (what a stage-1 prediction would compute)."""
    data = load_cache(runs["cache"], keys=KEYS, texts=True)
    tower = WordTower()
    tower.lock(1)
    data = with_text_inputs(data, tower, 1, mode, say=lambda m: None)  # the cache's own weights check the states
    rows = data.rows("test")[data.valid[data.rows("test")]]
    probs = [softmax(infer(FinetuneModel(m.head, m.text, 1, cached=mode == "cached") if layers else m.head,
                           data, rows)["logits"]) for m in models]
    return rows, np.mean(probs, axis=0)
