"""Command line: `featcache` (run backbones once into an HDF5 cache) and `heads` (train fusion heads on it).

Each command is options -> config dataclass -> one library call. User mistakes (bad paths, unknown names,
unusable caches) end with a one-paragraph message and exit code 2, never a traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console(stderr=True)

featcache_app = typer.Typer(help=__doc__.splitlines()[0] + "\n\nStage 0: run frozen backbones ONCE and keep "
                            "their token- and patch-level features in one HDF5 file.",
                            no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
heads_app = typer.Typer(help="Train, evaluate and apply light fusion heads on a feature cache (stage 1), "
                        "fine-tune the top text layers (stage 2), run ablations.",
                        no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def fail(message: str, code: int = 2):
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors():
    """Exceptions that mean the user asked for something impossible (message shown, no traceback)."""
    from featcache.store import CacheError
    from featcache.weights import WeightsError
    return (CacheError, WeightsError, FileNotFoundError, KeyError, ValueError)


def _opt(path: Optional[Path]) -> Optional[str]:
    return str(path) if path else None


# --------------------------------------------------------------------------------------------- featcache
@featcache_app.command("extract")
def extract_cmd(
    data: Path = typer.Option(..., "--data", help="Dataset folder in the MVSA-Single layout "
                              "(train.txt, test_without_label.txt, data/GUID.jpg|txt)."),
    backbone: str = typer.Option("minilm-l6+efficientnet-lite0", help="A paired name (clip-vit-b32) or "
                                 "TEXT+IMAGE (roberta-base+resnet50). See `featcache backbones`."),
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
    batch_size: int = typer.Option(32, help="Samples per backbone call."),
    workers: int = typer.Option(-1, help="DataLoader workers decoding images (-1: one per spare core)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N rows of each label file (quick trials)."),
    max_image_pixels: int = typer.Option(40_000_000, help="Images larger than this are refused before "
                                         "decoding (decompression-bomb guard)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    text_weights: Optional[Path] = typer.Option(None, help="Local weights (folder or file) for the text backbone."),
    image_weights: Optional[Path] = typer.Option(None, help="Local weights (folder or file) for the image backbone."),
    caption_weights: Optional[Path] = typer.Option(None, help="Local weights folder for the captioner."),
    progress: bool = typer.Option(True, help="Show progress bars."),
    force: bool = typer.Option(False, help="Recompute even if a complete cache with the same key exists."),
):
    """Run the backbones once over DATA and write the feature cache."""
    from featcache.extract import ExtractConfig, StrictError, extract

    cfg = ExtractConfig(data=str(data), backbone=backbone, captions=captions, caption_mode=caption_mode,
                        out=str(out) if out else None, clean_text=clean_text, max_text_len=max_text_len,
                        text_layers=text_layers, batch_size=batch_size, workers=workers, limit=limit,
                        max_image_pixels=max_image_pixels, device=device,
                        text_weights=_opt(text_weights), image_weights=_opt(image_weights),
                        caption_weights=_opt(caption_weights))
    try:
        extract(cfg, resume=resume, strict=strict, force=force, console=console, progress=progress)
    except StrictError as exc:
        fail(str(exc), code=1)
    except user_errors() as exc:
        fail(str(exc).strip("'\""))


@featcache_app.command("info")
def info_cmd(file: Path = typer.Argument(..., help="A cache written by `featcache extract`.")):
    """Print what a cache holds: backbones, weights, preprocessing, counts, arrays and sizes."""
    from featcache.info import print_info
    try:
        print_info(str(file))
    except user_errors() as exc:
        fail(str(exc).strip("'\""))


@featcache_app.command("backbones")
def backbones_cmd():
    """List the registered backbones, where their weights come from and whether they are here."""
    from featcache.info import print_backbones
    print_backbones()


# --------------------------------------------------------------------------------------------- heads
# (heads commands below)


def main():  # pragma: no cover - `python cli.py featcache ...` convenience
    app = {"featcache": featcache_app, "heads": heads_app}[sys.argv.pop(1)]
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
