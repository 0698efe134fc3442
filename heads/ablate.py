"""`heads ablate`: a grid of training configs run in ONE process from a cache loaded ONCE.

    cfg = AblateConfig(cache="cache/mvsa.h5", out="ablations/a", grid={"fusion": ["concat", "film"]})
    result = ablate(cfg)          # trains every missing run, then writes the summaries (heads.report.build)

A grid maps TrainConfig fields, by their flat names (heads.config: fusion, lr, ...), to lists of values; the
runs are the cartesian product (grid order, then seeds), each a TrainConfig built with `with_flat`
(dataclasses.replace underneath): configs are data, never command strings. Each run has its own directory
named after its grid values (`runs/fusion=film,modality=both,seed=0`); a re-run skips the finished ones
(metrics.json present, config.json equal, trained on a cache of the same key): an interrupted ablation resumes
where it stopped.

Axes come from the command line (`--fusion a,b`, `--set key=v1,v2` for any field, values parsed to the
field's type) or a TOML file (keys = flat TrainConfig names, values = lists; a scalar is a one-value axis).
Without any axis the default grid is every fusion x {both, text, image}; `seeds` is the seed axis unless
the grid has its own `seed` key.

`folds=K` (`--folds K`) makes each grid point a cross-fit run, the very code of `heads train --folds K`
(heads.train.crossfit): K fold heads in one run directory (`...,seed=0,folds=5`), scored on the out-of-fold
predictions of every labelled row; the paired comparison pairs two configurations' OOF predictions of the
same seed (same folds), and the probe (--probe) is cross-fitted on the same folds.

Several caches (`cache="a.h5,b.h5"`: other backbones, --clean-text) are one more axis, the first (run names
start with `cache=<file stem>`); loaded once, they must hold the same dataset (guids, order, labels), and a
sample invalid in any is left out of all, so every cache is trained and validated on the same split.

The runs of one call train side by side (heads.parallel: forked workers sharing the loaded cache). `shard="I/N"`
(a SLURM array task, a torchrun rank: heads.shard) trains slice I of N of the grid into a shared `out`.
"""
from __future__ import annotations

import itertools
import os
import tomllib
from dataclasses import dataclass, field

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from featcache.errors import ConfigError

from .config import TrainConfig
from .data.cache import DataError
from .data.stream import load_data
from .data.split_file import read_split_file
from .fusions import get_fusion, list_fusions
from .parallel import count_workers, run_all
from .report.plan import check_plan, missing_runs, record_plan
from .report.build import write_reports
from .report.compare import parse_baseline
from .rundir import is_finished
from .shard import grid_plan, resolve_shard, slice_of
from .train import crossfit, stage1
from .train.metrics import check_metric_classes
from .train.probe import probe_done, probe_specs, run_probe

DEFAULT_SEEDS = [0, 1, 2]
# Managed by the ablation itself (--folds), so they cannot be grid axes.
RESERVED = ("folds", "fold")
# What every ablation run uses unless the grid says otherwise (recorded in each run's config.json): the
# `heads train` defaults, minus per-run PNGs (the ablation draws one comparison plot for the whole grid).
ABLATION_BASE = {"plots": False}  # per-run plots cost ~0.5 s each; comparison.png covers the grid


def default_grid() -> dict[str, list]:
    return {"fusion": list_fusions(), "modality": ["both", "text", "image"]}


