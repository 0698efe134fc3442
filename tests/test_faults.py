"""Faults of the machine and of the files around a run end in one paragraph (exit 2, no traceback) that names
the file, and lose nothing already done: damaged run directories, unwritable output folders, a disk that fails
while a cache is written, SIGINT / SIGTERM during extraction and ablation (issue 19)."""
from __future__ import annotations

import os
import shutil

import pytest
from typer.testing import CliRunner

import cli

FAST = ["--epochs", "1", "--hidden", "8", "--no-plots", "--device", "cpu"]


def _run(app, args):
    r = CliRunner().invoke(app, args)
    return r.exit_code, " ".join(r.output.split())  # rich wraps long paths: compare on one line


def _one_paragraph(code, out, *names, exit_code=2):
    assert code == exit_code, out
    assert "Traceback" not in out and "This is a bug" not in out, out
    for name in names:
        assert name in out, (name, out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A cache and a finished one-epoch run on it (shared: each test damages its own copy)."""
    from tests.conftest import build_synthetic_cache
    base = tmp_path_factory.mktemp("faults")
    cache = build_synthetic_cache(str(base / "cache.h5"), n_train=60, n_test=10)
    run = str(base / "run")
    code, out = _run(cli.heads_app, ["train", "--cache", cache, "--out", run, "--fusion", "concat", *FAST])
    assert code == 0, out
    return cache, run


def _copy(run, tmp_path) -> str:
    dst = str(tmp_path / "damaged")
    shutil.copytree(run, dst)
    return dst


def _truncate(path, keep=None):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2 if keep is None else keep])


# ------------------------------------------------------------------------------------------ damaged runs
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_weights_are_named_by_predict_and_finetune(trained, tmp_path, damage):
    cache, run = trained
    run = _copy(run, tmp_path)
    head = os.path.join(run, "head.safetensors")
    if damage == "garbage":
        open(head, "wb").write(os.urandom(300))
    else:
        _truncate(head, keep=0 if damage == "empty" else None)
    out = str(tmp_path / "p.csv")
    code, text = _run(cli.heads_app, ["predict", "--run", run, "--cache", cache, "--out", out])
    _one_paragraph(code, text, "head.safetensors is truncated or not a safetensors file")
    assert not os.path.exists(out)
    code, text = _run(cli.heads_app, ["finetune", "--cache", cache, "--unfreeze-text", "0", "--init", run,
                                      "--out", str(tmp_path / "ft"), "--epochs", "1", "--no-plots"])
    _one_paragraph(code, text, "head.safetensors is truncated or not a safetensors file")


def test_weights_of_another_head_are_named(trained, tmp_path):
    from safetensors.torch import save_file
    import torch
    cache, run = trained
    run = _copy(run, tmp_path)
    save_file({"w": torch.zeros(3)}, os.path.join(run, "head.safetensors"))
    code, text = _run(cli.heads_app, ["predict", "--run", run, "--cache", cache, "--out", str(tmp_path / "p.csv")])
    _one_paragraph(code, text, "head.safetensors does not hold the head config.json describes")


@pytest.mark.parametrize("name", ["config.json", "cache.json", "split.json", "metrics.json"])
def test_broken_json_is_named_with_its_line(trained, tmp_path, name):
    cache, run = trained
    run = _copy(run, tmp_path)
    path = os.path.join(run, name)
    text = open(path).read()
    open(path, "w").write('{"format": 2, "stage": "tr\x01ain"' if name == "config.json" else text[:len(text) // 2])
    code, out = _run(cli.heads_app, ["predict", "--run", run, "--cache", cache, "--out", str(tmp_path / "p.csv")])
    if name != "metrics.json":  # predict does not read metrics.json
        _one_paragraph(code, out, f"{name} line ")
    code, out = _run(cli.heads_app, ["report", run, "--out", str(tmp_path / "rep")])
    if name in ("config.json", "metrics.json"):  # what the report reads of every run
        _one_paragraph(code, out, f"{name} line ")
    if name == "metrics.json":
        _one_paragraph(*_run(cli.heads_app, ["show", run]), "metrics.json line ")
    code, out = _run(cli.heads_app, ["ensemble", run, trained[1], "--out", str(tmp_path / "ens")])
    _one_paragraph(code, out, f"{name} line ")
    assert os.path.exists(os.path.join(trained[1], "metrics.json"))  # the healthy member is untouched


def test_a_config_of_the_wrong_shape_is_named(trained, tmp_path):
    cache, run = trained
    run = _copy(run, tmp_path)
    open(os.path.join(run, "config.json"), "w").write('{"format": 2, "stage": "train"}')
    code, out = _run(cli.heads_app, ["predict", "--run", run, "--cache", cache, "--out", str(tmp_path / "p.csv")])
    _one_paragraph(code, out, "config.json is not a run's config.json")


def test_a_cut_predictions_file_is_named(trained, tmp_path):
    _, run = trained
    run = _copy(run, tmp_path)
    path = os.path.join(run, "val_predictions.csv")
    lines = open(path).read().splitlines()
    open(path, "w").write("\n".join(lines[:3] + [lines[3].split(",")[0]]) + "\n")
    code, out = _run(cli.heads_app, ["ensemble", run, trained[1], "--out", str(tmp_path / "ens")])
    _one_paragraph(code, out, "val_predictions.csv line 4 has fewer cells")


# ------------------------------------------------------------------------------------------ unwritable output
def _mount_tmpfs(folder, options: str) -> bool:
    """Mount a tmpfs with `options` on `folder` where this process may (root, mount available): a real full
    or read-only disk. False elsewhere: the tests then inject the same fault at the boundary."""
    import subprocess
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def _umount(folder):
    import subprocess
    subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def readonly_dir(tmp_path, monkeypatch):
    """A read-only folder: a real read-only tmpfs where one can be mounted, else a folder whose write probe
    fails with EROFS (the boundary featcache.outdir checks; root ignores chmod)."""
    import errno
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = _mount_tmpfs(folder, "size=1m,ro")
    if not mounted:
        import featcache.outdir

        def refuse(*a, **k):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))
        monkeypatch.setattr(featcache.outdir.tempfile, "mkstemp", refuse)
    yield str(folder)
    if mounted:
        _umount(folder)


def test_heads_commands_name_an_unwritable_folder_before_training(trained, readonly_dir, tmp_path):
    cache, run = trained
    before = sorted(os.listdir(run))
    for args in (["train", "--cache", cache, "--out", f"{readonly_dir}/new/run", *FAST],
                 ["finetune", "--cache", cache, "--unfreeze-text", "0", "--init", run, "--out",
                  f"{readonly_dir}/ft", "--epochs", "1", "--no-plots"],
                 ["ablate", "--cache", cache, "--out", f"{readonly_dir}/abl", "--fusion", "concat"],
                 ["ensemble", run, run, "--out", f"{readonly_dir}/ens"],
                 ["report", run, "--out", f"{readonly_dir}/rep"],
                 ["predict", "--run", run, "--cache", cache, "--out", f"{readonly_dir}/p.csv"]):
        code, out = _run(cli.heads_app, args)
        _one_paragraph(code, out, f"the folder {readonly_dir} is not writable", "read-only")
        assert "epoch" not in out, args  # stopped before training
    assert sorted(os.listdir(run)) == before


def test_featcache_commands_name_an_unwritable_folder_before_models_load(trained, readonly_dir, tmp_path,
                                                                        monkeypatch):
    import featcache.extract.engine as fx
    from tests.tiny_models import make_mvsa
    monkeypatch.setattr(fx, "create_text", lambda *a, **k: pytest.fail("a backbone was loaded"))
    data = make_mvsa(str(tmp_path / "mvsa"), n=6)
    code, out = _run(cli.featcache_app, ["extract", "--data", data, "--out", f"{readonly_dir}/c.h5",
                                         "--no-progress"])
    _one_paragraph(code, out, f"the folder {readonly_dir} is not writable")
    cache, _ = trained
    code, out = _run(cli.featcache_app, ["merge", cache, "--out", f"{readonly_dir}/m.h5"])
    _one_paragraph(code, out, f"the folder {readonly_dir} is not writable")


# ------------------------------------------------------------------------------------------ the disk fails
@pytest.fixture(scope="module")
def mvsa(tmp_path_factory):
    from tests.tiny_models import make_mvsa
    return make_mvsa(str(tmp_path_factory.mktemp("mvsa")), n=12, n_test=3)


EXTRACT = ["--batch-size", "4", "--workers", "0", "--no-progress", "--overlap", "off"]


def _done(path) -> list[bool]:
    import h5py
    with h5py.File(path, "r") as f:
        return f["samples/done"][:].tolist()


def test_a_disk_that_fills_while_writing_keeps_the_rows_and_says_resume(mvsa, tmp_path, monkeypatch):
    """ENOSPC injected at the writer's boundary (h5py's dataset write) in the second batch."""
    import errno
    import h5py
    from featcache.cache.store import partial_path
    out = str(tmp_path / "c.h5")
    real = h5py.Dataset.__setitem__

    def full(ds, key, value):
        if ds.name == "/text/tokens" and isinstance(key, slice) and key.start == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(ds, key, value)
    monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
    code, text = _run(cli.featcache_app, ["extract", "--data", mvsa, "--out", out, *EXTRACT])
    _one_paragraph(code, text, f"writing {partial_path(out)} failed: the disk is full", "the rows before 4 are kept",
                   "--resume")
    assert _done(partial_path(out)) == [True] * 4 + [False] * 8  # the first batch is not lost
    assert not os.path.exists(out + ".lock")
    monkeypatch.setattr(h5py.Dataset, "__setitem__", real)
    code, text = _run(cli.featcache_app, ["extract", "--data", mvsa, "--out", out, *EXTRACT, "--resume"])
    assert code == 0 and "resuming" in text and "at row 4" in text, text
    assert _done(out) == [True] * 12


def test_a_disk_full_when_the_file_is_laid_down_leaves_nothing_half_made(mvsa, tmp_path, monkeypatch):
    """The disk fills between the free-space checks and the file's creation: a real 300 KiB tmpfs where one can
    be mounted, else h5py's own error (a ValueError without errno) injected. The file is closed in order (no
    deallocation errors, no segfault: the issue's exit 139), the half-made partial removed, the file named."""
    import featcache.cache.store as fs
    import featcache.extract.size
    import h5py
    folder = tmp_path / "small"
    folder.mkdir()
    out = str(folder / "c.h5")
    monkeypatch.setattr(featcache.extract.size, "planned_bytes", lambda plan: None)  # size unknown up front
    monkeypatch.setattr(fs, "check_room", lambda *a, **k: None)  # and the disk filled after that check
    mounted = _mount_tmpfs(folder, "size=300k")
    if not mounted:
        real = h5py.Group.create_dataset

        def full(group, name, *a, **k):
            if name == "text/tokens":
                raise ValueError("Unable to synchronously create dataset (file write failed: time = now, filename = "
                                 f"'{out}.partial', errno = 28, error message = 'No space left on device')")
            return real(group, name, *a, **k)
        monkeypatch.setattr(h5py.Group, "create_dataset", full)
    try:
        code, text = _run(cli.featcache_app, ["extract", "--data", mvsa, "--out", out, *EXTRACT])
        _one_paragraph(code, text, f"writing {fs.partial_path(out)} failed: the disk is full", "nothing was written")
        assert "Exception ignored" not in text
        assert os.listdir(folder) == []  # no half-made partial, no lock file
    finally:
        if mounted:
            _umount(folder)


