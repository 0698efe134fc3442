"""How a run computes: threads, precision and seeds (shared by both stages and predict). The device comes from
featcache.device.resolve_device, the one rule for every command."""
from __future__ import annotations

import random

import numpy as np
import torch

from featcache.env import cpu_threads


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are native (fast) here. Elsewhere autocast emulates them and is slower than fp32."""
    if device.type == "cuda":
        # Ampere (compute capability 8.0) and newer. Not torch.cuda.is_bf16_supported(): it also says yes
        # where bf16 is only emulated (T4 7.5, V100 7.0), which is slower than fp32 there.
        return torch.cuda.get_device_capability(device) >= (8, 0)
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux: do not guess
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def set_threads(threads: int) -> int:
    """torch CPU threads for this run (0 = every CPU this process may use: the affinity mask, which cgroups,
    SLURM and taskset set, not the machine's count); returns the number in use."""
    torch.set_num_threads(threads or cpu_threads())
    return torch.get_num_threads()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
