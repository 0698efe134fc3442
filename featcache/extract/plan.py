"""Everything `featcache extract` decides before a model is loaded: the dataset, the backbones and where their
weights are, the cache key and the output file, and whether that file already holds these features.

Everything that can fail because of the user (dataset layout, backbone names, missing weights, an output made
with other settings) fails here, in seconds, before any model is loaded.

The cache key changes only when the features would differ: it hashes the dataset's fingerprint, the backbone
pair, the weights' sha256 and the preprocessing (ExtractConfig.preprocessing), never the cache schema version
or this code's version, so a newer featcache-heads reuses the caches an older one wrote. Caches keyed before
the schema version left the key (it was 1 then) are recognised by that earlier key and reused as they are.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, replace

from rich.markup import escape

from ..backbones import get_backbone_spec, locate, parse_backbone, sized
from ..backbones.weights import ENV_DIR, WeightsError
from ..cache.store import CacheError, CacheReader, partial_path, problems_path
from ..digest import file_sha256
from ..errors import ConfigError
from ..sources.augment import get_aug_spec
from ..sources.base import Dataset, read_dataset
from .config import ExtractConfig
from .shards import select_shard, shard_key

KEYED_SCHEMA = 1  # the schema version that caches keyed with it (before it left the key) all hold


@dataclass
class Plan:
    cfg: ExtractConfig
    ds: Dataset  # the rows this process extracts (a shard's rows with --shard)
    weights: dict  # role (text | image | caption) -> {name, source, location, sha256}
    fingerprint: str  # of the whole dataset
    key: str  # the output's cache key (a shard's own key with --shard)
    out: str  # the output file
    earlier_keys: tuple[str, ...] = ()  # what older versions keyed these same features as: reused too
    # The dataset has targets (Twitter), each the text backbone's second segment; decided on the whole dataset
    # so that every shard encodes (and stores) them alike.
    targets: bool = False
    # Keep the loaded backbones in memory for the next extraction with the same ones (engine._towers): the
    # Python API (heads.load_run) extracts every batch of new posts it is given, and loading dominates small ones.
    keep_models: bool = False


def make_plan(cfg: ExtractConfig, expect_weights: dict | None = None) -> Plan:
    """`expect_weights` (role -> sha256, config.recorded_weights): refuse weights found with another checksum
    (reproducing a cache's features for a heads run: other weights would give other features)."""
    if cfg.caption_mode not in ("store", "append"):
        raise ConfigError(f"--caption-mode must be 'store' or 'append', got '{cfg.caption_mode}'")
    if cfg.max_image_tokens < 0:
        raise ConfigError(f"--max-image-tokens must be >= 0 (0 keeps every patch), got {cfg.max_image_tokens}")
    if cfg.image_size and cfg.image_size < 32:
        raise ConfigError(f"--image-size must be 0 (the backbone's own) or at least 32 px, got {cfg.image_size}")
    if cfg.image_views < 0:
        raise ConfigError(f"--image-views must be >= 0, got {cfg.image_views}")
    if cfg.overlap not in ("auto", "on", "off"):  # else found only once the models load and the output exists
        raise ConfigError(f"--overlap must be auto, on or off, got {cfg.overlap!r}")
    get_aug_spec(cfg.image_aug)
    ds = read_dataset(cfg.format, cfg.data, clean_text=cfg.clean_text, limit=cfg.limit, **cfg.reader_options)
    if cfg.splits:
        ds = only_splits(ds, cfg.splits, cfg.data)
    text_name, image_name = parse_backbone(cfg.backbone)
    sized(get_backbone_spec(image_name), cfg.image_size)  # a size for a backbone that cannot take one: say so now
    weights = _weights(cfg, text_name, image_name)
    check_weights(weights, expect_weights or {})
    fingerprint, targets = ds.fingerprint(), any(s.target for s in ds.samples)
    keys = [cache_key(fingerprint, (text_name, image_name), weights, cfg, schema)
            for schema in (None, KEYED_SCHEMA)]
    out = cfg.out or default_out(cfg, keys)
    if cfg.shard:  # from here on: the shard's rows, its own key (over the row range) and file
        ds, out = select_shard(ds, cfg.shard, cfg.batch_size, keys[0], out)
        keys = [shard_key(k, ds.shard) for k in keys]
    return Plan(cfg, ds, weights, fingerprint, keys[0], out, tuple(keys[1:]), targets)


def only_splits(ds: Dataset, splits, data: str) -> Dataset:
    """The rows of `splits` as a dataset of their own, with their problems and counts (`--split`)."""
    samples = [s for s in ds.samples if s.split in splits]
    if not samples:
        have = ", ".join(dict.fromkeys(s.split for s in ds.samples)) or "none"
        raise ConfigError(f"{data} has no rows in split(s) {', '.join(splits)} (its splits: {have})")
    guids = {s.guid for s in samples}
    return replace(ds, samples=samples, problems=[p for p in ds.problems if p.guid in guids or p.guid == "-"],
                   encodings=Counter(s.encoding for s in samples if s.encoding),
                   empty_texts=sum(s.empty_text for s in samples))


def check_weights(weights: dict, expect: dict) -> None:
    """WeightsError naming the backbone, where its weights were found and both checksums, for each role whose
    weights differ from the expected ones."""
    bad = [f"{role} backbone {weights[role]['name']}: the weights found at {weights[role]['location']} have "
           f"sha256 {weights[role]['sha256']}, the features were made with sha256 {sha}"
           for role, sha in expect.items() if role in weights and weights[role]["sha256"] != sha]
    if bad:
        raise WeightsError("refusing to extract with other weights than the recorded ones (" + "; ".join(bad)
                           + "). Other weights give other features, which the trained head cannot read. Provide "
                           f"the original weights (${ENV_DIR}/<backbone name>, or where they were found before).")


def cache_key(ds_fingerprint: str, backbone: tuple[str, str], weights: dict, cfg: ExtractConfig,
              schema: int | None = None) -> str:
    """`schema` only to compute the key an older version gave the same features (Plan.earlier_keys)."""
    return key_of(ds_fingerprint, backbone, weights, cfg.preprocessing(), schema)


def key_of(ds_fingerprint: str, backbone, weights: dict, preprocessing: dict, schema: int | None = None) -> str:
    """The cache key from its parts (also from a cache's meta: `featcache strip-text` re-keys what it strips)."""
    blob = json.dumps({**({"schema": schema} if schema is not None else {}), "dataset": ds_fingerprint,
                       "backbone": list(backbone), "weights": {k: v["sha256"] for k, v in weights.items()},
                       "preprocessing": preprocessing}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_out(cfg: ExtractConfig, keys: list[str]) -> str:
    """cache/<dataset>-<backbone>-<key>.h5; the file an older version named after an earlier key if it exists."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{os.path.basename(os.path.abspath(cfg.data))}-{cfg.backbone}")
    paths = [os.path.join("cache", f"{name}-{key[:8]}.h5") for key in keys]
    return next((p for p in paths[1:] if os.path.exists(p)), paths[0])


def _weights(cfg: ExtractConfig, text_name: str, image_name: str) -> dict:
    found = {"text": (text_name, locate(text_name, cfg.text_weights)),
             "image": (image_name, locate(image_name, cfg.image_weights))}
    if cfg.captions:
        if "caption" not in get_backbone_spec(cfg.captions).modalities:
            raise ConfigError(f"--captions takes a captioner, got '{cfg.captions}'")
        found["caption"] = (cfg.captions, locate(cfg.captions, cfg.caption_weights))
    out = {}
    for role, (name, src) in found.items():
        loc = str(src.location)
        # an HF cache snapshot folder is named by its commit: the exact revision (the key already has the sha256)
        revision = {"revision": os.path.basename(loc)} if f"{os.sep}snapshots{os.sep}" in loc else {}
        out[role] = {"name": name, "source": src.kind, "location": loc, **revision,
                     "sha256": file_sha256(loc) if os.path.exists(loc) else f"hub:{loc}"}
    return out


def already_extracted(plan: Plan, say) -> bool:
    """Whether plan.out is a complete cache of these features (reuse it); CacheError if it holds others."""
    out = plan.out
    if not os.path.exists(out):
        return False
    try:
        with CacheReader(out) as r:
            key = r.meta.get("key")
    except CacheError:
        key = None
    same = key == plan.key or key in plan.earlier_keys
    if not same:
        raise CacheError(f"{out} exists and was made with other settings; choose another --out or pass --force")
    if os.path.exists(problems_path(out)) and not os.path.exists(partial_path(out)):
        os.remove(problems_path(out))  # left by a run killed right after its final rename
    say(f"[green]cache {escape(out)} already holds these features (key {key}); reusing it "
        "(--force recomputes)[/]")
    return True