def test_a_disk_without_room_for_the_exact_shapes_is_said_before_writing(mvsa, tmp_path, monkeypatch):
    """A backbone whose widths no config file gives (featcache.extract.size cannot plan it): the writer checks
    the exact array shapes against the free space before laying the file down."""
    import collections
    import featcache.extract.size
    import featcache.outdir
    out = str(tmp_path / "c.h5")
    monkeypatch.setattr(featcache.extract.size, "planned_bytes", lambda plan: None)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(featcache.outdir.shutil, "disk_usage", lambda p: usage(10 ** 6, 10 ** 6 - 300_000, 300_000))
    code, text = _run(cli.featcache_app, ["extract", "--data", mvsa, "--out", out, *EXTRACT])
    _one_paragraph(code, text, "c.h5.partial needs about 1.0 MiB but", "has 293.0 KiB free")
    assert os.listdir(tmp_path) == []


def test_an_unknown_os_error_while_writing_stays_a_bug(mvsa, tmp_path, monkeypatch):
    import errno
    import h5py
    real = h5py.Dataset.__setitem__

    def odd(ds, key, value):
        if ds.name == "/text/tokens":
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        real(ds, key, value)
    monkeypatch.setattr(h5py.Dataset, "__setitem__", odd)
    code, text = _run(cli.featcache_app, ["extract", "--data", mvsa, "--out", str(tmp_path / "c.h5"), *EXTRACT])
    assert code == 1 and "Traceback" in text and "This is a bug" in text, text


