"""Which torch device a command runs on: one rule for extraction, add-text-layers and the heads commands.

    auto     CUDA when there is a CUDA device, else the CPU
    cpu      the CPU
    cuda     the current CUDA device;  cuda:N  CUDA device N

Extraction computes in fp16 autocast on CUDA and in fp32 on the CPU (`compute_precision`); the cache records
it (featcache.cache.store.cache_precision) and whatever recomputes cached features uses the same
(`precision_autocast`).

Asking for CUDA where there is none is a user mistake (ValueError, exit 2), never a silent fall back to the
CPU: a run that the user believes is on a GPU must not quietly take a hundred times longer.
"""
from __future__ import annotations

import re
from contextlib import nullcontext

import torch

from .errors import ConfigError

_CUDA = re.compile(r"^cuda(:\d+)?$")


def check_device_name(name: str) -> str:
    """`name` if it is a device name this module resolves (configs check it before anything runs)."""
    if name not in ("auto", "cpu") and not _CUDA.match(name or ""):
        raise ConfigError(f"--device {name!r}: give auto, cpu, cuda or cuda:N")
    return name


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    check_device_name(name)
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name} but no CUDA device is available here")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


def compute_precision(device: torch.device) -> str:
    """The precision extraction computes in on `device`: fp16 autocast on CUDA (tensor cores, half the memory),
    fp32 on the CPU (CPU fp16 is slow and not what the cache was ever made with)."""
    return "fp16" if device.type == "cuda" else "fp32"


def precision_autocast(precision: str, device: torch.device):
    """The context that computes in `precision` on `device` (fp16: CUDA autocast; fp32: no autocast)."""
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError("this cache was computed in fp16 (CUDA autocast); recomputing its features on "
                              f"{device} would not reproduce them: run on a CUDA device (--device cuda)")
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()
