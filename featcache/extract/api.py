"""`featcache.extract(...)`: `featcache extract` from Python, returning the cache path and its report.

    import featcache
    res = featcache.extract("../shared/mvsa", out="cache/mvsa.h5", splits=("test",))
    res.path, res.report["invalid"], res.report["problems"]

Options are ExtractConfig's fields (backbone, format, reader_options, text_layers, device, ...), so the Python
call and the CLI build the same config and run the same extraction (featcache.extract.launch.run_extract).
"""
from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console

from ..info import cache_summary
from .config import ExtractConfig
from .launch import run_extract


@dataclass
class Extracted:
    path: str  # the cache written (or reused: a complete cache of the same key); with --shard, a manifest
    report: dict  # featcache.info.cache_summary: samples and invalid rows per split and class, problems, backbones


def extract(data, out=None, *, resume: bool = False, strict: bool = False, force: bool = False,
            progress: bool = True, console: Console | None = None, **options) -> Extracted:
    """Extract `data` (a dataset folder or manifest) into `out` (default cache/<dataset>-<backbone>-<key>.h5).
    User mistakes raise featcache.errors.UserError with the message the CLI would print."""
    cfg = ExtractConfig(data=str(data), out=str(out) if out else None, **options)
    path = run_extract(cfg, resume=resume, strict=strict, force=force, console=console, progress=progress)
    return Extracted(path, cache_summary(path))