# ------------------------------------------------------------------------------------------ signals
CHILD = os.path.join(os.path.dirname(__file__), "fault_child.py")


def _child(point: str, arg, app: str, args: list[str]):
    import subprocess
    import sys
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, CHILD, point, str(arg), app, *args], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in p.stdout:
        if line.strip() == "paused":
            return p
    p.wait()
    raise AssertionError(f"the child ended (exit {p.returncode}) before pausing")


def _signal(p, sig) -> tuple[int, str]:
    p.send_signal(sig)
    out, _ = p.communicate(timeout=60)
    return p.returncode, " ".join(out.split())


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_during_extraction_says_what_is_kept_and_how_to_resume(mvsa, tmp_path, sig, code):
    import shlex
    import signal
    from featcache.cache.store import partial_path
    out = str(tmp_path / "c.h5")
    args = ["extract", "--data", mvsa, "--out", out, *EXTRACT]
    got, text = _signal(_child("extract-batch", 2, "featcache", args), getattr(signal, sig))
    _one_paragraph(got, text, f"interrupted ({sig})", f"the first 8 of 12 rows are kept in {partial_path(out)}",
                   "continue with: featcache " + shlex.join(args + ["--resume"]), exit_code=code)
    assert _done(partial_path(out)) == [True] * 8 + [False] * 4 and not os.path.exists(out + ".lock")
    if sig == "SIGINT":  # the command it printed continues it (SIGTERM leaves the same file: checked above)
        code, text = _run(cli.featcache_app, args + ["--resume"])
        assert code == 0 and "at row 8" in text and _done(out) == [True] * 12, text