@dataclass
class AblateConfig:
    cache: str  # one cache, or several separated by commas (then the cache is a grid axis)
    out: str
    grid: dict = field(default_factory=dict)  # TrainConfig field -> list of values; {} = default_grid()
    seeds: list = field(default_factory=lambda: list(DEFAULT_SEEDS))
    base: dict = field(default_factory=lambda: dict(ABLATION_BASE))  # overrides applied to every run
    folds: int = 0  # 0: one val_ratio split per seed; K >= 2: one cross-fit run (K folds) per config and seed
    baseline: str = "concat"  # paired comparison against: a fusion, or KEY=VALUE of any axis (cache=raw-none)
    probe: bool = False  # add a logistic-regression probe per seed (configuration "logreg-probe")
    progress: bool = True
    n_boot: int = 2000  # bootstrap resamples of the paired comparison
    # Runs in parallel, one CPU thread each (0 = one worker per core; 1 = one run at a time with every
    # thread). Small heads use 2 threads poorly: on 2 cores, two 1-thread runs side by side finish ~1.4x
    # sooner than the same runs one after another with 2 threads each. Runs on CUDA are never parallel.
    workers: int = 0
    # "I/N": train only slice I (zero-based) of N of the grid (heads.shard); "auto": I/N from torchrun's
    # RANK/WORLD_SIZE or a SLURM job array's task id and count; "": the whole grid.
    shard: str = ""

    def caches(self) -> dict[str, str]:
        """label (file stem) -> path, in the order given."""
        paths = [p.strip() for p in self.cache.split(",") if p.strip()]
        labels = [os.path.splitext(os.path.basename(p))[0] for p in paths]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"--cache: the caches' file names must differ (they name the runs): {paths}")
        return dict(zip(labels, paths))

    def validate(self) -> "AblateConfig":
        if not self.caches():
            raise ConfigError("--cache: no cache file given")
        self.grid = {k: check_axis(k, v) for k, v in self.grid.items()}
        for k, v in self.base.items():
            check_axis(k, [v])
        if self.folds == 1 or self.folds < 0:
            raise ConfigError(f"--folds must be 0 (one split) or at least 2, got {self.folds}")
        if not self.seeds:
            raise ConfigError("at least one seed is needed")
        self.shard = resolve_shard(self.shard)  # auto becomes the I/N it read, recorded as such
        key, value = parse_baseline(self.baseline)
        if key == "fusion":
            get_fusion(value)  # raises with the valid names
        elif key != "cache" and key not in self.grid:
            raise ConfigError(f"--baseline {self.baseline}: {key!r} is not an axis of this ablation; axes: "
                             f"{', '.join(['fusion', 'cache', *self.grid])}")
        return self


@dataclass
class RunSpec:
    name: str  # directory name under <out>/runs
    train: TrainConfig
    cache: str = ""  # the cache path this run trains on


# ------------------------------------------------------------------------------------------ grid parsing
def train_fields() -> dict[str, type]:
    """Flat TrainConfig name -> its Python type (what grid values and --set strings become)."""
    return TrainConfig.flat_types()


def _unknown(key: str) -> ConfigError:
    valid = [k for k in train_fields() if k not in RESERVED]
    return ConfigError(f"unknown grid axis {key!r}: not a TrainConfig field; valid: {', '.join(valid)}")


def parse_value(key: str, text: str):
    """One command-line value converted to the type of TrainConfig field `key`."""
    kinds = train_fields()
    if key not in kinds or key in RESERVED:
        raise _unknown(key)
    kind, text = kinds[key], text.strip()
    if kind is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: {text!r} is not a boolean (true/false)")
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not a valid {kind.__name__}") from None


def parse_axis(spec: str) -> tuple[str, list]:
    """`key=v1,v2,...` (the --set option) -> (key, [typed values])."""
    key, sep, values = spec.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not values.strip():
        raise ConfigError(f"--set expects key=value[,value...], got {spec!r}")
    return key, [parse_value(key, v) for v in values.split(",")]


def check_axis(key: str, values) -> list:
    """Validate values given as data (TOML, Python): the right type for the field, ints accepted for floats."""
    kinds = train_fields()
    if key not in kinds or key in RESERVED:
        raise _unknown(key)
    values = values if isinstance(values, list) else [values]
    if not values:
        raise ConfigError(f"grid axis {key!r} has no values")
    kind, out = kinds[key], []
    for v in values:
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if type(v) is not kind:
            raise ConfigError(f"{key}: {v!r} is a {type(v).__name__}, expected {kind.__name__}")
        out.append(v)
    if len(set(out)) != len(out):
        raise ConfigError(f"grid axis {key!r} repeats a value: {out}")
    return out


