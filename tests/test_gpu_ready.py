"""What a CUDA machine changes, checked on the CPU (issue 15): the compute precision in the cache key and the
refused mixed resume, the non-finite batch error, add-text-layers under the cache's precision, bf16 from the
compute capability, threads and decode workers from the affinity mask, the heads' device-resident batches.
CUDA itself is faked (monkeypatched device counts and capabilities); bench/gpu_smoke.sh runs the real thing.
"""
from __future__ import annotations

import io
import json

import h5py
import numpy as np
import pytest
import torch
from rich.console import Console

import featcache.device as fdev
import featcache.extract.engine as fx
from featcache.cache.store import CacheError, cache_precision, feature_signature, partial_path
from featcache.errors import ConfigError
from featcache.extract.config import ExtractConfig
from featcache.extract.engine import NonFiniteError, extract
from featcache.extract.text_layers import add_text_layers
from mvsa_fixtures import require_mvsa


def _quiet():
    return Console(file=io.StringIO(), width=1000)


def _fake_cuda(monkeypatch):
    monkeypatch.setattr(fdev, "resolve_device", lambda name: torch.device("cuda" if name != "cpu" else "cpu"))


# ------------------------------------------------------------------------------------------ precision
def test_precision_enters_the_key_only_on_cuda(monkeypatch):
    cpu = ExtractConfig(data="d", device="cpu")
    assert "precision" not in cpu.preprocessing()  # CPU (fp32) keys are what they always were
    assert cache_precision({"preprocessing": cpu.preprocessing()}) == cache_precision({}) == "fp32"
    _fake_cuda(monkeypatch)
    gpu = ExtractConfig(data="d", device="auto")
    assert gpu.precision() == "fp16" and gpu.preprocessing() == {**cpu.preprocessing(), "precision": "fp16"}
    # a head trained on a GPU-made cache applies to a CPU-made one: the same features to fp16 rounding
    assert feature_signature({"preprocessing": gpu.preprocessing()}) == \
        feature_signature({"preprocessing": cpu.preprocessing()})


def test_precision_autocast():
    assert not torch.is_autocast_enabled()
    with fdev.precision_autocast("fp32", torch.device("cpu")):
        assert not torch.is_autocast_enabled()
    with pytest.raises(ConfigError, match="fp16.*--device cuda"):
        fdev.precision_autocast("fp16", torch.device("cpu"))


@pytest.mark.slow
def test_nonfinite_batch_is_an_error_and_a_mixed_precision_resume_is_refused(monkeypatch, tmp_path):
    mvsa = require_mvsa()
    out = tmp_path / "p.h5"
    cfg = ExtractConfig(data=str(mvsa), limit=4, out=str(out), batch_size=4, workers=0, device="cpu")
    real, calls = fx.forward_batch, []

    def poisoned(m, pix, idx, ds, **k):
        arrays, captions = real(m, pix, idx, ds, **k)
        calls.append(idx[0])
        if idx[0] == 4:  # the second batch: row 6's pooled text becomes NaN
            arrays["text/pooled"][2, 5] = np.nan
        return arrays, captions
    monkeypatch.setattr(fx, "forward_batch", poisoned)
    with pytest.raises(NonFiniteError) as err:
        extract(cfg, progress=False, console=_quiet())
    guid = err.value.args[0].split("guid(s) ")[1].split(",")[0]
    with h5py.File(partial_path(str(out)), "r") as f:
        assert f["samples/guid"][6].decode() == guid  # the message names the poisoned row
        assert f["samples/done"][:].tolist() == [True] * 4 + [False] * 4  # the bad batch was not written
    assert "text/pooled" in str(err.value) and "1 row(s) of the batch at row 4" in str(err.value)
    assert "computed in fp32" in str(err.value)

    # the partial file claims fp16 (as a CUDA run would have written it): a CPU resume is refused by name
    with h5py.File(partial_path(str(out)), "r+") as f:
        meta = json.loads(f.attrs["meta"])
        meta["preprocessing"]["precision"] = "fp16"
        f.attrs["meta"] = json.dumps(meta)
    monkeypatch.setattr(fx, "forward_batch", real)
    with pytest.raises(CacheError, match="started in fp16 and this run computes in fp32"):
        extract(cfg, resume=True, progress=False, console=_quiet())


def test_add_text_layers_on_an_fp16_cache_needs_cuda(make_synthetic_cache):
    path = make_synthetic_cache(preprocessing={"clean_text": False, "max_text_len": 12, "precision": "fp16"})
    with h5py.File(path, "r+") as f:
        meta = json.loads(f.attrs["meta"])
        meta["text"] = {"num_layers": 6, "max_len": 12}
        f.attrs["meta"] = json.dumps(meta)
    with pytest.raises(ConfigError, match="computed in fp16"):
        add_text_layers(path, 2, device="cpu", console=_quiet(), progress=False)


