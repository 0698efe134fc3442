"""One batch through the backbones -> numpy arrays for the cache; and the image lane that overlaps them.

    models = Models(text_model, image_model, captioner, cfg, device, start_layer)
    arrays, captions = forward_batch(models, pix, idx, ds)           # everything in this thread
    lane = ImageLane(models, timings); fut = lane.submit(batch)      # image tower in a second thread
    arrays, captions = forward_batch(models, pix, idx, ds, image=fut.result())

Why a lane: on a small CPU the towers scale badly with threads (EfficientNet-Lite0 on small chunks is a
chain of small depthwise convolutions that a second thread speeds up by well under 2x), and image decoding is
single-threaded anyway. The image tower gets one half of the cores in its own thread; the caller's thread,
with the other half, decodes the next batch and runs the text tower (without augmented views, about as much
work: the text tower runs in length-sorted chunks, `text_features`). Both halves stay busy instead of running
decode -> text -> image one after the other; measured, the lane stays ahead of the serial path with views too,
whose augmentation costs more than the extra image passes. torch and PIL release the GIL inside their work,
so the threads do run in parallel.

Rows whose image failed get exact zeros for every image array; the caller marks them invalid.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..backbones.base import ImageEncoder, TextEncoder
from ..device import compute_precision, precision_autocast
from ..errors import ConfigError
from ..sources.base import Dataset
from ..sources.text import append_captions
from ..text_tower import text_inputs, trim
from .config import ExtractConfig


@dataclass
class Models:
    text: TextEncoder
    image: ImageEncoder
    captioner: torch.nn.Module | None
    cfg: ExtractConfig
    device: torch.device
    start_layer: int | None  # also return the hidden states entering this text layer (--text-layers)
    targets: bool = False  # the dataset has targets (Twitter): each is the text's second segment (text_inputs)

    def autocast(self):
        # fp16 autocast on CUDA, fp32 on the CPU: the precision the cache key records (cfg.preprocessing)
        return precision_autocast(compute_precision(self.device), self.device)

    @property
    def pin(self) -> bool:
        """Host batches in page-locked memory: their copies to a GPU then run asynchronously (DMA)."""
        return self.device.type == "cuda"

    def text_chunk(self, n: int) -> int:
        # CPU: length-sorted chunks (text_features); CUDA: the whole batch in one call, one sync, not n/8.
        return n if self.device.type == "cuda" else TEXT_CHUNK

    def micro(self, n: int) -> int:
        # Image calls in chunks (0 = auto: small chunks on CPU, where they are fastest; the batch on CUDA).
        return self.cfg.image_micro_batch or (n if self.device.type == "cuda" else cpu_image_micro())


def cpu_image_micro(threads: int | None = None) -> int:
    """How many images per image-backbone call on CPU. Measured on 2 cores with EfficientNet-Lite0 (BN
    folded, channels_last), images/s by chunk size 1 / 2 / 4 / 8 / 32: one thread 63 / 69 / 59 / 46 / 42,
    two threads 80 / 101 / 117 / 100 / 76. Large batches of depthwise-conv activations spill the caches."""
    return 4 if (threads or torch.get_num_threads()) >= 2 else 2


def _image_features(image_model, images, micro: int, device) -> dict:
    parts = [image_model.forward_features(chunk.to(device, non_blocking=True)) for chunk in images.split(micro)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


# In place of a row's tensors: its image file is another row's, whose features it gets (featcache.extract.shared).
SHARED = "shared"  # a string: it survives the DataLoader workers' pickling, unlike an identity sentinel


def _main_view(m: Models, pix, n: int) -> dict[str, torch.Tensor]:
    """The image tower on every row except SHARED ones (left zero here); the same call as ever without them."""
    size = m.image.image_size
    run = [k for k in range(n) if not isinstance(pix[k], str)]
    img_in = torch.zeros(len(run), 3, size, size, pin_memory=m.pin)
    for j, k in enumerate(run):
        if pix[k] is not None:
            img_in[j] = pix[k][0]
    if len(run) == n:
        return _image_features(m.image, img_in, m.micro(n), m.device)
    shapes = {"tokens": (m.image.num_patches, m.image.token_dim), "pooled": (m.image.pooled_dim,)}
    im = _image_features(m.image, img_in, m.micro(n), m.device) if run else {}
    out = {}
    for key, shape in shapes.items():
        dtype = im[key].dtype if im else torch.float32
        out[key] = torch.zeros((n,) + shape, dtype=dtype, device=m.device)
        if run:
            out[key][run] = im[key]
    return out


@torch.inference_mode()
def image_arrays(m: Models, pix, timings: dict | None = None) -> dict[str, np.ndarray]:
    """image/* (and image_views/*) arrays for one batch; `pix[k]` is the list of transformed tensors of row k
    (backbone view, captioner view if any, then the augmented views), None when the image failed, or SHARED."""
    n, size, ok = len(pix), m.image.image_size, [k for k, p in enumerate(pix) if p is not None]
    with m.autocast():
        im = _main_view(m, pix, n)
        out = {"image/tokens": im["tokens"].half(), "image/pooled": im["pooled"].float()}
        K = m.cfg.image_views
        if K:
            t = time.perf_counter()
            offset = 1 + (m.captioner is not None)
            views = torch.zeros(n, K, 3, size, size, pin_memory=m.pin)
            for k in ok:
                views[k] = torch.stack(pix[k][offset:offset + K])
            vim = _image_features(m.image, views.flatten(0, 1), m.micro(n), m.device)
            out["image_views/tokens"] = vim["tokens"].half().unflatten(0, (n, K))
            out["image_views/pooled"] = vim["pooled"].float().unflatten(0, (n, K))
            if timings is not None:
                timings["views_s"] = timings.get("views_s", 0.0) + time.perf_counter() - t
    out = {k: v.cpu().numpy() for k, v in out.items()}
    for k in range(n):
        if pix[k] is None or isinstance(pix[k], str):  # exact zeros, whatever the model made of a black image
            for a in out.values():
                a[k] = 0
    return out


TEXT_CHUNK = 8  # rows per text-tower call, sorted by length (see text_features)


@torch.no_grad()  # not inference_mode: the benches' end-to-end epochs train a head on its output
def text_features(model: TextEncoder, batch: dict[str, torch.Tensor], start_layer: int | None = None,
                  chunk: int = TEXT_CHUNK) -> dict[str, torch.Tensor]:
    """The text tower on a tokenized batch, in chunks of rows of similar length, each cut to its longest row.

    Why: tweets average ~30 of the 64 token positions, and a batch of 32 almost always holds one long row, so
    cutting a whole batch saves little; sorted chunks of 8 make MiniLM 1.7x faster on this CPU. Exact up to
    float rounding: HF encoders mask padding and CLIP's text tower is causal (featcache.text_tower.trim).
    Positions past a chunk's longest row come back as zeros (padding: masked everywhere downstream).
    """
    mask = batch["attention_mask"]
    n, L = mask.shape
    order = torch.argsort(mask.sum(1), stable=True)
    out: dict[str, torch.Tensor] = {}
    for rows in order.split(chunk):
        part, length = trim({k: v[rows] for k, v in batch.items()})
        got = model.forward_features(part, start_layer=start_layer)
        for key, value in got.items():
            if key not in out:
                shape = (n, L) + tuple(value.shape[2:]) if key in ("tokens", "mask", "hidden") else \
                    (n,) + tuple(value.shape[1:])
                out[key] = torch.zeros(shape, dtype=value.dtype, device=value.device)
            if key in ("tokens", "mask", "hidden"):
                out[key][rows, :length] = value
            else:
                out[key][rows] = value
    return out


@torch.inference_mode()
def forward_batch(m: Models, pix, idx, ds: Dataset, image: dict | None = None, timings: dict | None = None):
    """(arrays, captions) for rows `idx`; `image` = image_arrays(...) already computed (by the lane)."""
    ok = [k for k, p in enumerate(pix) if p is not None]
    captions = None
    with m.autocast():
        if m.captioner is not None:
            size = m.captioner.image_size
            cap_in = torch.zeros(len(ok), 3, size, size, pin_memory=m.pin)
            for j, k in enumerate(ok):
                cap_in[j] = pix[k][1]
            made = m.captioner.caption(cap_in.to(m.device, non_blocking=True)) if ok else []
            captions = [""] * len(idx)
            for j, k in enumerate(ok):
                captions[k] = made[j]
        texts = [ds.samples[i].text for i in idx]
        if captions is not None and m.cfg.caption_mode == "append":
            texts = append_captions(texts, captions, getattr(m.text, "tokenizer", None))
        targets = [ds.samples[i].target for i in idx] if m.targets else None
        batch = {k: v.to(m.device) for k, v in m.text.tokenize(text_inputs(texts, targets, m.text)).items()}
        tx = text_features(m.text, batch, start_layer=m.start_layer, chunk=m.text_chunk(len(idx)))
    arrays = {"text/tokens": tx["tokens"].half(), "text/mask": tx["mask"], "text/pooled": tx["pooled"].float()}
    if m.start_layer is not None:
        arrays["text_hidden/states"] = tx["hidden"].half()
    arrays = {k: v.cpu().numpy() for k, v in arrays.items()}
    arrays.update(image if image is not None else image_arrays(m, pix, timings))
    for k in range(len(idx)):
        if not ds.samples[idx[k]].valid:  # invalid for a reason found before decoding (e.g. missing text)
            for name, a in arrays.items():
                if name.startswith("image"):
                    a[k] = 0
    return arrays, captions


def nonfinite_rows(arrays: dict[str, np.ndarray]) -> dict[str, list[int]]:
    """Array name -> positions (in the batch) of rows holding NaN or inf: fp16 overflows, broken weights."""
    bad = {}
    for name, a in arrays.items():
        if a.dtype.kind == "f":
            rows = np.flatnonzero(~np.isfinite(a.reshape(a.shape[0], -1)).all(1))
            if rows.size:
                bad[name] = rows.tolist()
    return bad


class ImageLane:
    """A second thread that runs the image tower on decoded batches while the caller decodes the next batch
    and runs the text tower. Batches are processed in submission order; submit the next one before waiting
    on the current one and the lane never idles."""

    def __init__(self, m: Models, timings: dict):
        self.m, self.timings = m, timings  # the caller's timings dict (views_s)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="image-lane")

    def submit(self, batch):
        """`batch`: decoded rows (i, tensors or None, notes), what the DataLoader yields -> a future of
        image_arrays for them."""
        return self.pool.submit(image_arrays, self.m, [tensors for _, tensors, _ in batch], self.timings)

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


# auto: no lane when one backbone has more than this many times the other's parameters. The lane gives each
# tower half the threads, so the heavier one then runs on half the CPU while the lighter one's thread idles:
# mpnet-base (109 M parameters) beside EfficientNet-Lite0 (4.7 M) extracted 1.32x slower with the lane than
# without it (2026-12-07, 2 cores, 160 rows, 3 pairs); MiniLM (23 M, 4.9x) keeps it (BENCHMARKS.md).
LANE_MAX_RATIO = 10


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def use_lane(setting: str, device: torch.device, captioner, workers: int, text=None, image=None) -> bool:
    """auto: on for CPU extraction without DataLoader workers and at least 2 threads to split, when the two
    towers (`text`, `image`: modules, parameters counted) are within LANE_MAX_RATIO of each other in size; a
    captioner (which needs the decoded images first) keeps the serial path."""
    if setting not in ("auto", "on", "off"):
        raise ConfigError(f"--overlap must be auto, on or off, got {setting!r}")
    if setting != "auto":
        return setting == "on" and captioner is None
    sizes = sorted(max(1, _params(m)) for m in (text, image) if m is not None)
    balanced = len(sizes) < 2 or sizes[1] <= LANE_MAX_RATIO * sizes[0]
    return device.type == "cpu" and captioner is None and workers == 0 and torch.get_num_threads() >= 2 \
        and balanced
