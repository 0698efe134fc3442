"""Extraction: dataset -> DataLoader workers (decode) -> backbones (batched, inference_mode) -> HDF5 cache.

Everything that can fail because of the user (dataset layout, backbone names, missing weights, --strict
problems, an output already being written) fails before a model is loaded. Bad samples never stop the run:
they are written as invalid rows and listed at the end. Rows are written in fixed-size batches from row 0,
so a resumed run recomputes exactly the batches an uninterrupted one would, and the arrays are identical.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field

import torch
from rich.markup import escape
from torch.utils.data import DataLoader, Dataset as TorchDataset

from .. import __version__
from ..backbones import (DEFAULT_BACKBONE, create_captioner, create_image, create_text, get_backbone_spec,
                        locate, parse_backbone)
from ..sources.mvsa import Dataset, note_image_problems, read_mvsa, scan_images, summarize
from ..sources.augment import ViewMaker, get_aug_spec
from .forward import ImageLane, Models, forward_batch, use_lane
from ..sources.images import DEFAULT_MAX_PIXELS, ImageNote, load_rgb
from ..cache.store import SCHEMA_VERSION, CacheError, CacheReader, CacheWriter, partial_path, problems_path
from ..backbones.weights import WeightsSource, file_sha256


class StrictError(Exception):
    """--strict found problems in the input; raised before any backbone runs."""


@dataclass
class ExtractConfig:
    data: str
    backbone: str = DEFAULT_BACKBONE
    captions: str | None = None  # a captioner name (blip-base) or None
    caption_mode: str = "store"  # store: strings only | append: encode "text [SEP] caption"
    out: str | None = None
    clean_text: bool = False
    max_text_len: int = 64
    text_layers: int = 0  # also keep the hidden states entering the top N text layers
    image_views: int = 0  # K augmented views per image stored next to the clean features (featcache.augment)
    image_aug: str = "weak"  # weak | strong: the policy of those views
    aug_seed: int = 0  # views are seeded by (aug_seed, guid, view)
    batch_size: int = 32
    # Image backbone calls per batch, in chunks of this many images (0 = auto: 2-4 on CPU, see
    # featcache.forward.cpu_image_micro; the whole batch on CUDA). Text prefers whole batches.
    image_micro_batch: int = 0
    workers: int = -1  # -1: auto (cores beyond the two the backbone uses, at most 4)
    # auto: on CPU without workers, the image tower runs in a second thread while this one decodes and runs the
    # text tower, each with half the threads (featcache.forward.ImageLane); on | off force it (a captioner
    # always runs serially).
    overlap: str = "auto"
    limit: int | None = None
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    device: str = "auto"
    text_weights: str | None = None
    image_weights: str | None = None
    caption_weights: str | None = None
    shard: str | None = None  # "I/N": only rows of shard I (zero-based) of N, into their own file (shards.py)

    def preprocessing(self) -> dict:
        """What changes the features (and so the cache key); batch size, workers and device do not."""
        return {"clean_text": self.clean_text, "max_text_len": self.max_text_len, "captions": self.captions,
                "caption_mode": self.caption_mode if self.captions else None, "text_layers": self.text_layers,
                "max_image_pixels": self.max_image_pixels, "limit": self.limit,
                # only with views, so that caches without them keep the keys they always had
                **({"image_views": self.image_views, "image_aug": self.image_aug, "aug_seed": self.aug_seed}
                   if self.image_views else {})}


@dataclass
class Timings:
    read: float = 0.0
    model: float = 0.0
    write: float = 0.0
    samples: int = 0
    extra: dict = field(default_factory=dict)


class _ImageRows(TorchDataset):
    """Runs in the workers: decode one image and apply the backbone's (and captioner's) transform; with
    views, also the backbone's transform of each augmented view (appended after the transforms' outputs)."""

    def __init__(self, paths, guids, transforms, max_pixels, draft, views=None):
        self.paths, self.guids, self.transforms = paths, guids, transforms
        self.max_pixels, self.draft, self.views = max_pixels, draft, views

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img, notes = load_rgb(self.paths[i], self.max_pixels, draft_size=self.draft)
        if img is None:
            return i, None, notes
        out = [t(img) for t in self.transforms]
        if self.views is not None:
            out += [self.transforms[0](v) for v in self.views(img, self.guids[i])]
        return i, out, notes


def _collate(rows):
    return rows  # tensors are stacked in the main loop, where failed images become zero rows


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available")
    return torch.device(name)


def cache_key(ds_fingerprint: str, backbone: tuple[str, str], weights: dict, cfg: ExtractConfig) -> str:
    blob = json.dumps({"schema": SCHEMA_VERSION, "dataset": ds_fingerprint, "backbone": backbone,
                       "weights": {k: v["sha256"] for k, v in weights.items()},
                       "preprocessing": cfg.preprocessing()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_out(cfg: ExtractConfig, key: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{os.path.basename(os.path.abspath(cfg.data))}-{cfg.backbone}")
    return os.path.join("cache", f"{name}-{key[:8]}.h5")


def _weights(cfg: ExtractConfig, text_name: str, image_name: str) -> dict:
    found = {"text": (text_name, locate(text_name, cfg.text_weights)),
             "image": (image_name, locate(image_name, cfg.image_weights))}
    if cfg.captions:
        if "caption" not in get_backbone_spec(cfg.captions).modalities:
            raise ValueError(f"--captions takes a captioner, got '{cfg.captions}'")
        found["caption"] = (cfg.captions, locate(cfg.captions, cfg.caption_weights))
    out = {}
    for role, (name, src) in found.items():
        loc = str(src.location)
        out[role] = {"name": name, "source": src.kind, "location": loc,
                     "sha256": file_sha256(loc) if os.path.exists(loc) else f"hub:{loc}"}
    return out


def extract(cfg: ExtractConfig, resume: bool = False, strict: bool = False, force: bool = False,
            console=None, progress: bool = True) -> str:
    """Write the cache for `cfg` and return its path (an existing complete cache of the same key is reused)."""
    from rich.console import Console
    console = console or Console(stderr=True)
    say = console.print
    t_start = time.perf_counter()
    if cfg.caption_mode not in ("store", "append"):
        raise ValueError(f"--caption-mode must be 'store' or 'append', got '{cfg.caption_mode}'")
    if cfg.image_views < 0:
        raise ValueError(f"--image-views must be >= 0, got {cfg.image_views}")
    get_aug_spec(cfg.image_aug)
    ds = read_mvsa(cfg.data, clean_text=cfg.clean_text, limit=cfg.limit)
    text_name, image_name = parse_backbone(cfg.backbone)
    weights = _weights(cfg, text_name, image_name)
    fingerprint = ds.fingerprint()
    key = cache_key(fingerprint, (text_name, image_name), weights, cfg)
    out = cfg.out or default_out(cfg, key)
    if cfg.shard:  # from here on: the shard's rows, its own key (over the row range) and file
        from .shards import select_shard
        ds, key, out = select_shard(ds, cfg, key, out)

    if os.path.exists(out) and not force:
        try:
            with CacheReader(out) as r:
                same = r.meta.get("key") == key
        except CacheError:
            same = False
        if same:
            if os.path.exists(problems_path(out)) and not os.path.exists(partial_path(out)):
                os.remove(problems_path(out))  # left by a run killed right after its final rename
            say(f"[green]cache {escape(out)} already holds these features (key {key}); reusing it "
                "(--force recomputes)[/]")
            return out
        raise CacheError(f"{out} exists and was made with other settings; choose another --out or pass --force")

    if strict:
        _strict_check(ds, cfg, console, progress)

    from filelock import FileLock, Timeout
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    lock = FileLock(out + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise CacheError(f"another `featcache extract` is writing {out} (lock {out}.lock is held); "
                         "wait for it or choose another --out") from None
    try:
        if not resume and os.path.exists(partial_path(out)):
            raise CacheError(f"{partial_path(out)} is left from an interrupted extraction; pass --resume to "
                             "continue it, or delete it to start over")
        return _run(cfg, ds, weights, key, fingerprint, out, resume, console, progress, t_start)
    finally:
        lock.release()
        if os.path.exists(out + ".lock") and not lock.is_locked:
            try:
                os.remove(out + ".lock")
            except OSError:
                pass


def _strict_check(ds: Dataset, cfg: ExtractConfig, console, progress: bool) -> None:
    from rich.progress import Progress
    with Progress(console=console, disable=not progress, transient=True) as bar:
        task = bar.add_task("checking images (--strict)", total=len(ds.samples))
        scan_images(ds, cfg.max_image_pixels, progress=lambda i: bar.advance(task))
    if ds.problems:
        lines = "\n".join(f"  {p}" for p in ds.problems)
        raise StrictError(f"--strict: {len(ds.problems)} problem(s) in {cfg.data}; nothing was extracted:\n{lines}")


def _run(cfg, ds, weights, key, fingerprint, out, resume, console, progress, t_start) -> str:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    say = console.print
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    text_model = create_text(weights["text"]["name"], WeightsSource.from_record(weights["text"]), max_len=cfg.max_text_len)
    image_model = create_image(weights["image"]["name"], WeightsSource.from_record(weights["image"]))
    captioner = create_captioner(cfg.captions, WeightsSource.from_record(weights["caption"])) if cfg.captions else None
    for m in (text_model, image_model, captioner):
        if m is not None:
            m.to(device).eval()
    load_s = time.perf_counter() - t0
    n_layers = cfg.text_layers
    if not 0 <= n_layers <= text_model.num_layers:
        raise ValueError(f"--text-layers {n_layers}: {weights['text']['name']} has {text_model.num_layers} layers")
    keep_from = text_model.num_layers - n_layers if n_layers else None

    n, L = len(ds.samples), text_model.max_len
    shapes = {"text/tokens": (n, L, text_model.token_dim), "text/mask": (n, L),
              "text/pooled": (n, text_model.pooled_dim),
              "image/tokens": (n, image_model.num_patches, image_model.token_dim),
              "image/pooled": (n, image_model.pooled_dim)}
    if n_layers:
        shapes["text_hidden/states"] = (n, L, text_model.token_dim)
    if cfg.image_views:
        shapes["image_views/tokens"] = (n, cfg.image_views, image_model.num_patches, image_model.token_dim)
        shapes["image_views/pooled"] = (n, cfg.image_views, image_model.pooled_dim)
    meta = _meta(cfg, ds, weights, key, fingerprint, text_model, image_model, keep_from)
    writer = CacheWriter(out, meta, ds.samples, shapes, resume=resume)
    start = writer.first_undone() if resume else 0
    start -= start % cfg.batch_size  # keep batch boundaries of an uninterrupted run
    # Image problems found so far, kept beside the partial file so a resumed run still reports all of them.
    problems_log = writer.problems() if resume else []
    if resume:
        for p in problems_log:
            note_image_problems(ds, p[0], [ImageNote(*p[1:])])
        say(f"resuming {escape(partial_path(out))} at row {start} of {n}")

    transforms = [image_model.transform] + ([captioner.transform] if captioner else [])
    # Auto: the backbone keeps two cores (its two threads), workers decode on the rest. On a 2-core machine
    # that is no worker: a worker stealing a core slowed the model more than serial decoding costs (~5%).
    workers = min(4, max(0, (os.cpu_count() or 2) - 2)) if cfg.workers < 0 else cfg.workers
    views = ViewMaker(cfg.image_views, cfg.image_aug, cfg.aug_seed) if cfg.image_views else None
    rows = _ImageRows([s.image_path for s in ds.samples], [s.guid for s in ds.samples], transforms,
                      cfg.max_image_pixels, draft=max(256, getattr(image_model, "image_size", 224)), views=views)
    order = list(range(start, n))
    tm = Timings()
    models = Models(text_model, image_model, captioner, cfg, device, keep_from)
    lane = ImageLane(models, tm.extra) if use_lane(cfg.overlap, device, captioner, workers) else None
    threads = torch.get_num_threads()
    if lane:  # half the threads each (set before the lane's thread first runs an op: it takes the value then)
        torch.set_num_threads(max(1, threads // 2))
        batches = _lane_batches(lane, rows, order, cfg.batch_size)
    else:
        batches = iter(DataLoader(torch.utils.data.Subset(rows, order), batch_size=cfg.batch_size,
                                  num_workers=workers, collate_fn=_collate, persistent_workers=False,
                                  prefetch_factor=4 if workers else None))
    columns = [TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} samples/s"), TimeRemainingColumn()]
    try:
        with Progress(*columns, console=console, disable=not progress) as bar:
            task = bar.add_task("extract", total=n, completed=start, rate="-")
            t_loop = time.perf_counter()
            while True:
                t = time.perf_counter()
                batch, image = next(batches, (None, None)) if lane else (next(batches, None), None)
                tm.read += time.perf_counter() - t
                if batch is None:
                    break
                idx = [i for i, _, _ in batch]
                invalid, logged = [], len(problems_log)
                for i, tensors, notes in batch:
                    if notes:
                        note_image_problems(ds, i, notes)
                        problems_log += [[i, nt.kind, nt.message, nt.fatal] for nt in notes]
                    if tensors is None:
                        invalid.append(i)
                pix = [tensors if tensors is not None else None for _, tensors, _ in batch]
                t = time.perf_counter()
                arrays, captions = forward_batch(models, pix, idx, ds, image=image, timings=tm.extra)
                tm.model += time.perf_counter() - t
                t = time.perf_counter()
                writer.write(idx[0], arrays, captions=captions, invalid=invalid,
                             problems=problems_log if len(problems_log) > logged else None)
                tm.write += time.perf_counter() - t
                tm.samples += len(idx)
                bar.update(task, advance=len(idx), rate=f"{tm.samples / (time.perf_counter() - t_loop):.1f}")
        meta = _meta(cfg, ds, weights, key, fingerprint, text_model, image_model, keep_from)
        meta["timings"] = {"load_models_s": round(load_s, 2), "read_wait_s": round(tm.read, 2),
                           "model_s": round(tm.model, 2), "write_s": round(tm.write, 2),
                           **{k: round(v, 2) for k, v in tm.extra.items()},
                           "total_s": round(time.perf_counter() - t_start, 2), "samples": tm.samples}
        path = writer.finish(meta)
    except BaseException:
        writer.close()  # the partial file stays, flushed up to the last batch: --resume continues it
        raise
    finally:
        if lane:
            lane.close()
            torch.set_num_threads(threads)
    _summary(console, ds, meta, path)
    return path


def _lane_batches(lane: ImageLane, rows: _ImageRows, order: list[int], bs: int):
    """Yield (batch, image arrays) in order. This thread decodes batch b+1 (and the caller then runs the text
    tower on batch b and writes it) while the lane runs the image tower on batch b."""
    chunks = [order[k:k + bs] for k in range(0, len(order), bs)]
    pending = []
    for k, chunk in enumerate(chunks):
        batch = [rows[i] for i in chunk]  # (i, tensors or None, notes): what the DataLoader yields
        pending.append((batch, lane.submit(batch)))
        if k:
            done, image = pending.pop(0)
            yield done, image.result()
    for done, image in pending:
        yield done, image.result()


def _meta(cfg, ds, weights, key, fingerprint, text_model, image_model, keep_from) -> dict:
    return {
        "key": key, "tool_version": __version__, "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "backbone": {"name": cfg.backbone, "text": weights["text"]["name"], "image": weights["image"]["name"],
                     "captioner": cfg.captions},
        "weights": weights,
        "preprocessing": cfg.preprocessing(),
        "text": {"max_len": text_model.max_len, "token_dim": text_model.token_dim,
                 "pooled_dim": text_model.pooled_dim, "num_layers": text_model.num_layers,
                 "hidden_start_layer": keep_from},
        "image": {"num_patches": image_model.num_patches, "token_dim": image_model.token_dim,
                  "pooled_dim": image_model.pooled_dim, "image_size": image_model.image_size},
        "dataset": {"root": ds.root, "fingerprint": fingerprint, **summarize(ds)},
        "problems": [str(p) for p in ds.problems],
        "extract_config": asdict(cfg),
        **({"shard": ds.shard} if ds.shard else {}),
    }


def _summary(console, ds: Dataset, meta: dict, path: str) -> None:
    say = console.print
    d, t = meta["dataset"], meta.get("timings", {})
    say(f"[bold green]wrote[/] {escape(path)}: {d['samples']} samples ({d['train']} train, {d['test']} test), "
        f"{d['invalid']} invalid, texts decoded as {d['text_encodings']}, {d['empty_texts']} empty text(s)")
    if t:
        rate = t["samples"] / max(t["read_wait_s"] + t["model_s"] + t["write_s"], 1e-9)
        say(f"time: load models {t['load_models_s']}s | read + decode (waiting) {t['read_wait_s']}s | "
            f"model {t['model_s']}s | write {t['write_s']}s | total {t['total_s']}s | {rate:.1f} samples/s")
    if ds.problems:
        say(f"[yellow]{len(ds.problems)} problem(s) in the input[/] (invalid rows are skipped by heads):")
        for p in ds.problems:
            say(f"  {p}", highlight=False, markup=False)  # "[kind]" and user text are not markup
