"""A feature cache in memory: read once, sliced into fp32 batches by index.

Everything a run needs is read from the HDF5 file in one pass (a few hundred MB for MVSA-Single) and kept
as torch tensors; token arrays stay fp16 (half the memory) and are converted to fp32 per batch, which costs
far less than any disk read per epoch. Rows are never copied into train/val subsets: a split is two index
arrays (heads.data.splits), so many configs (the ablation) can share one load.

Stage 1 and stage 2 load through the same function: the states entering the top text layers
(`text_hidden/states`, the `text_states` key) are one more optional feature array, and the cache texts come
with them so stage 2 can re-tokenize them without opening the file again (heads.data.text_layers). One
batcher serves both: it cuts every text array of a batch (tokens, mask, states, token ids) to the batch's
longest text.

On CUDA (`CacheData.to_device`) the arrays move to the GPU once, fp16 tokens as stored, and a batch is
gathered, cut and cast to fp32 there: nothing per step goes through pageable host memory, and the batch's text
length comes from per-row lengths kept on the host, so gathering a batch never waits for the GPU.

A cache whose arrays exceed the memory budget is not loaded: heads.data.stream serves the same batches from
disk through the same `batch` (its `_gather` reads blocks instead of indexing `features`).

Invalid rows (samples/valid False) are kept in memory so `predict` can still list them, but training and
validation exclude them and count how many were excluded.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from featcache.cache.manifest import open_cache
from featcache.cache.store import CacheError
from featcache.errors import ConfigError
from featcache.text_tower import cache_targets, require_texts

from .normstats import TokenStats

FEATURES = {  # batch key -> cache dataset; every cache has these
    "text_tokens": "text/tokens",
    "text_mask": "text/mask",
    "text_pooled": "text/pooled",
    "image_tokens": "image/tokens",
    "image_pooled": "image/pooled",
}
VIEWS = {  # optional (featcache extract --image-views K): K augmented views of every image, (N, K, ...)
    "image_tokens": "image_views/tokens",
    "image_pooled": "image_views/pooled",
}
TEXT_STATES = ("text_states", "text_hidden/states")  # optional (--text-layers / add-text-layers): stage 2's input
# Per-position text arrays: a batch cuts them all to its longest text (text_mask decides; input_ids are added by
# heads.data.text_layers and have the same mask).
TEXT_SEQUENCES = ("text_tokens", "text_mask", "text_states", "input_ids")


class DataError(ConfigError):
    """A cache that cannot be trained on (no labelled samples, a class too small to split, ...)."""


@dataclass
class CacheData:
    path: str
    meta: dict
    guids: list[str]
    splits: np.ndarray  # (N,) str: train | test
    labels: np.ndarray  # (N,) int64, -1 = unlabelled; label k is classes[k]
    valid: np.ndarray  # (N,) bool
    features: dict[str, torch.Tensor]  # batch key -> (N, ...) tensor; tokens fp16, masks bool
    classes: list[str] = field(default_factory=list)  # the cache's class names (reader.classes)
    views: dict[str, torch.Tensor] = field(default_factory=dict)  # VIEWS keys -> (N, K, ...) or empty
    shapes: dict[str, tuple] = field(default_factory=dict)  # every FEATURES key's shape, loaded or not
    # (load_cache fills it: dims() must not depend on which features were loaded)
    start_layer: int | None = None  # the text layer the loaded `text_states` enter
    texts: list[str] | None = None  # samples/text and samples/caption (loaded with texts=True: stage 2)
    captions: list[str] | None = None
    targets: list[str] | None = None  # samples/target (Twitter: the texts' second segment), None without
    device: torch.device | None = None  # set by to_device: features and views live there
    lengths: torch.Tensor | None = None  # (N,) on the host, with `device`: each row's used text positions
    stats: dict[str, TokenStats] = field(default_factory=dict)  # token key -> its per-token LayerNorm statistics

    def to_device(self, device: torch.device) -> "CacheData":
        """Move every array to a CUDA `device` (in place: an ablation shares one load; arrays added since, e.g.
        stage 2's input_ids, move too); on the CPU nothing changes."""
        device = torch.device(device)
        return self._move(device) if device.type == "cuda" else self

    def _move(self, device: torch.device) -> "CacheData":
        self.text_lengths()  # before the mask moves: the batch length is read on the host
        self.features = {k: v.to(device) for k, v in self.features.items()}
        self.views = {k: v.to(device) for k, v in self.views.items()}
        self.device = device
        return self

    def text_lengths(self) -> torch.Tensor | None:
        """(N,) on the host: each row's used text positions (None when text_mask is not loaded). Computed once."""
        if self.lengths is None and "text_mask" in self.features:
            m = self.features["text_mask"].cpu()
            last = torch.arange(1, m.shape[1] + 1).expand_as(m) * m  # position+1 where used, else 0
            self.lengths = last.amax(1) if m.shape[1] else torch.zeros(m.shape[0], dtype=torch.long)
        return self.lengths

    def epoch_order(self, rows: np.ndarray, gen: torch.Generator, group: int = 0) -> torch.Tensor:
        """Positions into `rows` in the order one training epoch visits them: a seeded permutation of all of
        them (heads.data.stream shuffles by blocks instead). group = the batch size, for heads that read text
        tokens: batches of similar text length (length_grouped)."""
        perm = torch.randperm(len(rows), generator=gen)
        lengths = self.text_lengths() if group else None
        if lengths is None:
            return perm
        return length_grouped(perm, lengths[torch.as_tensor(rows)[perm]], group, gen)

    def schedule(self, rows) -> None:
        """Rows the next batches will read, in order: nothing to do in memory (heads.data.stream reads ahead)."""

    def keep(self, rows) -> bool:
        """Rows read again after every epoch (validation): all rows are in memory here (a streamed cache keeps
        these, heads.data.stream). True if they are kept."""
        return True

    def sort_lengths(self, rows) -> torch.Tensor | None:
        """(N,) text lengths by which inference may order `rows` (None: keep their order; a streamed cache
        that would read blocks for them)."""
        return self.text_lengths()

    def num_views(self) -> int:
        return next(iter(self.views.values())).shape[1] if self.views else 0

    def __len__(self) -> int:
        return len(self.guids)

    def dims(self) -> dict[str, int]:
        f = self.shapes
        return {"text_dim": f["text_tokens"][-1], "text_pooled_dim": f["text_pooled"][-1],
                "image_dim": f["image_tokens"][-1], "image_pooled_dim": f["image_pooled"][-1]}

    def batch(self, idx, device: str | torch.device = "cpu", keys=None, views=None, normed=(),
              normed_dtype=torch.float32) -> dict[str, torch.Tensor]:
        """Rows `idx` as a batch dict (only `keys`, default FEATURES): floating arrays in fp32, masks bool, token
        ids as stored. `views` (one int per row, 0 = clean, k = augmented view k) picks the image features.
        Keys in `normed` (host only, without views) come as key + "_normed": each token LayerNorm-normalised
        without affine (heads.data.normstats; what training steps read instead of running the heads' projector
        LayerNorm: heads.fusions.base.Projector.normed), in normed_dtype (bf16 training reads nothing else).

        Text positions that are padding in every row of the batch are cut off. That is exact (heads and text
        layers ignore padding) and it is the cheapest speed-up there is: tweets are much shorter than
        max_text_len."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        keys = FEATURES if keys is None else keys
        if normed and views is not None:  # the statistics are the stored rows', not an augmented view's
            raise ValueError("normed batches are read without image views")
        if self.device is not None and torch.device(device) == self.device and \
                all(self.features[k].device == self.device for k in keys if k in self.features):
            return self._device_batch(idx, keys, views)  # (an array added after to_device: the host path)
        mask, length = None, 1
        if any(k in TEXT_SEQUENCES for k in keys):  # pooled-only heads skip the mask work entirely
            mask = self._gather("text_mask", idx)
            used = mask.any(0).nonzero()
            length = int(used[-1]) + 1 if used.numel() else 1
        out = {}
        for k in keys:
            x = mask if k == "text_mask" else self._gather(k, idx, length if k in TEXT_SEQUENCES else None)
            if views is not None and k in self.views:
                aug = torch.as_tensor(views) > 0
                if aug.any():
                    x[aug] = self._gather_views(k, idx[aug], torch.as_tensor(views)[aug] - 1)
            if k in TEXT_SEQUENCES:
                x = x[:, :length]
            if k in normed:
                x = self.token_stats(k).normalize(x, idx)
                out[k + "_normed"] = x.to(normed_dtype)
                continue
            out[k] = (x.float() if x.is_floating_point() else x).to(device, non_blocking=True)
        return out

    def token_stats(self, key: str) -> TokenStats:
        """The per-token LayerNorm statistics of token array `key`, filled in as batches read its rows: on the
        host, kept across the epochs and runs of one load (forked workers fill their own copies)."""
        if key not in self.stats:
            shape = self.shapes.get(key) or self.features[key].shape
            self.stats[key] = TokenStats(len(self.guids), shape[1])
        return self.stats[key]

    def _gather(self, key: str, idx: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """Rows idx of one feature array, as stored (heads.data.stream reads them from disk instead); a per-position
        text array only up to `length` (the caller cuts it there anyway: gathering less is cheaper)."""
        x = self.features[key]
        return (x if length is None else x[:, :length]).index_select(0, idx)

    def _gather_views(self, key: str, idx: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """Augmented view view[r] of row idx[r] of one feature array."""
        return self.views[key][idx, view]

    def _device_batch(self, idx: torch.Tensor, keys, views) -> dict[str, torch.Tensor]:
        """batch() on arrays already on the GPU: the same values, without a host sync (no boolean indexing, the
        text length from host-side lengths)."""
        length = 1
        if self.lengths is not None and len(idx) and any(k in TEXT_SEQUENCES for k in keys):
            length = max(1, int(self.lengths[idx.cpu()].max()))
        gi = idx.to(self.device, non_blocking=True)
        v = torch.as_tensor(views).to(self.device, non_blocking=True) if views is not None else None
        out = {}
        for k in keys:
            x = self.features[k].index_select(0, gi)
            if v is not None and k in self.views:  # row r: view v[r]-1 where v[r] > 0, else the clean features
                aug = self.views[k][gi, (v - 1).clamp_min(0)]
                x = torch.where((v > 0).view(-1, *[1] * (x.dim() - 1)), aug, x)
            if k in TEXT_SEQUENCES:
                x = x[:, :length]
            out[k] = x.float() if x.is_floating_point() else x
        return out

    def rows(self, split: str) -> np.ndarray:
        """Indices of every row of a dataset split (valid or not)."""
        return np.flatnonzero(self.splits == split)


GROUP_BATCHES = 4  # length_grouped sorts random chunks of this many batches


def length_grouped(perm: torch.Tensor, lengths: torch.Tensor, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """`perm` reordered so that each batch (run of batch_size positions) holds rows of similar text length;
    lengths[i] is the text length of perm[i].

    The batcher cuts a batch to its longest text, and a random batch of 128 tweets almost always holds one of
    the maximum length (median ~30 of 64): every text position of every row is then gathered, normalised,
    projected and attended over. As transformers' LengthGroupedSampler does, random chunks of GROUP_BATCHES
    batches are sorted by length and cut into batches, and the batches are shuffled: a batch is still a random
    draw (from its chunk's length quantile). On the shared data a training batch of 128 is then cut to 39 text
    positions on average instead of 63 (31 used per row). The last, shorter batch stays last, where the Trainer's
    slicing expects it."""
    span, batches = GROUP_BATCHES * batch_size, []
    for s in range(0, len(perm), span):
        chunk = perm[s:s + span]
        batches += chunk[lengths[s:s + span].argsort(stable=True)].split(batch_size)
    full = [b for b in batches if len(b) == batch_size]
    rest = [b for b in batches if len(b) < batch_size]
    return torch.cat([full[i] for i in torch.randperm(len(full), generator=gen).tolist()] + rest) \
        if batches else perm


def split_rows(data, split: str) -> np.ndarray:
    """The rows of `split` in `data` (a CacheData or StreamData); a ConfigError naming the splits there are when
    it has none."""
    rows = data.rows(split)
    if rows.size == 0:
        have = ", ".join(sorted(set(data.splits.tolist()))) or "none"
        raise ConfigError(f"{data.path} has no samples in split {split!r} (splits present: {have})")
    return rows


def load_cache(path: str, keys=None, texts: bool = False) -> CacheData:
    """Read a complete cache into memory: every FEATURES array, or only `keys` (a head's `inputs`: `heads
    train` of one film head then reads 120 of the default cache's 320 MB), plus `text_states` when asked for
    and stored, and the texts with texts=True. Raises CacheError when the cache is unusable."""
    keys = list(FEATURES) if keys is None else list(keys)
    with open_cache(path) as r:  # a cache file or a shard manifest
        missing = [name for name in FEATURES.values() if not r.has(name)]
        if missing:
            raise CacheError(f"{path} lacks {', '.join(missing)}; re-extract it with `featcache extract`")
        stored = r.datasets()
        feats = {k: _tensor(r, FEATURES[k]) for k in FEATURES if k in keys}
        start_layer = None
        if TEXT_STATES[0] in keys and r.has(TEXT_STATES[1]):
            start_layer = r.start_layer
            if start_layer is not None:
                feats[TEXT_STATES[0]] = _tensor(r, TEXT_STATES[1])
        views = {k: _tensor(r, name) for k, name in VIEWS.items() if k in keys and r.has(name)}
        strings = {}
        if texts:
            require_texts(r, "stage 2 with unfrozen text layers (heads finetune --unfreeze-text N, heads predict "
                          "with such a run)")
            strings["targets"] = cache_targets(r)
            strings["texts"] = r.strings("samples/text")
            strings["captions"] = r.strings("samples/caption") if r.has("samples/caption") else None
        return CacheData(path=str(path), meta=r.meta, guids=r.strings("samples/guid"),
                         splits=np.asarray(r.strings("samples/split")),
                         labels=r.array("samples/label").astype(np.int64),
                         valid=r.array("samples/valid").astype(bool), features=feats, classes=r.classes,
                         views=views, shapes={k: tuple(stored[name][0]) for k, name in FEATURES.items()},
                         start_layer=start_layer, **strings)


def _tensor(reader, name: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(reader.array(name)))
