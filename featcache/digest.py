"""Content digests: what ties a cache to the weights that made it and a shard manifest to its shard files.

Its own module because both sides use it: extraction and stage 2 hash weights (featcache.backbones, heavy to
import), the manifest reader hashes shards (featcache.cache, light: `featcache info` must stay quick).
"""
from __future__ import annotations

import hashlib
import os


def file_sha256(path: str) -> str:
    """sha256 of a file, or of every file in a folder (sorted by relative path, which is hashed too)."""
    h = hashlib.sha256()
    paths = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, files in os.walk(path) for f in files)
    for p in paths:
        if os.path.isdir(path):
            h.update(os.path.relpath(p, path).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
