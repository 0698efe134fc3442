"""Command line: `featcache` (run backbones once into an HDF5 cache) and `heads` (train fusion heads on it).

Each command is options -> config dataclass -> one library call. User mistakes (bad paths, unknown names,
unusable caches) end with a one-paragraph message and exit code 2, never a traceback.
"""
from __future__ import annotations

import contextlib
import functools
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.markup import escape  # messages quote user data and "[kind]" tags: print them literally

console = Console(stderr=True)

featcache_app = typer.Typer(help=__doc__.splitlines()[0] + "\n\nStage 0: run frozen backbones ONCE and keep "
                            "their token- and patch-level features in one HDF5 file.",
                            no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
heads_app = typer.Typer(help="Train, evaluate and apply light fusion heads on a feature cache (stage 1), "
                        "fine-tune the top text layers (stage 2), run ablations.",
                        no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


class _State:
    debug = os.environ.get("FEATCACHE_DEBUG", "") not in ("", "0")


def _debug_option(debug: bool = typer.Option(False, "--debug", help="Show the traceback behind an error message "
                                             "too (or set FEATCACHE_DEBUG=1).")):
    """Options shared by every command of the app (give them before the command name)."""
    _State.debug = _State.debug or debug


featcache_app.callback()(_debug_option)
heads_app.callback()(_debug_option)


def fail(message: str, code: int = 2):
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def command(app: typer.Typer, name: str):
    """`app.command(name)` with the one error policy of both apps: a user's mistake (featcache.errors.UserError,
    or a path that does not exist) is one paragraph and its exit code (2; --strict: 1), with the traceback under
    --debug; anything else is a bug: its traceback, a line saying so, exit 1. Nothing is swallowed."""
    prog = "featcache" if app is featcache_app else "heads"

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            from featcache.errors import UserError  # light: featcache's errors import nothing
            try:
                with _sigterm_interrupts():
                    return fn(*args, **kwargs)
            except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (featcache.errors.Interrupted)
                if _State.debug:  # where it was interrupted: what a hang or a slow step needs
                    console.print_exception()
                _interrupted(prog, exc)
            except (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
                if _State.debug:
                    console.print_exception()
                fail(_unquoted(str(exc)), getattr(exc, "exit_code", 2))
            except (typer.Exit, typer.Abort, click.ClickException):
                raise
            except Exception:
                console.print_exception()
                console.print("[bold red]This is a bug in featcache-heads, not a mistake of yours.[/] Please "
                              "report it with the traceback above and the command you ran.", highlight=False)
                raise typer.Exit(1) from None
        return app.command(name)(run)
    return wrap


def _unquoted(message: str) -> str:
    """A message without the quotes around it as a whole (str of an exception raised with a repr); a quote that
    only ends it ("got 'prepend'") stays: stripping every trailing quote printed "got 'prepend"."""
    if len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":
        return message[1:-1]
    return message


def _writable(path, what: str) -> None:
    """Stop with one paragraph naming the folder before any training or model loading when `path` (a file or
    directory to create) cannot be written there (featcache.outdir)."""
    from featcache.outdir import check_writable  # light: os and tempfile only
    check_writable(str(path), what)


_HANDLER_PID: list = []  # the process whose SIGTERM handler _sigterm_interrupts installed


def _default_sigterm_in_child() -> None:
    """A forked child (an ablation Pool worker, a DataLoader worker) gets SIGTERM's default action back at once.
    Pool.terminate() kills workers with SIGTERM; a Python handler runs only in the main thread between bytecodes,
    so a worker waiting in C on a queue lock while the signal lands on one of torch's threads never died, and the
    pool's join hung the command."""
    if _HANDLER_PID and os.getpid() != _HANDLER_PID[-1]:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_default_sigterm_in_child)


@contextlib.contextmanager
def _sigterm_interrupts():
    """While a command runs, SIGTERM raises featcache.errors.Interrupted in the main thread, so it ends like
    Ctrl-C: cleanup runs, the command says what it kept, exit 143. A forked child (an ablation worker, a
    DataLoader worker) that receives it dies as SIGTERM would: only the command's own process reports."""
    from featcache.errors import Interrupted  # light: featcache's errors import nothing
    if threading.current_thread() is not threading.main_thread():  # signal handlers: main thread only
        yield
        return
    pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Interrupted()

    previous = signal.signal(signal.SIGTERM, handler)
    _HANDLER_PID.append(pid)
    try:
        yield
    finally:
        _HANDLER_PID.pop()
        signal.signal(signal.SIGTERM, previous)


def _interrupted(prog: str, exc: KeyboardInterrupt):
    """One line: which signal, what the command kept, and the exact command that continues (or starts over:
    `again`, e.g. "run it again with"; empty: no command); exit 130 / 143."""
    code = getattr(exc, "exit_code", 130)
    kept = getattr(exc, "kept", None)
    lead = getattr(exc, "again", "continue with" if kept else "")
    args = list(sys.argv[1:])
    flag = getattr(exc, "again_flag", "")
    if flag and flag not in args:
        args.append(flag)
    again = f"; {lead}: {prog} {shlex.join(args)}" if lead else ""
    console.print(f"[bold yellow]interrupted ({'SIGTERM' if code == 143 else 'SIGINT'})[/]"
                  f"{escape(': ' + (kept or 'nothing was kept') + again)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _run_interrupts(out: Path):
    """An interrupted `heads train` / `heads finetune` says what it kept: its run directory appears whole at the
    end (heads.rundir.write_run), so nothing of this run unless the signal came after that rename."""
    import time
    started = time.time()
    try:
        yield
    except KeyboardInterrupt as exc:
        metrics = out / "metrics.json"
        written = metrics.exists() and metrics.stat().st_mtime >= started - 1  # mtime: coarse on some disks
        if written:
            exc.kept, exc.again = f"the run finished before the signal; {out} is complete", ""
        else:
            earlier = " (the earlier run there is unchanged)" if metrics.exists() else ""
            exc.kept = f"nothing of this run was kept: {out} is written only when training ends{earlier}"
            exc.again = "run it again with"
        raise


def _finished_runs(out: str) -> str:
    """What an interrupted ablation keeps: its finished runs (each run directory appears whole: rundir.write_run)."""
    runs = os.path.join(out, "runs")
    done = [d for d in (os.listdir(runs) if os.path.isdir(runs) else [])
            if not d.startswith(".") and os.path.exists(os.path.join(runs, d, "metrics.json"))]  # .tmp-*: unfinished
    return (f"{len(done)} finished run(s) are kept in {runs}; rerunning the same command skips them and trains "
            "the rest (an unfinished run starts over)")


def _opt(path: Optional[Path]) -> Optional[str]:
    return str(path) if path else None


# --------------------------------------------------------------------------------------------- featcache
@command(featcache_app, "extract")
def extract_cmd(
    data: Path = typer.Option(..., "--data", help="Dataset folder or manifest file (.csv / .jsonl) in any "
                              "layout of `featcache formats`."),
    fmt: str = typer.Option("auto", "--format", help="auto (recognised from the files) or a format of "
                            "`featcache formats`: mvsa, mvsa-single, mvsa-multiple, twitter, hateful-memes, "
                            "manifest."),
    images: Optional[Path] = typer.Option(None, help="twitter: the image folder (default: found beside or "
                                          "above the tsv files)."),
    id_column: Optional[str] = typer.Option(None, help="manifest: the id column (default id, else guid, else "
                                            "the row number)."),
    text_column: Optional[str] = typer.Option(None, help="manifest: the text column (default text)."),
    image_column: Optional[str] = typer.Option(None, help="manifest: the image path column (default image, "
                                               "else file_name)."),
    label_column: Optional[str] = typer.Option(None, help="manifest: the label column (default label)."),
    split_column: Optional[str] = typer.Option(None, help="manifest: the split column (default split)."),
    classes: Optional[str] = typer.Option(None, help="manifest: class names in label order, comma-separated "
                                          "(default: the labels found, sorted)."),
    no_text: bool = typer.Option(False, "--no-text", help="Keep features, ids, labels and splits only, not "
                                 "the posts' texts (a cache to share)."),
    backbone: str = typer.Option("minilm-l6+efficientnet-lite0-tf", help="A paired name (clip-vit-b32) or "
                                 "TEXT+IMAGE (roberta-base+resnet50); any model as hf:ID, timm:NAME[@FILE], "
                                 "open_clip:ARCH@TAG. See `featcache backbones`."),
    captions: Optional[str] = typer.Option(None, help="Caption every image once with this captioner "
                                           "(blip-base) and store the captions."),
    caption_mode: str = typer.Option("store", help="With --captions: 'store' keeps captions as strings only; "
                                     "'append' encodes 'text [SEP] caption' with the text backbone."),
    out: Optional[Path] = typer.Option(None, help="Output .h5 (default: cache/<dataset>-<backbone>-<key>.h5)."),
    resume: bool = typer.Option(False, help="Continue an interrupted extraction of the same settings."),
    strict: bool = typer.Option(False, help="Any bad input (missing/corrupt/odd image, bad label line, ...) "
                                "is an error, reported before any backbone runs."),
    clean_text: bool = typer.Option(False, help="Remove URLs, @users, '#' and extra whitespace before "
                                    "encoding (the raw text is stored too)."),
    max_text_len: int = typer.Option(64, help="Text tokens kept per sample (HF backbones; CLIP uses 77)."),
    text_layers: int = typer.Option(0, help="Also store the hidden states entering the top N text layers "
                                    "(for `heads finetune --unfreeze-text N`)."),
    image_views: int = typer.Option(0, help="Also store K augmented views of every image (heads draw one per "
                                    "sample per epoch); costs K extra image-backbone passes."),
    image_aug: str = typer.Option("weak", help="Policy of those views: weak (crop 0.7-1, flip, light jitter/"
                                  "blur) | strong (weak + RandAugment(2, 9))."),
    aug_seed: int = typer.Option(0, help="Seed of the views (each view is seeded by seed, guid and view)."),
    batch_size: int = typer.Option(0, help="Samples per batch (text backbone call, cache write); 0 = auto: 32 "
                                   "on CPU, 128 on CUDA."),
    image_micro_batch: int = typer.Option(0, help="Images per image-backbone call (0 = auto: 1 on CPU, where "
                                          "small batches are faster, the whole batch on CUDA)."),
    workers: int = typer.Option(-1, help="DataLoader workers decoding images while the model runs "
                                "(-1: auto, the cores beyond two, at most 4)."),
    overlap: str = typer.Option("auto", help="auto | on | off: the image backbone in a second thread while "
                                "the main one decodes and runs the text backbone, each with half the CPU "
                                "threads (auto: on for CPU runs without --workers whose two backbones are within "
                                "10x of each other in parameters: not for mpnet-base beside a small CNN)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N rows of each label file (quick trials)."),
    split: Optional[str] = typer.Option(None, "--split", help="Only the rows of these splits (comma list, e.g. "
                                        "test: new posts to predict; default every row)."),
    max_image_pixels: int = typer.Option(40_000_000, help="Images larger than this are refused before "
                                         "decoding (decompression-bomb guard)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    max_image_tokens: int = typer.Option(0, help="Pool the image patch grid to at most N tokens (adaptive "
                                         "average on the 2-D grid; 0 = keep every patch)."),
    image_size: int = typer.Option(0, help="Feed the image backbone N x N px images (timm CNNs: resnet*, "
                                   "efficientnet-lite0, timm:...; 288 gives EfficientNet-Lite0 9 x 9 patches "
                                   "instead of 7 x 7); 0 = the backbone's own size (224)."),
    text_pooling: str = typer.Option("", help="cls | mean: how an hf: text backbone pools its tokens "
                                     "(default: its sentence-transformers pooling config, else mean)."),
    text_weights: Optional[Path] = typer.Option(None, help="Local weights (folder or file) for the text backbone."),
    image_weights: Optional[Path] = typer.Option(None, help="Local weights (folder or file) for the image backbone."),
    caption_weights: Optional[Path] = typer.Option(None, help="Local weights folder for the captioner."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    force: bool = typer.Option(False, help="Recompute even if a complete cache with the same key exists."),
    shard: Optional[str] = typer.Option(None, help="I/N: extract only shard I (zero-based) of N into "
                                        "OUT.shard-I-of-N.h5 (SLURM arrays); the last shard done writes "
                                        "OUT.manifest.json. Under torchrun each rank takes its shard itself."),
):
    """Run the backbones once over DATA and write the feature cache (sharded: --shard or torchrun)."""
    from featcache.extract.config import ExtractConfig
    from featcache.extract.launch import run_extract

    options = {"images": _opt(images), "id_column": id_column, "text_column": text_column,
               "image_column": image_column, "label_column": label_column, "split_column": split_column,
               "classes": classes}
    cfg = ExtractConfig(data=str(data), format=fmt, reader_options={k: v for k, v in options.items() if v},
                        no_text=no_text, backbone=backbone, captions=captions, caption_mode=caption_mode,
                        out=str(out) if out else None, clean_text=clean_text, max_text_len=max_text_len,
                        text_layers=text_layers, image_views=image_views, image_aug=image_aug,
                        aug_seed=aug_seed, batch_size=batch_size, image_micro_batch=image_micro_batch,
                        workers=workers, overlap=overlap, limit=limit,
                        max_image_pixels=max_image_pixels, device=device,
                        max_image_tokens=max_image_tokens, image_size=image_size, text_pooling=text_pooling,
                        text_weights=_opt(text_weights), image_weights=_opt(image_weights),
                        caption_weights=_opt(caption_weights), shard=shard,
                        splits=tuple(s.strip() for s in split.split(",")) if split else ())
    run_extract(cfg, resume=resume, strict=strict, force=force, console=console, progress=progress)


@command(featcache_app, "merge")
def merge_cmd(
    manifest: Path = typer.Argument(..., help="OUT.manifest.json of a sharded extraction."),
    out: Path = typer.Option(..., "--out", help="The single cache file to write."),
    force: bool = typer.Option(False, help="Overwrite --out if it exists."),
):
    """Check every shard of MANIFEST and write them as one ordinary cache file."""
    from featcache.cache.manifest import merge
    try:
        path = merge(str(manifest), str(out), force=force)
    except KeyboardInterrupt as exc:  # merge removes its partial file on any exit; the shards are only read
        exc.kept, exc.again = f"the shards of {manifest} are unchanged and no {out} was written", "run it again with"
        raise
    console.print(f"wrote {path}", highlight=False)


@command(featcache_app, "info")
def info_cmd(file: Path = typer.Argument(..., help="A cache written by `featcache extract`, or the "
                                         "OUT.manifest.json of a sharded one."),
             as_json: bool = typer.Option(False, "--json", help="Print one JSON object (format, classes, "
                                          "per-split and per-class counts, backbones, invalid) for scripts.")):
    """Print what a cache holds: backbones, weights, preprocessing, counts, arrays and sizes."""
    if as_json:
        import json

        from featcache.info import cache_summary
        typer.echo(json.dumps(cache_summary(str(file)), indent=2))
        return
    from featcache.info import print_info
    print_info(str(file))


@command(featcache_app, "strip-text")
def strip_text_cmd(file: Path = typer.Argument(..., help="A cache written by `featcache extract` (rewritten in "
                                              "place, atomically).")):
    """Remove the posts' texts (samples/raw_text, text, target) from a cache, keeping features, ids, labels and
    splits: what `featcache extract --no-text` writes."""
    from featcache.extract.strip import strip_text
    res = strip_text(str(file))
    if res["removed"]:
        console.print(f"removed {', '.join(res['removed'])} from {file} (key now {res['key']})", highlight=False)
    else:
        console.print(f"{file} holds no texts; nothing to do", highlight=False)


@command(featcache_app, "formats")
def formats_cmd():
    """List the dataset formats `featcache extract --format` reads: layout, options, class names."""
    from featcache.info import print_formats
    print_formats()


@command(featcache_app, "backbones")
def backbones_cmd():
    """List the registered backbones, where their weights come from and whether they are here."""
    from featcache.info import print_backbones
    print_backbones()


# --------------------------------------------------------------------------------------------- heads
VAL_SPLIT_HELP = ("Validation rows: auto = the data's own dev/val/validation split when it has labels (then "
                  "the labelled train rows train), else a stratified --val-ratio carve; none = always carve; "
                  "or a split name. Other labelled splits (test, ...) are scored once at the end.")
SPLIT_FILE_HELP = ("A published split: `id,split` lines, or a folder of train/dev/val/test.txt id lists. "
                   "Mismatched ids are reported; unlisted rows are not used.")
METRIC_HELP = "Early-stopping metric: macro_f1 | accuracy | weighted_f1 | auroc (two classes: ROC-AUC of class 1)"
MEMORY_BUDGET_HELP = ("Feature arrays read into memory at most (auto = RAM/8, 0 = always stream, or 4GB, "
                      "512MB, ...). A head whose arrays need more reads them from the cache in shuffled blocks "
                      "(README: Caches larger than memory).")

@command(heads_app, "train")
def heads_train_cmd(
    cache: Path = typer.Option(..., "--cache", help="A feature cache written by `featcache extract` (or the "
                               "manifest of a sharded one)."),
    fusion: Optional[str] = typer.Option(None, help="Fusion head (see `heads fusions`); default: the "
                                         "registry's DEFAULT_FUSION."),
    modality: str = typer.Option("both", help="both | text | image (single-modality ablation)."),
    loss: str = typer.Option("ce", help="ce | weighted_ce (1/sqrt(freq) class weights) | focal"),
    label_smoothing: float = typer.Option(0.0, help="Label smoothing for the loss (0 = off)."),
    rdrop: float = typer.Option(0.0, help="R-Drop: weight of the KL between two dropout passes (0 = off)."),
    modality_dropout: float = typer.Option(0.0, help="Per-sample probability of dropping one modality "
                                           "(never both) while training."),
    epochs: int = typer.Option(30, help="Maximum epochs (early stopping may end sooner)."),
    batch_size: int = typer.Option(128, help="Training batch size."),
    lr: float = typer.Option(1e-3, help="Peak learning rate (AdamW, warmup + cosine)."),
    hidden: int = typer.Option(128, help="Hidden size of the head."),
    patience: int = typer.Option(3, help="Stop after this many epochs without improvement (0 = never)."),
    seed: int = typer.Option(0, help="Seed for the split, initialisation, dropout and batch order."),
    val_ratio: float = typer.Option(0.2, help="Stratified validation fraction of the labelled samples."),
    folds: int = typer.Option(0, "--folds", help="K >= 2: a cross-fit run, K heads on a stratified K-fold "
                              "split of every labelled sample (each early-stopped on its own fold), one run "
                              "directory; metrics are on the out-of-fold predictions; predict averages the K "
                              "heads. 0: one head, --val-ratio validation."),
    test_ratio: float = typer.Option(0.0, help="Also hold out this stratified fraction as an internal test "
                                     "split: scored once at the end, never used for early stopping or bias."),
    val_split: str = typer.Option("auto", help=VAL_SPLIT_HELP),
    split_file: str = typer.Option("", "--split-file", help=SPLIT_FILE_HELP),
    image_aug_views: bool = typer.Option(True, "--image-aug-views/--no-image-aug-views", help="On a cache "
                                         "with --image-views: train on one stored view per sample per epoch "
                                         "(evaluation uses the clean view)."),
    metric: str = typer.Option("macro_f1", help=METRIC_HELP),
    tune_bias: bool = typer.Option(False, help="Fit per-class logit offsets on the validation split for "
                                   "macro-F1 (both tuned and untuned metrics are reported)."),
    precision: str = typer.Option("auto", help="auto | fp32 | bf16: bf16 autocast for the training steps; "
                                  "auto = bf16 where the CPU/GPU computes it natively."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    threads: int = typer.Option(0, help="CPU threads for torch (0 = every core; with --folds K, 0 trains the "
                                "folds side by side, one per core with one thread each: the numbers of "
                                "--threads 1). 1 is faster when other work shares the cores."),
    memory_budget: str = typer.Option("auto", help=MEMORY_BUDGET_HELP),
    plots: bool = typer.Option(True, help="Write PNG plots into the run directory."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default: runs/<fusion>-<modality>-s<seed>-"
                                       "<time>)."),
):
    """Train one fusion head on the cache and write a run directory (config, weights, metrics, plots)."""
    import time

    from heads.config import TrainConfig
    from heads.fusions import DEFAULT_FUSION
    from heads.rundir import check_out_dir
    from heads.train.crossfit import train_crossfit
    from heads.train.stage1 import train

    fusion = fusion or DEFAULT_FUSION
    kind = f"-cv{folds}" if folds else ""
    out = out or Path("runs") / f"{fusion}-{modality}{kind}-s{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    if folds == 1 or folds < 0:
        fail(f"--folds must be 0 (one head) or at least 2 (a cross-fit run), got {folds}")
    cfg = TrainConfig.from_flat(folds=folds,
        fusion=fusion, modality=modality, loss=loss, label_smoothing=label_smoothing, rdrop=rdrop,
        modality_dropout=modality_dropout, epochs=epochs, batch_size=batch_size, lr=lr, hidden=hidden,
        patience=patience, seed=seed, val_ratio=val_ratio, test_ratio=test_ratio, val_split=val_split,
        split_file=split_file, image_aug_views=image_aug_views, metric=metric, tune_bias=tune_bias,
        precision=precision, device=device, threads=threads, memory_budget=memory_budget, plots=plots)
    _writable(out, "the run directory")
    check_out_dir(str(out))
    with _run_interrupts(out):
        (train_crossfit if folds else train)(cfg.validate(), str(cache), str(out), console=Console())


@command(heads_app, "predict")
def heads_predict_cmd(
    run: Path = typer.Option(..., "--run", help="A run directory written by `heads train` / `finetune` / "
                             "`ensemble`."),
    cache: Optional[str] = typer.Option(None, "--cache", help="Feature cache with the same backbone/"
                                        "preprocessing (an ensemble of runs of several backbones: one cache "
                                        "per backbone, comma-separated)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Or raw data (any layout of `featcache formats`): "
                                        "its --split rows are extracted as the run's cache was (backbones, "
                                        "weights by sha256, preprocessing), then predicted."),
    fmt: str = typer.Option("auto", "--format", help="With --data: the dataset format (auto: detected)."),
    keep_cache: Optional[Path] = typer.Option(None, "--keep-cache", help="With --data: keep the extracted "
                                              "cache in this file (a second run reuses it)."),
    split: str = typer.Option("test", help="Which split of the cache to predict: any of its split names "
                              "(train, test, dev, test_unseen, ...)."),
    out: Path = typer.Option(..., "--out", help="Output file: `guid,tag` lines with a header."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    proba: bool = typer.Option(False, "--proba", help="Also write each class's probability (p_<class> "
                               "columns after guid,tag; empty for invalid samples)."),
    memory_budget: str = typer.Option("auto", help=MEMORY_BUDGET_HELP + " Stage-1 runs (stage 2 reads its "
                                      "cache into memory)."),
):
    """Apply a trained head (or a cross-fit run's K heads, probabilities averaged) to every sample of a cache
    split, or of raw data (--data); invalid samples are listed, not dropped."""
    from heads.predict import predict, predict_data

    if (cache is None) == (data is None):
        fail("give exactly one of --cache (extracted features) or --data (raw data, extracted for the run)")
    if data is None:
        _writable(out, "the predictions")
        res = predict(str(run), cache.split(","), str(out), split=split, device=device, proba=proba,
                      memory_budget=memory_budget)
    else:
        for path, what in ((out, "the predictions"), (keep_cache, "the cache")):
            if path:
                _writable(path, what)
        res = predict_data(str(run), str(data), str(out), split=split, fmt=fmt, keep_cache=_opt(keep_cache),
                           device=device, proba=proba, console=console, memory_budget=memory_budget)
    tags = ", ".join(f"{t} {n}" for t, n in sorted(res.tags.items()))
    console.print(f"wrote {res.written} predictions ({tags}) to {res.out}", highlight=False)
    if res.invalid:
        console.print(f"[yellow]{len(res.invalid)} invalid sample(s) written with the fallback tag "
                      f"'{res.fallback_tag}':[/] {', '.join(res.invalid)}", highlight=False)


@command(heads_app, "ensemble")
def heads_ensemble_cmd(
    runs: list[Path] = typer.Argument(..., help="Finished `heads train` runs (single or --folds) with the same "
                                      "classes: of one cache, or of caches of other backbones on the same data."),
    out: Path = typer.Option(..., "--out", help="The ensemble's run directory (usable by `heads predict`)."),
    weighting: str = typer.Option("equal", help="equal | val: weight each run by its validation (with --folds: "
                                  "out-of-fold) macro-F1."),
):
    """Combine finished runs into one run that averages their class probabilities. Runs of caches of other
    backbones predict with one cache per backbone (`heads predict --cache a.h5,b.h5`, or `--data`)."""
    from heads.ensemble import build_ensemble

    _writable(out, "the ensemble's run directory")
    m = build_ensemble([str(r) for r in runs], str(out), weighting)
    if m["validated"]:
        oof = m.get("out_of_fold")
        rows = "every labelled row, out of fold in each" if oof else "their shared validation rows"
        console.print(f"{m['fusion']}: {'out-of-fold' if oof else 'validation'} accuracy {m['accuracy']:.4f} · "
                      f"macro_f1 {m['macro_f1']:.4f} · "
                      f"weighted_f1 {m['weighted_f1']:.4f} (averaged probabilities of {len(runs)} runs on {rows})",
                      highlight=False)
    else:
        console.print(f"{m['fusion']}: the runs validated on different rows, so the ensemble has no validation "
                      "score (single runs: train them with one seed; cross-fit runs, --folds K, share every "
                      "labelled row)", highlight=False)
    console.print(f"ensemble run directory: {out}", highlight=False)


@command(heads_app, "fusions")
def heads_fusions_cmd():
    """List the registered fusion heads."""
    from rich.table import Table

    from heads.fusions import DEFAULT_FUSION, FUSIONS

    table = Table("name", "inputs", "description")
    for name, head in FUSIONS.items():
        label = f"{name} (default)" if name == DEFAULT_FUSION else name
        table.add_row(label, "tokens + masks" if head.uses_tokens() else "pooled", head.description())
    Console().print(table)


@command(heads_app, "ablate")
def heads_ablate_cmd(
    cache: Path = typer.Option(..., "--cache", help="A feature cache written by `featcache extract` (one)."),
    out: Path = typer.Option(..., "--out", help="Ablation directory: runs/<grid values>/ and the summaries."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="TOML grid file: one line per axis, a TrainConfig "
                                        "field = a list of values."),
    fusion: Optional[str] = typer.Option(None, help="Comma list of fusions (grid axis)."),
    modality: Optional[str] = typer.Option(None, help="Comma list of both,text,image (grid axis)."),
    loss: Optional[str] = typer.Option(None, help="Comma list of losses (grid axis)."),
    seeds: str = typer.Option("0,1,2", help="Comma list of seeds (each split and initialisation)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="key=v1,v2: any `heads train` option as a "
                                             "grid axis (repeatable), e.g. --set label_smoothing=0,0.1"),
    folds: int = typer.Option(0, help="K >= 2: each config and seed is one cross-fit run (`heads train --folds "
                              "K`: K fold heads, scored on out-of-fold predictions) instead of one validation "
                              "split (0)."),
    baseline: str = typer.Option("concat", help="What every configuration is compared against (paired): a "
                                 "fusion, or KEY=VALUE of any axis, e.g. cache=raw-none or rdrop=0."),
    probe: bool = typer.Option(False, help="Add a logistic-regression probe per seed (cross-fitted with --folds) "
                               "(logreg-probe)."),
    metric: str = typer.Option("macro_f1", help=METRIC_HELP),
    val_split: str = typer.Option("auto", help=VAL_SPLIT_HELP),
    split_file: str = typer.Option("", "--split-file", help=SPLIT_FILE_HELP),
    memory_budget: str = typer.Option("auto", help=MEMORY_BUDGET_HELP + " One budget for the whole grid: it "
                                      "reads every feature array."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
    shard: str = typer.Option("", help="I/N: train only slice I (zero-based, 0..N-1) of N of the grid into the "
                              "shared --out (runs dealt round-robin, costliest first); auto: I/N from torchrun's "
                              "RANK/WORLD_SIZE or a SLURM array (counted from SLURM_ARRAY_TASK_MIN). The slice "
                              "that finishes the grid writes the summaries; `heads report OUT` any time."),
):
    """Train a grid of heads from one cache loaded once (resumable), then write summaries and comparisons.
    Without axis options or --grid the grid is every fusion x modality both,text,image."""
    from heads.ablate import ABLATION_BASE, AblateConfig, ablate, grid_from_options, parse_seeds
    from heads.report.plan import AFTER_SLICE, missing_note

    spec = grid_from_options(_opt(grid), {"fusion": fusion, "modality": modality, "loss": loss}, set_ or [])
    _writable(out, "the ablation")
    cfg = AblateConfig(cache=str(cache), out=str(out), grid=spec, baseline=baseline, probe=probe,
                       folds=folds, progress=progress, seeds=parse_seeds(seeds), shard=shard,
                       base={**ABLATION_BASE, "metric": metric, "val_split": val_split,
                             "split_file": split_file, "memory_budget": memory_budget})
    try:
        res = ablate(cfg, console=console)
    except KeyboardInterrupt as exc:  # finished runs survive any interruption (each appears whole, at its end)
        exc.kept = _finished_runs(str(out))
        raise
    done = f"{res.trained} run(s) trained, {res.skipped} already finished"
    done = f"slice {cfg.shard}: {done}" if cfg.shard else done
    if res.report is None:  # a slice that ended before the rest of the grid: no summaries yet
        console.print(f"{done}; {missing_note(str(out), res.missing, res.planned, AFTER_SLICE)}", markup=False,
                      highlight=False)
        return
    console.print(f"{done}; summaries in {res.out}", highlight=False)
    typer.echo(open(res.report.files[1]).read(), nl=False)


@command(heads_app, "report")
def heads_report_cmd(
    dirs: list[Path] = typer.Argument(..., help="Ablation or run directories (searched recursively)."),
    out: Optional[Path] = typer.Option(None, help="Where to write the summaries (default: the first DIR)."),
    baseline: Optional[str] = typer.Option(None, help="Paired baseline: a fusion or KEY=VALUE (default: the "
                                           "ablation's, else concat)."),
    metric: str = typer.Option("macro_f1", help="Metric of the group-by, correlation, top-k and page: accuracy "
                               "| macro_f1 | weighted_f1 | train_s | roc_auc (two classes) | neutral_f1 (with "
                               "a neutral class)"),
    group_by: Optional[str] = typer.Option(None, "--group-by", help="Config key(s), e.g. fusion or loss,lr: "
                                           "mean / std / best of the metric per value (groupby_<keys>.md)."),
    top: Optional[int] = typer.Option(None, help="Write the top-K configurations table (default 10 with --export)."),
    export: Optional[str] = typer.Option(None, help="Formats of the top-K table: md,latex (top<K>.md / .tex)."),
):
    """Rebuild summary.csv/md, best.json, comparison.png, paired.*, modality.md, correlation.* and the one-page
    summary.html/png from finished runs; optionally a group-by table and the top-K table for papers."""
    import os

    from heads.report.plan import AFTER_REPORT, missing_note
    from heads.report.build import write_reports

    _writable(out or dirs[0], "the report")
    try:
        report = write_reports([str(d) for d in dirs], str(out or dirs[0]), baseline=baseline, metric=metric,
                               group_by=group_by or "", top=top or 0, export=export or "")
    except KeyboardInterrupt as exc:  # each summary file is replaced whole (featcache.outdir.atomic_file)
        exc.kept = (f"every summary file in {out or dirs[0]} is whole: those already rewritten are new, the others "
                    "as they were")
        exc.again = "run it again with"
        raise
    console.print(f"{len(report.runs)} run(s), {len(report.rows)} configuration(s); wrote "
                  f"{', '.join(os.path.basename(f) for f in report.files)} to {out or dirs[0]}", highlight=False)
    typer.echo("\n".join(open(f).read() for f in report.printed), nl=False)
    for folder, (names, planned) in report.missing.items():  # a sharded ablation not finished yet
        console.print(missing_note(folder, names, planned, AFTER_REPORT), markup=False, highlight=False)

# ------------------------------------------------------------------------------------ stage 2 (finetune)
@command(featcache_app, "add-text-layers")
def add_text_layers_cmd(
    file: Path = typer.Argument(..., help="A cache written by `featcache extract` (updated in place, safely)."),
    layers: int = typer.Option(..., "--layers", help="Store the hidden states entering the top N text layers."),
    batch_size: int = typer.Option(64, help="Texts per backbone call."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
):
    """Add text_hidden/states for `heads finetune --unfreeze-text N` to an existing cache, running only the
    text backbone (checked against the cached tokens); the features and the cache key do not change."""
    from featcache.extract.text_layers import add_text_layers
    try:
        add_text_layers(str(file), text_layers=layers, batch_size=batch_size, device=device, console=console)
    except KeyboardInterrupt as exc:  # the work is on a copy renamed over FILE at the end (text_layers.py)
        exc.kept = f"{file} is unchanged (the states are added to a copy that replaces it only when complete)"
        exc.again = "run it again with"
        raise


@command(heads_app, "finetune")
def heads_finetune_cmd(
    cache: Path = typer.Option(..., "--cache", help="A feature cache (ideally with text_hidden/states: "
                               "`featcache extract --text-layers N` or `featcache add-text-layers`)."),
    text_layers: int = typer.Option(..., "--unfreeze-text", help="Train the top N text layers (0 = head only)."),
    init: Optional[Path] = typer.Option(None, "--init", help="Stage-1 run to start from (head, config, split)."),
    fusion: Optional[str] = typer.Option(None, help="Fusion of a fresh head (without --init)."),
    lr_head: float = typer.Option(2e-4, help="Peak learning rate of the head."),
    lr_text: float = typer.Option(5e-5, help="Peak learning rate of the unfrozen text layers."),
    epochs: int = typer.Option(5, help="Maximum epochs (early stopping on --metric may end sooner)."),
    batch_size: int = typer.Option(32, help="Micro-batch size."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    patience: int = typer.Option(3, help="Stop after this many epochs without improvement (0 = never)."),
    metric: str = typer.Option("macro_f1", help=METRIC_HELP),
    seed: int = typer.Option(0, help="Seed (split without --init, head init, dropout, batch order)."),
    val_split: str = typer.Option("auto", help=VAL_SPLIT_HELP + " Without --init only."),
    split_file: str = typer.Option("", "--split-file", help=SPLIT_FILE_HELP + " Without --init only."),
    text_forward: str = typer.Option("cached", help="cached: top N layers on stored states | full: the whole "
                                     "text tower every step."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    plots: bool = typer.Option(True, help="Write PNG plots into the run directory."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default: runs/ft<N>-<fusion>-s<seed>-<time>)."),
):
    """Fine-tune the top N text layers with a fusion head (stage 2); same run directory as `heads train`
    plus text_layers.safetensors, usable by `heads predict`."""
    import time

    from heads.config import FinetuneConfig
    from heads.fusions import DEFAULT_FUSION
    from heads.rundir import check_out_dir
    from heads.train.stage2 import finetune

    fusion = fusion or DEFAULT_FUSION
    out = out or Path("runs") / f"ft{text_layers}-{fusion}-s{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = FinetuneConfig.from_flat(
        text_layers=text_layers, init=_opt(init), fusion=fusion, lr=lr_head, lr_text=lr_text, epochs=epochs,
        batch_size=batch_size, grad_accum=grad_accum, patience=patience, metric=metric, seed=seed,
        val_split=val_split, split_file=split_file, text_forward=text_forward, device=device, plots=plots)
    _writable(out, "the run directory")
    check_out_dir(str(out))
    with _run_interrupts(out):
        finetune(cfg, str(cache), str(out), console=console)


@command(heads_app, "show")
def heads_show_cmd(run: Path = typer.Argument(..., help="A run directory (heads train / finetune / ensemble).")):
    """Print a run's metrics table: validation rows, out-of-fold rows of a cross-fit run, or an ensemble's."""
    from heads.report.console import print_summary
    from heads.rundir import load_json

    path = run / "metrics.json"
    if not path.exists():
        fail(f"{run} has no metrics.json: not a finished run directory of `heads train` or `heads finetune`")
    print_summary(load_json(str(path)), str(run), Console())  # single, cross-fit, stage 2 or ensemble


def main():  # pragma: no cover - `python cli.py featcache ...` convenience
    app = {"featcache": featcache_app, "heads": heads_app}[sys.argv.pop(1)]
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