def test_a_signal_while_models_load_keeps_nothing_and_leaves_nothing(mvsa, tmp_path):
    """Before the cache file exists there is nothing to resume: the message says so, no .partial or .lock stays
    behind, and the same command (without --resume) then extracts."""
    import signal
    from featcache.cache.store import partial_path
    out = str(tmp_path / "c.h5")
    args = ["extract", "--data", mvsa, "--out", out, *EXTRACT]
    got, text = _signal(_child("extract-models", "-", "featcache", args), signal.SIGINT)
    _one_paragraph(got, text, "interrupted (SIGINT)", "nothing was kept", exit_code=130)
    assert "--resume" not in text
    assert not any(os.path.exists(p) for p in (out, partial_path(out), out + ".lock")), os.listdir(tmp_path)
    code, text = _run(cli.featcache_app, args)
    assert code == 0 and _done(out) == [True] * 12, text


def test_sigterm_during_an_ablation_keeps_finished_runs_and_says_rerun(trained, tmp_path):
    import shlex
    import signal
    cache, _ = trained
    out = str(tmp_path / "abl")
    args = ["ablate", "--cache", cache, "--out", out, "--fusion", "concat,gmu", "--modality", "both", "--seeds",
            "0", "--set", "epochs=1", "--set", "hidden=8", "--no-progress"]
    p = _child("ablate-run", "gmu", "heads", args)
    finished = os.path.join(out, "runs", "fusion=concat,modality=both,epochs=1,hidden=8,seed=0", "metrics.json")
    import time
    for _ in range(600):  # the concat run trains meanwhile (before gmu, or beside it in a forked worker)
        if os.path.exists(finished):
            break
        time.sleep(0.1)
    code, text = _signal(p, signal.SIGTERM)
    _one_paragraph(code, text, "interrupted (SIGTERM): 1 finished run(s) are kept",
                   "continue with: heads " + shlex.join(args), exit_code=143)
    code, text = _run(cli.heads_app, args)
    assert code == 0 and "1 run(s) trained, 1 already finished" in text, text


def test_forked_workers_get_the_default_sigterm_back():
    """Pool.terminate() kills workers with SIGTERM: a forked child must not keep the command's Python handler (it
    runs only in the main thread between bytecodes, so a worker blocked in C never died and the pool hung)."""
    import signal

    import cli
    with cli._sigterm_interrupts():
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # the command's own handler
        pid = os.fork()
        if pid == 0:  # the child: exit 0 only if SIGTERM is back to its default
            os._exit(0 if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else 1)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
