"""Extraction: dataset -> DataLoader workers (decode) -> backbones (batched, inference_mode) -> HDF5 cache.

    extract(cfg)  plan (featcache.extract.plan: all user mistakes, before any model) -> lock the output ->
                  load models -> open the writer (resuming: from the first unfinished batch) -> the loop:
                  decode a batch, run it through the backbones (forward), write it -> finish the file.

Bad samples never stop the run: they are written as invalid rows and listed at the end. Rows are written in
fixed-size batches from row 0, so a resumed run recomputes exactly the batches an uninterrupted one would, and
the arrays are identical.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from filelock import FileLock, Timeout
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..backbones import create_captioner, create_image, create_text
from ..backbones.base import BudgetedImage
from ..backbones.weights import WeightsSource
from ..cache.store import SCHEMA_VERSION, CacheError, CacheWriter, partial_path
from ..device import resolve_device
from ..env import cpu_threads, environment, project_version
from ..errors import ConfigError, UserError
from ..sources.augment import ViewMaker
from ..sources.base import Dataset, note_image_problems, scan_images, summarize
from ..sources.images import ImageNote
from .config import ExtractConfig, auto_batch_size
from ..outdir import check_writable, write_failed
from .size import announce
from .decode import ImageRows, auto_workers, lane_batches, loader_batches
from .forward import ImageLane, Models, forward_batch, nonfinite_rows, use_lane
from .plan import Plan, already_extracted, make_plan
from .shared import fill_shared, shared_owners


class StrictError(UserError):
    """--strict found problems in the input; raised before any backbone runs (exit code 1, as before)."""

    exit_code = 1


class NonFiniteError(UserError):
    """A batch whose features hold NaN or inf: never written (heads would train on garbage)."""


@dataclass
class Timings:
    read: float = 0.0
    model: float = 0.0
    write: float = 0.0
    samples: int = 0
    extra: dict = field(default_factory=dict)


@dataclass
class _Loop:
    """What the batch loop works on, once the models are loaded and the output file is open."""
    plan: Plan
    models: Models
    writer: CacheWriter
    start: int  # the first row this run computes (a resumed run: the first unfinished batch)
    problems: list  # image problems so far, [row, kind, message, fatal], kept beside the partial file
    timings: Timings = field(default_factory=Timings)
    owners: dict = field(default_factory=dict)  # shared row -> the row that decodes its image (shared.py)


def extract(cfg: ExtractConfig, resume: bool = False, strict: bool = False, force: bool = False,
            console=None, progress: bool = True, expect_weights: dict | None = None, keep_models: bool = False) -> str:
    """Write the cache for `cfg` and return its path (an existing complete cache of the same key is reused).
    `expect_weights` (role -> sha256): refuse weights with other checksums (plan.check_weights); `keep_models`:
    keep the backbones loaded for the next call with the same ones (Plan.keep_models)."""
    console = console or Console(stderr=True)
    t_start = time.perf_counter()
    cfg = replace(cfg, batch_size=auto_batch_size(cfg))  # 0 = the device's default, fixed before the plan
    plan = replace(make_plan(cfg, expect_weights), keep_models=keep_models)
    if not force and already_extracted(plan, console.print):
        return plan.out
    if strict:
        _strict_check(plan.ds, cfg, console, progress)
    check_writable(plan.out, "the cache")  # a read-only or foreign folder: said now, not after the model loads
    announce(plan, console.print)  # the size, and whether the disk holds it, before any model loads
    with _output_lock(plan.out):
        if not resume and os.path.exists(partial_path(plan.out)):
            raise CacheError(f"{partial_path(plan.out)} is left from an interrupted extraction; pass --resume to "
                             "continue it, or delete it to start over")
        try:
            return _run(plan, resume, console, progress, t_start)
        except KeyboardInterrupt as exc:  # before the batch loop (models loading): a resumed partial is intact
            if not hasattr(exc, "kept") and os.path.exists(partial_path(plan.out)):
                exc.kept, exc.again_flag = f"{partial_path(plan.out)} is kept", "--resume"
            raise


@contextlib.contextmanager
def _output_lock(out: str):
    """Hold OUT.lock while writing OUT (fails at once if another extraction holds it); remove it after."""
    lock = FileLock(out + ".lock")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout:
        raise CacheError(f"another `featcache extract` is writing {out} (lock {out}.lock is held); "
                         "wait for it or choose another --out") from None
    except OSError as exc:  # the folder turned read-only (or full) since check_writable: name the lock file
        err = write_failed(exc, out + ".lock", "choose another --out or make the folder writable")
        if err is None:
            raise
        raise err from exc
    try:
        yield
    finally:
        lock.release()
        if os.path.exists(out + ".lock") and not lock.is_locked:
            try:
                os.remove(out + ".lock")
            except OSError:
                pass


def _strict_check(ds: Dataset, cfg: ExtractConfig, console, progress: bool) -> None:
    with Progress(console=console, disable=not progress, transient=True) as bar:
        task = bar.add_task("checking images (--strict)", total=len(ds.samples))
        scan_images(ds, cfg.max_image_pixels, progress=lambda i: bar.advance(task))
    if ds.problems:
        lines = "\n".join(f"  {p}" for p in ds.problems)
        raise StrictError(f"--strict: {len(ds.problems)} problem(s) in {cfg.data}; nothing was extracted:\n{lines}")


def _run(plan: Plan, resume: bool, console, progress: bool, t_start: float) -> str:
    threads = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:  # the CPUs this process may use (cgroups, SLURM), not the machine's
        torch.set_num_threads(cpu_threads())
    try:
        return _run_threads(plan, resume, console, progress, t_start)
    finally:
        torch.set_num_threads(threads)


def _run_threads(plan: Plan, resume: bool, console, progress: bool, t_start: float) -> str:
    models, load_s = _load_models(plan)
    meta = _meta(plan, models)  # built once; `_finish` adds what the run itself changes
    loop = _open(plan, models, meta, resume, console.print)
    workers = auto_workers(plan.cfg.workers, models.device)
    use = use_lane(plan.cfg.overlap, models.device, models.captioner, workers, models.text, models.image)
    lane = ImageLane(models, loop.timings.extra) if use else None
    if lane:  # half the threads each (set before the lane's thread first runs an op: it takes the value then)
        torch.set_num_threads(max(1, torch.get_num_threads() // 2))
    try:
        _extract_rows(loop, _batches(loop, lane, workers), console, progress)
        path = _finish(loop, meta, load_s, t_start)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C / SIGTERM: cli.py says this and how to continue
            done = loop.writer.first_undone()  # the flags on disk: a signal may land inside a batch's write
            exc.kept = f"the first {done} of {len(plan.ds.samples)} rows are kept in {partial_path(plan.out)}"
            exc.again_flag = "--resume"
        loop.writer.close()  # the partial file stays, flushed up to the last batch: --resume continues it
        raise
    finally:
        if lane:
            lane.close()
    _summary(console, plan.ds, meta, path)
    return path


def _load_models(plan: Plan) -> tuple[Models, float]:
    cfg, weights = plan.cfg, plan.weights
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    text, image, captioner = _towers(plan, device)
    load_s = time.perf_counter() - t0
    if not 0 <= cfg.text_layers <= text.num_layers:
        raise ConfigError(f"--text-layers {cfg.text_layers}: {weights['text']['name']} has {text.num_layers} layers")
    if cfg.text_layers:
        text.layers()  # an encoder without a block list (hf: ALBERT, ...) says so before any file is made
    start_layer = text.num_layers - cfg.text_layers if cfg.text_layers else None
    return Models(text, image, captioner, cfg, device, start_layer, targets=plan.targets), load_s


_KEPT: dict = {}  # Plan.keep_models: the last towers loaded, under what built them, oldest first
# Sets kept at most: backbones are large, and a run predicts with one set, or one per text backbone when it is an
# ensemble of runs of two caches (`make run`'s model), whose raw-data predictions would otherwise reload both.
KEEP_SETS = 2


def _towers(plan: Plan, device) -> tuple:
    """(text, image, captioner or None) in eval mode on `device`: loaded, or kept from the previous call."""
    cfg, weights = plan.cfg, plan.weights
    key = json.dumps([weights, cfg.max_text_len, cfg.text_pooling, cfg.max_image_tokens, cfg.image_size,
                      cfg.captions, str(device)], sort_keys=True)
    if plan.keep_models and key in _KEPT:
        _KEPT[key] = _KEPT.pop(key)  # now the most recently used
        return _KEPT[key]
    text = create_text(weights["text"]["name"], WeightsSource.from_record(weights["text"]), max_len=cfg.max_text_len,
                       pooling=cfg.text_pooling)
    image = create_image(weights["image"]["name"], WeightsSource.from_record(weights["image"]), cfg.image_size)
    if cfg.max_image_tokens:
        image = BudgetedImage(image, cfg.max_image_tokens)
    captioner = create_captioner(cfg.captions, WeightsSource.from_record(weights["caption"])) if cfg.captions else None
    for m in (text, image, captioner):
        if m is not None:
            m.to(device).eval()
    if plan.keep_models:
        while len(_KEPT) >= KEEP_SETS:
            _KEPT.pop(next(iter(_KEPT)))  # the least recently used set
        _KEPT[key] = (text, image, captioner)
    else:
        _KEPT.clear()
    return text, image, captioner


def _shapes(plan: Plan, m: Models) -> dict[str, tuple[int, ...]]:
    n, L, K = len(plan.ds.samples), m.text.max_len, plan.cfg.image_views
    shapes = {"text/tokens": (n, L, m.text.token_dim), "text/mask": (n, L), "text/pooled": (n, m.text.pooled_dim),
              "image/tokens": (n, m.image.num_patches, m.image.token_dim), "image/pooled": (n, m.image.pooled_dim)}
    if m.start_layer is not None:
        shapes["text_hidden/states"] = (n, L, m.text.token_dim)
    if K:
        shapes["image_views/tokens"] = (n, K, m.image.num_patches, m.image.token_dim)
        shapes["image_views/pooled"] = (n, K, m.image.pooled_dim)
    return shapes


def _open(plan: Plan, models: Models, meta: dict, resume: bool, say) -> _Loop:
    """The writer on OUT.partial (new, or reopened by --resume with the image problems it had found)."""
    writer = CacheWriter(plan.out, meta, plan.ds.samples, _shapes(plan, models), resume=resume,
                         texts=not plan.cfg.no_text, targets=plan.targets)
    start = writer.first_undone() if resume else 0
    start -= start % plan.cfg.batch_size  # keep batch boundaries of an uninterrupted run
    # Image problems found so far, kept beside the partial file so a resumed run still reports all of them.
    # Only those of rows before `start`: a batch's problems are logged before its rows and flags, so a kill in
    # between leaves logged problems of rows this run decodes (and reports) again.
    problems = [p for p in writer.problems() if p[0] < start] if resume else []
    if resume:
        for p in problems:
            note_image_problems(plan.ds, p[0], [ImageNote(*p[1:])])
        say(f"resuming {escape(partial_path(plan.out))} at row {start} of {len(plan.ds.samples)}")
    owners = shared_owners(plan.ds, enabled=not plan.cfg.image_views and not plan.cfg.captions)
    return _Loop(plan, models, writer, start, problems, owners=owners)


def _batches(loop: _Loop, lane: ImageLane | None, workers: int):
    """(decoded batch, image arrays or None) for rows start..n, from the lane or from DataLoader workers."""
    cfg, ds, m = loop.plan.cfg, loop.plan.ds, loop.models
    # the transforms, not bound methods: workers must not receive the models (ImageEncoder.pixel_transform)
    transforms = [m.image.pixel_transform()] + ([m.captioner.pixel_transform()] if m.captioner else [])
    views = ViewMaker(cfg.image_views, cfg.image_aug, cfg.aug_seed) if cfg.image_views else None
    rows = ImageRows([s.image_path for s in ds.samples], [s.guid for s in ds.samples], transforms,
                     cfg.max_image_pixels, draft=m.image.decode_side(), views=views,
                     shared=frozenset(loop.owners))
    order = list(range(loop.start, len(ds.samples)))
    if lane:
        return lane_batches(lane, rows, order, cfg.batch_size)
    return loader_batches(rows, order, cfg.batch_size, workers)


def _extract_rows(loop: _Loop, batches, console, progress: bool) -> None:
    tm = loop.timings
    columns = [TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} samples/s"), TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("extract", total=len(loop.plan.ds.samples), completed=loop.start, rate="-")
        t_loop = time.perf_counter()
        while True:
            t = time.perf_counter()
            batch, image = next(batches, (None, None))
            tm.read += time.perf_counter() - t
            if batch is None:
                break
            _write_batch(loop, batch, image)
            tm.samples += len(batch)
            bar.update(task, advance=len(batch), rate=f"{tm.samples / (time.perf_counter() - t_loop):.1f}")


def _write_batch(loop: _Loop, batch: list, image: dict | None) -> None:
    """One decoded batch through the backbones (`image`: its image arrays when the lane made them) into the file."""
    ds, tm = loop.plan.ds, loop.timings
    idx = [i for i, _, _ in batch]
    invalid, logged = [], len(loop.problems)
    for i, tensors, notes in batch:
        if notes:
            note_image_problems(ds, i, notes)
            loop.problems += [[i, nt.kind, nt.message, nt.fatal] for nt in notes]
        if tensors is None:
            invalid.append(i)
    pix = [tensors for _, tensors, _ in batch]
    t = time.perf_counter()
    arrays, captions = forward_batch(loop.models, pix, idx, ds, image=image, timings=tm.extra)
    if loop.owners:
        invalid += fill_shared(arrays, idx, loop.owners, loop.writer, ds, loop.problems)
    tm.model += time.perf_counter() - t
    _check_finite(loop, arrays, idx)
    t = time.perf_counter()
    loop.writer.write(idx[0], arrays, captions=captions, invalid=invalid,
                      problems=loop.problems if len(loop.problems) > logged else None)
    tm.write += time.perf_counter() - t


def _check_finite(loop: _Loop, arrays: dict, idx: list[int]) -> None:
    bad = nonfinite_rows(arrays)
    if not bad:
        return
    rows = sorted({idx[k] for ks in bad.values() for k in ks})
    guids = ", ".join(loop.plan.ds.samples[i].guid for i in rows[:10]) + (" ..." if len(rows) > 10 else "")
    precision = loop.plan.cfg.precision()
    raise NonFiniteError(f"non-finite features (NaN or inf) in {', '.join(sorted(bad))} for {len(rows)} row(s) "
                         f"of the batch at row {idx[0]}, guid(s) {guids}, computed in {precision}; nothing of this "
                         f"batch was written ({partial_path(loop.plan.out)} keeps the rows before it). "
                         + ("fp16 autocast can overflow on unusual inputs: delete the partial file and extract "
                            "on the CPU (--device cpu, fp32), or leave those samples out. " if precision == "fp16"
                            else "Check those samples and the backbone weights. ")
                         + "Report it with those samples if they look ordinary.")


def _finish(loop: _Loop, meta: dict, load_s: float, t_start: float) -> str:
    tm = loop.timings
    meta.update(_dataset_meta(loop.plan.ds, loop.plan.fingerprint))  # image problems found while extracting
    meta["timings"] = {"load_models_s": round(load_s, 2), "read_wait_s": round(tm.read, 2),
                       "model_s": round(tm.model, 2), "write_s": round(tm.write, 2),
                       **{k: round(v, 2) for k, v in tm.extra.items()},
                       "total_s": round(time.perf_counter() - t_start, 2), "samples": tm.samples}
    return loop.writer.finish(meta)


def _meta(plan: Plan, m: Models) -> dict:
    cfg, ds, weights = plan.cfg, plan.ds, plan.weights
    return {
        "key": plan.key, "tool_version": project_version(), "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "backbone": {"name": cfg.backbone, "text": weights["text"]["name"], "image": weights["image"]["name"],
                     "captioner": cfg.captions},
        "weights": weights,
        "preprocessing": cfg.preprocessing(),
        "classes": list(ds.classes),
        "text": {"max_len": m.text.max_len, "token_dim": m.text.token_dim, "pooled_dim": m.text.pooled_dim,
                 "num_layers": m.text.num_layers, "start_layer": m.start_layer,
                 **({"second_segment": "target"} if plan.targets else {})},
        "image": {"num_patches": m.image.num_patches, "token_dim": m.image.token_dim,
                  "pooled_dim": m.image.pooled_dim, "image_size": m.image.image_size},
        **_dataset_meta(ds, plan.fingerprint),
        "extract_config": asdict(cfg),
        "env": environment(str(m.device), torch.get_num_threads()),
        **({"shard": ds.shard} if ds.shard else {}),
    }


def _dataset_meta(ds: Dataset, fingerprint: str) -> dict:
    """The part of the metadata that grows while extracting: counts and problems (images fail as they decode)."""
    return {"dataset": {"root": ds.root, "format": ds.format, "fingerprint": fingerprint, **summarize(ds)},
            "problems": [str(p) for p in ds.problems]}


def _summary(console, ds: Dataset, meta: dict, path: str) -> None:
    say = console.print
    d, t = meta["dataset"], meta.get("timings", {})
    splits = ", ".join(f"{n} {escape(s)}" for s, n in d.get("splits", {}).items())  # train, dev, test, ...
    say(f"[bold green]wrote[/] {escape(path)}: {d['samples']} samples ({splits}), "
        f"{d['invalid']} invalid, texts decoded as {d['text_encodings']}, {d['empty_texts']} empty text(s)")
    if t:
        rate = t["samples"] / max(t["read_wait_s"] + t["model_s"] + t["write_s"], 1e-9)
        say(f"time: load models {t['load_models_s']}s | read + decode (waiting) {t['read_wait_s']}s | "
            f"model {t['model_s']}s | write {t['write_s']}s | total {t['total_s']}s | {rate:.1f} samples/s")
    if ds.problems:
        say(f"[yellow]{len(ds.problems)} problem(s) in the input[/] (invalid rows are skipped by heads):")
        for p in ds.problems:
            say(f"  {p}", highlight=False, markup=False)  # "[kind]" and user text are not markup