def load_grid_toml(path: str) -> dict[str, list]:
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not a valid TOML grid file: {exc}") from None
    return {k.replace("-", "_"): check_axis(k.replace("-", "_"), v) for k, v in raw.items()}


def grid_from_options(grid_file: str | None, axes: dict[str, str], sets: list[str]) -> dict[str, list]:
    """The grid the `heads ablate` options describe: a TOML file, or axis options (--fusion a,b) and --set."""
    axes = {k: v for k, v in axes.items() if v}
    if grid_file and (axes or sets):
        raise ConfigError("give the grid either as --grid FILE.toml or as axis options, not both")
    spec = load_grid_toml(grid_file) if grid_file else dict(parse_axis(f"{k}={v}") for k, v in axes.items())
    for item in sets:
        key, values = parse_axis(item)
        if key in spec:
            raise ConfigError(f"grid axis {key!r} is given twice")
        spec[key] = values
    return spec


def parse_seeds(text: str) -> list[int]:
    """--seeds 0,1,2 -> [0, 1, 2]."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds expects a comma list of integers, got {text!r}") from None


# ------------------------------------------------------------------------------------------ expansion
def _fmt(v) -> str:
    return str(v).replace(os.sep, "_").replace(" ", "_")


def expand(cfg: AblateConfig) -> list[RunSpec]:
    """Every run of the ablation, in a fixed order (grid axes, then seed)."""
    grid = dict(cfg.grid or default_grid())
    grid.setdefault("seed", list(cfg.seeds))
    base = TrainConfig.from_flat(cfg.base)
    caches = cfg.caches()
    runs = []
    for label, path in caches.items():
        prefix = f"cache={_fmt(label)}," if len(caches) > 1 else ""
        for values in itertools.product(*grid.values()):
            point = dict(zip(grid, values))
            name = prefix + ",".join(f"{k}={_fmt(v)}" for k, v in point.items())
            if not cfg.folds:
                runs.append(RunSpec(name, base.with_flat(**point), path))
            else:  # one cross-fit run, exactly `heads train --folds K` (train_unit): its OOF predictions are scored
                runs.append(RunSpec(f"{name},folds={cfg.folds}", base.with_flat(**point, folds=cfg.folds), path))
    names = [r.name for r in runs]
    assert len(set(names)) == len(names), "run names must be unique"  # holds: grid values are unique
    return runs


def is_done(run_dir: str, train_cfg: TrainConfig, cache_key: str | None) -> bool:
    """Finished with this config on a cache of these features (rundir.is_finished: by key, not path, so the same
    --out with another cache trains anew while a node-local copy of the same cache resumes)."""
    return is_finished(run_dir, "train", train_cfg.flat(), cache_key, lambda saved: TrainConfig.from_flat(saved).flat())


def load_caches(paths: list[str], budget: str = "auto") -> dict:
    """path -> CacheData (StreamData over `budget`), all of one dataset, with validity intersected so that
    splits agree across caches."""
    datas = {p: load_data(p, budget=budget) for p in paths}
    first_path, first = next(iter(datas.items()))
    valid = first.valid.copy()
    for p, d in datas.items():
        if d.guids != first.guids or not np.array_equal(d.labels, first.labels):
            raise DataError(f"{p} and {first_path} do not hold the same dataset (guids, order or labels "
                            "differ); caches compared in one ablation must come from the same data")
        valid &= d.valid
    for d in datas.values():
        d.valid = valid.copy()
    return datas


# ------------------------------------------------------------------------------------------ running
@dataclass
class AblateResult:
    out: str
    run_dirs: list[str]  # this call's runs (with --shard: its slice's)
    trained: int
    skipped: int
    report: object = None  # heads.report.build.Report; None: a slice that ended with runs of the grid missing
    workers: int = 1  # runs that were trained at a time
    missing: list[str] = field(default_factory=list)  # runs of the grid not finished when a slice ended
    planned: int = 0  # runs in the whole grid (out/ablate.json)


def ablate(cfg: AblateConfig, console=None) -> AblateResult:
    """Train every run of the grid (of its slice: cfg.shard) not already finished, then write the summaries (a slice:
    once the whole grid is). Raises ValueError/CacheError for user mistakes before any training."""
    cfg.validate()
    grid = expand(cfg)
    for r in grid:
        r.train.validate()  # every unknown name is reported before the first run
    datas = load_caches(list(cfg.caches().values()), cfg.base.get("memory_budget", "auto"))
    for r in grid:  # --metric auroc on a three-class cache: said before the first run
        check_metric_classes(r.train.optim.metric, datas[r.cache].classes, r.cache)
    say = (lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True)) if console else None
    for path, cache in {(r.train.split.split_file, r.cache) for r in grid if r.train.split.split_file}:
        read_split_file(path, datas[cache], say)  # its mismatch report, once per file (runs train silently)
    several = len(datas) > 1
    os.makedirs(os.path.join(cfg.out, "runs"), exist_ok=True)
    specs = probe_specs(grid) if cfg.probe else []
    probes = [(f"cache={_fmt(label)},{name}" if several else name, probe_cfg, path)
              for label, path in cfg.caches().items() for name, probe_cfg in specs]
    plan = record_plan(cfg.out, grid_plan(cfg, grid, [p[0] for p in probes], datas), bool(cfg.shard))
    mine = set(slice_of(plan["runs"], cfg.shard))
    runs, probes = [r for r in grid if r.name in mine], [p for p in probes if p[0] in mine]

    run_dirs, trained, skipped = [], 0, 0
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not cfg.progress, transient=False) as bar:
        task = bar.add_task(f"ablation slice {cfg.shard}" if cfg.shard else "ablation", total=len(mine))
        # From the whole grid, before the resume check: threads is in each run's recorded config, whatever the slice.
        workers = count_workers(cfg.workers, [r.train for r in grid])
        if workers > 1:
            runs = [RunSpec(r.name, r.train.with_flat(threads=1), r.cache) for r in runs]
        todo = []
        for spec in runs:
            run_dir = os.path.join(cfg.out, "runs", spec.name)
            run_dirs.append(run_dir)
            if is_done(run_dir, spec.train, datas[spec.cache].meta.get("key")):
                skipped += 1
                bar.advance(task)
            else:
                todo.append((spec, run_dir))  # rundir.write_run replaces it whole once done
        for name in run_all(todo, datas, workers, train_unit(cfg.folds)):
            trained += 1
            bar.update(task, advance=1, description=name)
        for name, probe_cfg, path in probes:
            run_dir = os.path.join(cfg.out, "runs", name)
            run_dirs.append(run_dir)
            bar.update(task, description=name)
            if probe_done(run_dir, probe_cfg, datas[path].meta.get("key")):
                skipped += 1
            else:
                run_probe(probe_cfg, datas[path], run_dir)
                trained += 1
            bar.advance(task)
    result = AblateResult(cfg.out, run_dirs, trained, skipped, None, workers, planned=len(plan["runs"]))
    if cfg.shard:  # slices share `out`: summaries only of the whole grid, so none overwrites them with fewer runs
        result.missing = missing_runs(cfg.out, check_plan(cfg.out, plan))  # the plan still this slice's?
        if result.missing:
            return result
    # The summaries rank by what the runs selected on when that is ROC-AUC (the binary tasks' metric).
    metric = "roc_auc" if all(r.train.optim.metric == "auroc" for r in grid) else "macro_f1"
    result.report = write_reports([os.path.join(cfg.out, "runs", n) for n in plan["runs"]], cfg.out,
                                  baseline=cfg.baseline, n_boot=cfg.n_boot, metric=metric)
    return result


def train_unit(folds: int):
    """What one run of the grid is: `heads train` (stage1.train), or with --folds K `heads train --folds K`
    (crossfit.train_crossfit: K fold heads, one run directory, metrics on the OOF predictions). Looked up at
    call time: tests replace them."""
    return crossfit.train_crossfit if folds else stage1.train


__all__ = ["AblateConfig", "AblateResult", "RunSpec", "ablate", "check_axis", "default_grid", "expand",
           "is_done", "load_grid_toml", "parse_axis", "parse_value", "train_fields"]
