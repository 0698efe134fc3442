"""AdamW for the small trainer: torch.optim.AdamW(fused=True)'s update, called as one fused op per step.

Why not torch.optim: constructing the first torch.optim optimizer imports torch._dynamo (torch/_compile.py
wraps Optimizer methods lazily), about 1.5 s on this machine; a `heads train` process spends ~3 s training a
head, so that import was a third of it. The update itself is the same kernel torch.optim uses
(`torch._fused_adamw_`: decoupled weight decay, bias-corrected moments), so results are identical
(tests/test_train.py compares both, bit for bit). Where that op does not run (torch 2.2/2.3 have it for CUDA only,
older ones not at all; other devices), the same class runs torch.optim.AdamW instead: `fused_supported` calls
the op once on a one-element tensor of each device type and dtype (a capability check, not `hasattr`); the
learning rate is set by the Trainer per step.
"""
from __future__ import annotations

from functools import lru_cache

import torch


def fused_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._fused_adamw_ has a kernel for this device type and dtype here (tried once, on one value)."""
    return hasattr(torch, "_fused_adamw_") and device_type in ("cpu", "cuda") and _fused_runs(device_type, dtype)


@lru_cache(maxsize=None)
def _fused_runs(device_type: str, dtype: torch.dtype) -> bool:
    p = torch.zeros(1, dtype=dtype, device=device_type)
    try:
        torch._fused_adamw_([p], [torch.ones_like(p)], [torch.zeros_like(p)], [torch.zeros_like(p)], [],
                            [torch.ones((), dtype=torch.float32, device=device_type)], lr=1e-3, beta1=0.9,
                            beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
    except (RuntimeError, NotImplementedError):  # "no kernel registered for CPU" on torch 2.2/2.3
        return False
    return True


class AdamW:
    """AdamW over param groups [{"params": [...], "lr": x, "weight_decay": w}, ...]; `set_lr(m)` sets every
    group's lr to its base lr times m (the schedule's multiplier) for the next step."""

    def __init__(self, groups: list[dict], lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.groups = [{"params": [p for p in g["params"]], "lr": g.get("lr", lr), "base_lr": g.get("lr", lr),
                        "weight_decay": g.get("weight_decay", 0.0)} for g in groups]
        self.betas, self.eps = betas, eps
        params = [p for g in self.groups for p in g["params"]]
        self.fused = all(p.is_floating_point() and fused_supported(p.device.type, p.dtype) for p in params)
        self.torch_opt = None
        if not self.fused:
            self.torch_opt = torch.optim.AdamW(self.groups, lr=lr, betas=betas, eps=eps)
            return
        self.state = {id(p): (torch.zeros_like(p, memory_format=torch.preserve_format),
                              torch.zeros_like(p, memory_format=torch.preserve_format),
                              torch.zeros((), dtype=torch.float32, device=p.device)) for p in params}

    @property
    def param_groups(self) -> list[dict]:
        return self.torch_opt.param_groups if self.torch_opt else self.groups

    def set_lr(self, multiplier: float) -> None:
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * multiplier

    def zero_grad(self) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        if self.torch_opt:
            self.torch_opt.step()
            return
        for g in self.groups:
            live = [p for p in g["params"] if p.grad is not None]
            if not live:
                continue
            for device_params in _by_device_dtype(live):
                m, v, steps = zip(*(self.state[id(p)] for p in device_params))
                torch._foreach_add_(list(steps), 1)
                torch._fused_adamw_(device_params, [p.grad for p in device_params], list(m), list(v), [],
                                    list(steps), lr=g["lr"], beta1=self.betas[0], beta2=self.betas[1],
                                    weight_decay=g["weight_decay"], eps=self.eps, amsgrad=False, maximize=False)


def _by_device_dtype(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The fused op takes tensors of one device and dtype per call (as torch.optim groups them)."""
    out: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        out.setdefault((p.device, p.dtype), []).append(p)
    return list(out.values())