# ------------------------------------------------------------------------------------ workers, threads
@pytest.mark.parametrize("cpus,cpu_want,cuda_want", [(1, 0, 1), (2, 0, 1), (8, 4, 7), (64, 4, 16)])
def test_decode_workers_from_the_affinity_mask(monkeypatch, cpus, cpu_want, cuda_want):
    import featcache.extract.decode as dec
    monkeypatch.setattr(dec, "cpu_threads", lambda: cpus)
    assert dec.auto_workers(-1, torch.device("cpu")) == dec.auto_workers(-1) == cpu_want
    assert dec.auto_workers(-1, torch.device("cuda")) == cuda_want  # a GPU waits on decoding: never 0
    assert dec.auto_workers(3, torch.device("cuda")) == 3


def test_auto_batch_size(monkeypatch):
    from featcache.extract.config import auto_batch_size
    assert auto_batch_size(ExtractConfig(data="d", batch_size=0, device="cpu")) == 32
    assert auto_batch_size(ExtractConfig(data="d", batch_size=7, device="cpu")) == 7
    _fake_cuda(monkeypatch)
    assert auto_batch_size(ExtractConfig(data="d", batch_size=0)) == 128


def test_set_threads_uses_the_affinity_mask(monkeypatch):
    import heads.train.runtime as rt
    before = torch.get_num_threads()
    monkeypatch.setattr(rt, "cpu_threads", lambda: 1)
    try:
        assert rt.set_threads(0) == 1
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ heads
@pytest.mark.parametrize("capability,native", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_from_the_compute_capability(monkeypatch, capability, native):
    from heads.train.runtime import native_bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # counts emulation: not asked
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert native_bf16(torch.device("cuda")) is native


def test_fused_adamw_is_a_capability_check(monkeypatch):
    import heads.train.optim as opt
    opt._fused_runs.cache_clear()

    def no_cpu_kernel(*a, **k):  # what torch 2.2/2.3 do on the CPU: the op exists, its CPU kernel does not
        raise NotImplementedError("Could not run 'aten::_fused_adamw_' with arguments from the 'CPU' backend")
    monkeypatch.setattr(torch, "_fused_adamw_", no_cpu_kernel)
    try:
        assert not opt.fused_supported("cpu", torch.float32)
        p = torch.nn.Parameter(torch.ones(3))
        adamw = opt.AdamW([{"params": [p]}], lr=0.1)
        assert not adamw.fused and adamw.torch_opt is not None  # falls back to torch.optim.AdamW
        p.grad = torch.ones(3)
        adamw.step()
        assert (p < 1).all()
    finally:
        opt._fused_runs.cache_clear()


def test_device_resident_batches_equal_host_batches(make_synthetic_cache):
    """CacheData on a device (the CUDA path, run here on the CPU) gathers the same values without host syncs:
    text cut by host-side lengths, views chosen with `where` instead of boolean indexing."""
    from heads.data.cache import FEATURES, load_cache
    host, dev = (load_cache(make_synthetic_cache()) for _ in range(2))
    n, K = len(host), 2
    gen = torch.Generator().manual_seed(0)
    for data in (host, dev):  # the same made-up views on both
        data.views = {"image_tokens": torch.randn(n, K, *host.features["image_tokens"].shape[1:], generator=gen)
                      .half(), "image_pooled": torch.randn(n, K, host.features["image_pooled"].shape[1],
                                                           generator=gen)}
        gen.manual_seed(0)
    dev._move(torch.device("cpu"))
    assert dev.device is not None and dev.lengths.shape == (n,)
    for idx in ([0, 5, 7], [3], list(range(0, n, 3))):
        views = [k % (K + 1) for k in range(len(idx))]
        for v in (None, views):
            a, b = host.batch(idx, "cpu", views=v), dev.batch(idx, "cpu", views=v)
            assert sorted(a) == sorted(b) == sorted(FEATURES)
            for k in a:
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (idx, v, k)


# ------------------------------------------------------------------------------------------ smoke test
def _smoke(*args, **env):
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(["bash", str(root / "bench" / "gpu_smoke.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(root), **env}, timeout=120)


def test_gpu_smoke_help_and_argument_errors():
    res = _smoke("--help")
    assert res.returncode == 0 and "--rows" in res.stdout and "--data" in res.stdout
    res = _smoke("--rows", "3")
    assert res.returncode == 2 and "--rows must be at least 8" in res.stderr


def test_gpu_smoke_without_a_gpu_says_so():
    res = _smoke("--rows", "8", CUDA_VISIBLE_DEVICES="")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "no CUDA device: this smoke test needs one" in res.stderr and "ok" not in res.stdout


def test_device_ordinal_error_is_one_paragraph(monkeypatch, make_synthetic_cache, tmp_path):
    """`--device cuda:5` on a 2-GPU machine: exit 2 and a sentence naming the devices there are, no traceback."""
    from typer.testing import CliRunner

    from cli import heads_app
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    res = CliRunner().invoke(heads_app, ["train", "--cache", make_synthetic_cache(), "--device", "cuda:5",
                                         "--out", str(tmp_path / "r"), "--no-plots"])
    flat = " ".join(res.output.split())
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "--device cuda:5: this machine has 2 CUDA device(s), cuda:0..cuda:1" in flat
