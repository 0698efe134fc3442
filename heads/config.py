"""The configs of a run: one dataclass per concept, nested rather than copied (nanoGPT's GPTConfig).

    RunConfig        what both stages share: head (HeadConfig), loss (LossConfig), optim (OptimConfig),
                     split (SplitConfig), seed, device, threads, eval_batch_size, plots
    TrainConfig      stage 1 (`heads train`): RunConfig + rdrop, precision, tune_bias, image_aug_views
    FinetuneConfig   stage 2 (`heads finetune`): RunConfig + text_layers, init, lr_text, text_forward,
                     grad_accum, with stage 2's optimisation defaults
    ProbeConfig      the logistic-regression probe: seed, split, Cs, cv, max_iter

Every leaf field also has a *flat name*, unique within a config: its own name (or its `flat` metadata, e.g.
LossConfig.name is `loss`). Flat names are what users address: CLI options, ablation grid keys
(`--set label_smoothing=0,0.1`, grid.toml), `heads report --group-by lr`, and the run directory's
config.json, which stores the flat view (see heads.rundir). `cfg.flat()` gives the view, `Cls.from_flat(d)`
rebuilds a config from it (missing names keep their defaults: older runs lack newer fields), and
`cfg.with_flat(lr=...)` replaces fields by flat name.
"""
from __future__ import annotations

import os
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace

from featcache.device import check_device_name
from featcache.errors import ConfigError

from .data.splits import SplitConfig
from .data.stream import parse_budget
from .data.text_layers import TEXT_FORWARDS
from .fusions import FUSIONS, HeadConfig
from .train.loop import OptimConfig
from .train.losses import LossConfig

PRECISIONS = ("fp32", "bf16", "auto")


def _leaves(cls) -> list[tuple[str, tuple[str, ...], type]]:
    """(flat name, attribute path, type) of every leaf field of dataclass `cls`, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        kind = hints[f.name]
        if is_dataclass(kind):
            out += [(name, (f.name, *path), t) for name, path, t in _leaves(kind)]
        else:
            out.append((f.metadata.get("flat", f.name), (f.name,), kind))
    names = [name for name, _, _ in out]
    assert len(set(names)) == len(names), f"{cls.__name__}: flat names must be unique: {names}"
    return out


class FlatConfig:
    """Mixin: the flat view of a nested config dataclass (see the module docstring)."""

    @classmethod
    def flat_types(cls) -> dict[str, type]:
        """Flat name -> Python type (what a grid value or a --set string is converted to)."""
        return {name: kind for name, _, kind in _leaves(cls)}

    def flat(self) -> dict:
        out = {}
        for name, path, _ in _leaves(type(self)):
            obj = self
            for part in path:
                obj = getattr(obj, part)
            out[name] = obj
        return out

    def with_flat(self, **values):
        """A copy with the fields of these flat names replaced (nested configs replaced, never mutated)."""
        paths = {name: path for name, path, _ in _leaves(type(self))}
        unknown = [k for k in values if k not in paths]
        if unknown:
            raise ConfigError(f"unknown {type(self).__name__} field(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(paths)}")
        return _replace_paths(self, [(paths[k], v) for k, v in values.items()])

    @classmethod
    def from_flat(cls, values: dict | None = None, **more):
        """`cls` from flat names (a config.json section, or keyword arguments); missing names keep defaults."""
        return cls().with_flat(**{**(values or {}), **more})


def _replace_paths(obj, items: list[tuple[tuple[str, ...], object]]):
    here = {path[0]: value for path, value in items if len(path) == 1}
    deeper: dict[str, list] = {}
    for path, value in items:
        if len(path) > 1:
            deeper.setdefault(path[0], []).append((path[1:], value))
    here.update({name: _replace_paths(getattr(obj, name), sub) for name, sub in deeper.items()})
    return replace(obj, **here) if here else obj


@dataclass
class RunConfig(FlatConfig):
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    seed: int = 0  # the split, the initialisation, dropout, modality dropout and the batch order
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads (0 = all cores)
    eval_batch_size: int = 1024
    plots: bool = True

    def validate(self):
        FUSIONS.get(self.head.fusion)  # raises with the valid names
        self.loss.validate()
        self.optim.validate()
        self.split.validate()
        check_device_name(self.device)
        return self


@dataclass
class TrainConfig(RunConfig):
    """Stage 1: one fusion head on the cached features (heads.train.stage1)."""
    rdrop: float = 0.0  # weight of the R-Drop KL term (0 = off; each step then runs two forward passes)
    # fp32 | bf16 | auto: bf16 autocast for the training steps (evaluation stays fp32); auto = bf16 where the
    # hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32. Measured on the
    # shared cache: bf16 halves the attention heads' projection cost, macro-F1 within seed noise of fp32.
    precision: str = "auto"
    tune_bias: bool = False
    # Caches extracted with --image-views K: each epoch every training sample gets one of its K+1 stored image
    # views (clean or augmented), drawn with the run's seed; evaluation always uses the clean view. No effect
    # on a cache without views (metrics.json records the views actually used).
    image_aug_views: bool = True
    # Bytes of feature arrays read into memory (auto | 0 | 4GB, 512MB, ...; heads.data.stream): a head whose
    # arrays need more streams them from the cache file in shuffled blocks instead. auto = RAM / 8.
    memory_budget: str = "auto"

    def validate(self) -> "TrainConfig":
        super().validate()
        parse_budget(self.memory_budget)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        if self.rdrop < 0:
            raise ConfigError(f"rdrop must be >= 0, got {self.rdrop}")
        return self


@dataclass
class FinetuneConfig(RunConfig):
    """Stage 2: the top `text_layers` text layers trained with a fusion head (heads.train.stage2). With `init`
    the head, loss and split come from that stage-1 run (the config it records says so)."""
    # an --init head is already trained: a lower head learning rate than stage 1's, fewer epochs, small batches
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=5, batch_size=32, lr=2e-4))
    text_layers: int = 1  # the top N text layers that train (CLI: --unfreeze-text); 0 = the head alone
    init: str | None = None  # a stage-1 run directory: head weights, head/loss config and split come from it
    lr_text: float = 5e-5
    text_forward: str = "cached"  # cached: top N on stored states | full: the whole text tower every step
    grad_accum: int = 1  # micro-batches per optimizer step

    def validate(self) -> "FinetuneConfig":
        if self.text_layers < 0:
            raise ConfigError(f"--unfreeze-text must be >= 0, got {self.text_layers}")
        if self.text_forward not in TEXT_FORWARDS:
            raise ConfigError(f"text_forward must be one of {', '.join(TEXT_FORWARDS)}, got {self.text_forward!r}")
        if self.grad_accum < 1:
            raise ConfigError(f"--grad-accum must be >= 1, got {self.grad_accum}")
        if self.optim.lr < 0 or self.lr_text < 0:
            raise ConfigError("learning rates must be >= 0")
        if self.init is not None and not os.path.isdir(self.init):
            raise FileNotFoundError(f"--init {self.init} is not a run directory")
        super().validate()
        return self


@dataclass
class ProbeConfig(FlatConfig):
    """The logistic-regression probe (heads.train.probe) on the split of the head runs it is compared with."""
    seed: int = 0
    split: SplitConfig = field(default_factory=SplitConfig)
    Cs: list = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0])
    cv: int = 5
    max_iter: int = 2000
