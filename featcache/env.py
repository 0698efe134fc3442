"""The `env` block recorded in every cache and run directory: what produced a result, so it can be traced.

Versions come from the installed distributions (importlib.metadata), never from a constant in the code; the
project's own version is the package's (pyproject.toml), the git commit the checkout's when there is one.
Nothing here imports torch or transformers: a version lookup must not cost a heavy import.
"""
from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "featcache-heads"
WEIGHTS_DIR = "FEATCACHE_WEIGHTS"  # the environment variable naming the folder of a user's backbone weights
PACKAGES = ("torch", "transformers", "open_clip_torch", "timm", "numpy", "h5py", "safetensors")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def project_version() -> str:
    """The installed package's version; "0+unknown" when the code runs from a checkout that is not installed."""
    return _version(DISTRIBUTION) or "0+unknown"


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout the code runs from (+ "-dirty" with uncommitted changes), None outside git."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) or None


def cpu_threads() -> int:
    """CPUs this process may run on (the affinity mask: cgroups, SLURM, taskset), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def environment(device: str | None = None, threads: int | None = None) -> dict:
    """The env block: Python, package versions, project version and commit, device and thread count."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in PACKAGES},
        "project": project_version(),
        "git_commit": git_commit(),
        "device": device,
        "threads": threads if threads is not None else cpu_threads(),
    }
