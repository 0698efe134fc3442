"""The GPU smoke test (issue 15): on a machine with an NVIDIA GPU, checks and prints, one line per item, what
the CPU test suite can only fake. Run it through bench/gpu_smoke.sh; under five minutes on one GPU.

    bash bench/gpu_smoke.sh [--data DIR] [--rows N] [--out DIR] [--keep]

Each line starts with `ok`, `FAIL` or `info` (a measurement, no pass/fail): bf16 detection vs the compute
capability; fused AdamW on CUDA vs torch's; a 2N-row extraction on CUDA twice and on CPU (finite, GPU rerun
identical, GPU-vs-CPU cosine per row); add-text-layers on the GPU cache; extraction throughput with the default
decode workers vs twice as many; `heads train` on cuda bf16 / cuda fp32 / cpu (time, repeatability);
`heads finetune --unfreeze-text 1` on cuda; `heads ablate` with device cpu vs auto; torchrun with 2 ranks on
gloo/CPU and on CUDA. Exit 0 when nothing failed, 1 otherwise, 2 without a CUDA device.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "mvsa"
NO_GPU = "no CUDA device: this smoke test needs one (torch.cuda.is_available() is False)"
FAILED: list[str] = []


def say(status: str, item: str, detail: str = "") -> None:
    if status == "FAIL":
        FAILED.append(item)
    print(f"{status:<5} {item}: {detail}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="bench/gpu_smoke.sh")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MVSA-layout dataset (default %(default)s)")
    ap.add_argument("--rows", type=int, default=150, help="rows per label file (--limit): 2x this are extracted")
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args(argv)
    if a.rows < 8:
        ap.error("--rows must be at least 8")
    return a


def cli(*args, env=None, check=True) -> tuple[float, subprocess.CompletedProcess]:
    """`python -m cli ARGS` from the repo; (seconds, result)."""
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "cli", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    if check and res.returncode:
        raise RuntimeError(f"`{' '.join(map(str, args))}` exited {res.returncode}:\n{res.stdout[-2000:]}"
                           f"{res.stderr[-2000:]}")
    return time.perf_counter() - t, res


def check_bf16() -> None:
    import torch
    from heads.train.runtime import native_bf16
    cap = torch.cuda.get_device_capability(0)
    native, emulated = native_bf16(torch.device("cuda")), torch.cuda.is_bf16_supported()
    detail = (f"{torch.cuda.get_device_name(0)}, capability {cap[0]}.{cap[1]}: native_bf16 {native}, "
              f"torch.cuda.is_bf16_supported {emulated}")
    say("ok" if native == (cap >= (8, 0)) else "FAIL", "bf16 detection", detail)


def check_fused_adamw() -> None:
    import torch
    from heads.train.optim import AdamW
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(64, 32, device="cuda")), torch.nn.Parameter(torch.randn(32, device="cuda"))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = AdamW([{"params": a, "weight_decay": 0.01}], lr=1e-3)
    ref = torch.optim.AdamW([{"params": b, "weight_decay": 0.01}], lr=1e-3, fused=True)
    for _ in range(5):
        for p, q in zip(a, b):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
    same = all(torch.equal(p, q) for p, q in zip(a, b))
    say("ok" if ours.fused and same else "FAIL", "fused AdamW on CUDA",
        f"our fused path {ours.fused}, equal to torch.optim.AdamW(fused=True) after 5 steps: {same}")


def _arrays(path) -> dict:
    import h5py
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[:]) if isinstance(v, h5py.Dataset) and
                     v.dtype.kind == "f" else None)
        meta = json.loads(f.attrs["meta"])
        mask = f["text/mask"][:]
    return {"arrays": out, "meta": meta, "mask": mask}


def _cosines(a, b):
    import numpy as np
    a, b = a.reshape(a.shape[0], -1).astype(np.float64), b.reshape(b.shape[0], -1).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.where(den > 0, den, 1)


def check_extraction(a, work: Path) -> None:
    import numpy as np
    opts = ["--data", a.data, "--limit", a.rows, "--no-progress"]
    caches = {}
    for name, device in (("gpu1", "cuda"), ("gpu2", "cuda"), ("cpu", "cpu")):
        secs, _ = cli("featcache", "extract", *opts, "--device", device, "--out", work / f"{name}.h5")
        caches[name] = _arrays(work / f"{name}.h5")
        say("info", f"extract on {device} ({name})", f"{secs:.1f}s including model load")
    finite = {n: all(np.isfinite(v).all() for v in c["arrays"].values()) for n, c in caches.items()}
    say("ok" if all(finite.values()) else "FAIL", "extraction arrays finite", str(finite))
    g1, g2, cpu = (caches[n]["arrays"] for n in ("gpu1", "gpu2", "cpu"))
    differ = [k for k in g1 if not np.array_equal(g1[k], g2[k])]
    say("ok" if not differ else "FAIL", "GPU rerun identical", f"differing arrays: {differ or 'none'}")
    prec = [caches[n]["meta"]["preprocessing"].get("precision", "fp32") for n in ("gpu1", "cpu")]
    keys = caches["gpu1"]["meta"]["key"] != caches["cpu"]["meta"]["key"]
    say("ok" if prec == ["fp16", "fp32"] and keys else "FAIL", "precision recorded and keyed",
        f"gpu {prec[0]}, cpu {prec[1]}, keys differ: {keys}")
    mask = caches["cpu"]["mask"][:, :, None]  # text positions past a row's length are padding: never read
    for k in ("text/pooled", "image/pooled", "text/tokens", "image/tokens"):
        c = _cosines(g1[k] * mask, cpu[k] * mask) if k == "text/tokens" else _cosines(g1[k], cpu[k])
        say("ok" if c.min() > 0.99 else "FAIL", f"GPU vs CPU cosine per row, {k}",
            f"min {c.min():.5f}, median {np.median(c):.5f} over {len(c)} rows")


def check_add_text_layers(gpu_cache: Path, work: Path) -> None:
    path = work / "gpu_layers.h5"
    shutil.copyfile(gpu_cache, path)
    secs, res = cli("featcache", "add-text-layers", path, "--layers", "2", "--device", "cuda", check=False)
    ok = res.returncode == 0
    say("ok" if ok else "FAIL", "add-text-layers on the GPU cache",
        f"{secs:.1f}s" if ok else " ".join((res.stdout + res.stderr).split())[-600:])


def check_throughput(a, work: Path) -> None:
    from featcache.env import cpu_threads
    from featcache.extract.decode import auto_workers
    import torch
    default = auto_workers(-1, torch.device("cuda"))
    for workers in (default, max(2, 2 * default)):
        cli("featcache", "extract", "--data", a.data, "--limit", a.rows, "--no-progress", "--device", "cuda",
            "--workers", workers, "--force", "--out", work / "tp.h5")
        t = _arrays(work / "tp.h5")["meta"]["timings"]
        rate = t["samples"] / max(t["total_s"] - t["load_models_s"], 1e-9)
        say("info", f"extraction throughput, {workers} workers" + (" (default)" if workers == default else ""),
            f"{rate:.1f} samples/s ({cpu_threads()} CPUs allowed; waiting on decode {t['read_wait_s']}s, "
            f"model {t['model_s']}s)")


def _train(cache, out, *args) -> tuple[float, dict, bytes]:
    cli("heads", "train", "--cache", cache, "--out", out, "--no-plots", "--seed", "0", *args)
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics["timing"]["train_s"], metrics, (out / "head.safetensors").read_bytes()


def check_heads(cache: Path, work: Path) -> None:
    import torch
    from heads.train.runtime import native_bf16
    setups = [("cuda fp32", ["--device", "cuda", "--precision", "fp32"]), ("cpu", ["--device", "cpu"])]
    if native_bf16(torch.device("cuda")):
        setups.insert(0, ("cuda bf16", ["--device", "cuda", "--precision", "bf16"]))
    for name, args in setups:
        runs = [_train(cache, work / f"train-{name.replace(' ', '-')}-{k}", *args) for k in range(2)]
        same = runs[0][2] == runs[1][2]
        f1 = [round(r[1]["macro_f1"], 4) for r in runs]
        say("ok" if same or name != "cpu" else "FAIL", f"heads train {name}",
            f"train {runs[0][0]:.2f}s / {runs[1][0]:.2f}s, macro-F1 {f1}, weights repeat bit for bit: {same}")
    secs, res = cli("heads", "finetune", "--cache", cache, "--unfreeze-text", "1", "--device", "cuda", "--epochs",
                    "2", "--no-plots", "--out", work / "ft", check=False)
    say("ok" if res.returncode == 0 else "FAIL", "heads finetune --unfreeze-text 1 on cuda",
        f"{secs:.1f}s" if res.returncode == 0 else " ".join((res.stdout + res.stderr).split())[-600:])
    for device in ("cpu", "auto"):
        secs, _ = cli("heads", "ablate", "--cache", cache, "--fusion", "concat,film", "--seeds", "0,1",
                      "--set", f"device={device}", "--no-progress", "--out", work / f"ablate-{device}")
        say("info", f"heads ablate device={device}", f"{secs:.1f}s for 4 runs (auto on a GPU box: serial on it)")


def check_torchrun(a, work: Path) -> None:
    for device in ("cpu", "cuda"):
        out = work / f"tr-{device}.h5"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "cli",
               "featcache", "extract", "--data", str(a.data), "--limit", "16", "--no-progress", "--device",
               device, "--out", str(out)]
        t = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        env.pop("WORLD_SIZE", None)
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        ok = res.returncode == 0 and (work / f"tr-{device}.manifest.json").exists()
        say("ok" if ok else "FAIL", f"torchrun 2 ranks, --device {device}",
            f"{time.perf_counter() - t:.1f}s, manifest written" if ok else
            " ".join((res.stdout + res.stderr).split())[-800:])


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    if not (a.data / "train.txt").exists():
        print(f"--data {a.data}: no train.txt there; give an MVSA-layout dataset folder", file=sys.stderr)
        return 2
    work = a.out or Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"GPU smoke test in {work}: torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    layers = work / "gpu_layers.h5"  # the GPU cache with stored states (add-text-layers): finetune's input
    steps = [("bf16", check_bf16), ("fused AdamW", check_fused_adamw),
             ("extraction", lambda: check_extraction(a, work)),
             ("add-text-layers", lambda: check_add_text_layers(work / "gpu1.h5", work)),
             ("heads", lambda: check_heads(layers if layers.exists() else work / "gpu1.h5", work)),
             ("throughput", lambda: check_throughput(a, work)), ("torchrun", lambda: check_torchrun(a, work))]
    for name, step in steps:
        try:
            step()
        except Exception as exc:  # one broken step must not hide the others' lines
            say("FAIL", name, " ".join(str(exc).split())[-800:])
    print(f"{'FAILED: ' + ', '.join(FAILED) if FAILED else 'all checks passed'} "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    if not a.keep and a.out is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
