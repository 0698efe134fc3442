"""Where and how a run computes: its device, threads, precision and seeds (shared by both stages and predict).

resolve_device here is heads' own (auto | cpu | cuda); featcache.device.resolve_device replaces it when the
two packages share one.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available here")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are native (fast) here. Elsewhere autocast emulates them and is slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: do not guess
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def set_threads(threads: int) -> int:
    """torch CPU threads for this run (0 = all cores); returns the number in use."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    return torch.get_num_threads()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
