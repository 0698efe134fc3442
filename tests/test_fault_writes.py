"""Every write of a run directory, a report or a merged / extended cache is whole or absent (issue 19), in the
style of test_faults.py: a run or a report SIGKILLed while it is written leaves no half directory and no half
file; SIGINT / SIGTERM during `heads train` / `--folds K` / `heads finetune` say that nothing of the run was kept
and the exact command to run again (exit 130 / 143); a rerun replaces a run directory whole (no stale file of the
old run survives); `featcache merge` and `featcache add-text-layers` name an unwritable folder, and a disk that
fails while they write, in one paragraph, losing nothing already done."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess

import pytest

import cli
from featcache.cache.store import partial_path
from featcache.digest import file_sha256
from heads.report.runs import find_run_dirs
from tests.test_faults import CHILD, EXTRACT, FAST, _child, _mount_tmpfs, _one_paragraph, _run, _signal, _umount
from tests.test_faults import trained  # noqa: F401  (the module fixture: a cache and a finished run)


def _hidden(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


def _half_runs(folder) -> list[str]:
    """Visible folders under `folder` with a config.json but no metrics.json: half run directories."""
    return [root for root, dirs, files in os.walk(folder) if not os.path.basename(root).startswith(".")
            and "config.json" in files and "metrics.json" not in files]


# ------------------------------------------------------------------------------------------ run directories
def test_a_rerun_replaces_the_whole_run_directory(trained, tmp_path):
    """A stale bias.json of an earlier --tune-bias run in the same --out used to survive the rerun, and predict
    applied its offsets to the new head."""
    cache, _ = trained
    out = str(tmp_path / "run")
    args = ["train", "--cache", cache, "--out", out, "--fusion", "concat", *FAST]
    assert _run(cli.heads_app, args + ["--tune-bias"])[0] == 0 and os.path.exists(os.path.join(out, "bias.json"))
    code, text = _run(cli.heads_app, args)
    assert code == 0, text
    assert not os.path.exists(os.path.join(out, "bias.json")) and _hidden(tmp_path) == []


def test_a_folder_holding_other_files_is_refused_before_training(trained, tmp_path):
    cache, _ = trained
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, text = _run(cli.heads_app, ["train", "--cache", cache, "--out", str(out), *FAST])
    _one_paragraph(code, text, f"{out} holds notes.txt", "choose another --out")
    assert "epoch" not in text and os.listdir(out) == ["notes.txt"]


def test_a_disk_failing_while_a_run_is_written_keeps_the_earlier_run(trained, tmp_path, monkeypatch):
    """ENOSPC from safetensors' writer (its own exception class, errno only in the text) in a rerun."""
    import heads.rundir
    cache, run = trained
    out = str(tmp_path / "run")
    shutil.copytree(run, out)
    before = {n: file_sha256(os.path.join(out, n)) for n in os.listdir(out)}

    def full(*a, **k):
        from safetensors import SafetensorError
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(heads.rundir, "save_file", full)
    code, text = _run(cli.heads_app, ["train", "--cache", cache, "--out", out, "--seed", "1", *FAST])
    _one_paragraph(code, text, f"writing {out} failed: the disk is full", "an earlier run there is unchanged")
    assert {n: file_sha256(os.path.join(out, n)) for n in os.listdir(out)} == before and _hidden(tmp_path) == []
    monkeypatch.setattr(cli._State, "debug", False)  # --debug sets it for the process: restored after the test
    code, text = _run(cli.heads_app, ["--debug", "train", "--cache", cache, "--out", out, *FAST])
    assert code == 2 and "Traceback" in text and "SafetensorError" in text and "the disk is full" in text, text


def test_debug_shows_where_a_command_was_interrupted(trained, tmp_path, monkeypatch):
    import sys

    import heads.report.build

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    _, run = trained
    args = ["--debug", "report", run, "--out", str(tmp_path / "rep")]
    monkeypatch.setattr(heads.report.build, "write_reports", interrupted)
    monkeypatch.setattr(sys, "argv", ["heads", *args])
    monkeypatch.setattr(cli._State, "debug", False)
    code, text = _run(cli.heads_app, args)
    assert code == 130 and "Traceback" in text and "in interrupted" in text, text
    assert f"interrupted (SIGINT): every summary file in {tmp_path / 'rep'} is whole" in text, text
    assert "run it again with: heads " + shlex.join(args) in text, text


def test_a_run_killed_while_it_is_written_leaves_no_half_directory(trained, tmp_path):
    """SIGKILL (no cleanup runs) when every file but metrics.json is in the hidden folder: the run directory is
    absent, the leftover is hidden from the report, and the next run cleans it."""
    cache, _ = trained
    out = str(tmp_path / "runs" / "run")
    args = ["train", "--cache", cache, "--out", out, "--fusion", "concat", *FAST]
    p = _child("commit", "metrics.json", "heads", args)
    p.kill()
    p.wait()
    left = _hidden(tmp_path / "runs")
    assert not os.path.exists(out) and len(left) == 1 and left[0].startswith(".run.tmp-"), left
    assert "config.json" in os.listdir(tmp_path / "runs" / left[0])  # the worst moment: config, no metrics
    assert _half_runs(tmp_path) == [] and find_run_dirs([str(tmp_path)]) == []
    code, text = _run(cli.heads_app, ["report", str(tmp_path / "runs")])
    _one_paragraph(code, text, "no finished run directories")
    assert _run(cli.heads_app, args)[0] == 0
    assert _hidden(tmp_path / "runs") == [] and find_run_dirs([str(tmp_path)]) == [out]


def test_a_report_killed_while_it_is_written_keeps_whole_files(trained, tmp_path):
    _, run = trained
    runs, rep = tmp_path / "runs", tmp_path / "rep"
    shutil.copytree(run, runs / "a")
    assert _run(cli.heads_app, ["report", str(runs), "--out", str(rep)])[0] == 0
    before = {n: (rep / n).read_bytes() for n in os.listdir(rep)}
    shutil.copytree(run, runs / "b")  # two runs now: the next report's files differ
    p = _child("commit", "summary.md", "heads", ["report", str(runs), "--out", str(rep)])
    p.kill()
    p.wait()
    assert (rep / "summary.md").read_bytes() == before["summary.md"]  # the earlier file, whole
    assert (rep / "summary.csv").read_bytes() != before["summary.csv"]  # written just before: the new one
    assert len((rep / "summary.csv").read_text().splitlines()) == 2  # header + one configuration, whole
    assert [n for n in _hidden(rep) if n.startswith(".summary.md.tmp-")]
    code, text = _run(cli.heads_app, ["report", str(runs), "--out", str(rep)])
    assert code == 0 and _hidden(rep) == [] and (rep / "summary.md").read_bytes() != before["summary.md"], text


@pytest.mark.parametrize("sig, code, kind", [("SIGINT", 130, "train"), ("SIGTERM", 143, "folds"),
                                             ("SIGTERM", 143, "finetune")])
def test_a_signal_during_training_says_nothing_was_kept_and_how_to_rerun(trained, tmp_path, sig, code, kind):
    cache, run = trained
    out = str(tmp_path / "run")
    args = {"train": ["train", "--cache", cache, "--out", out, *FAST],
            "folds": ["train", "--cache", cache, "--out", out, "--folds", "2", *FAST],
            "finetune": ["finetune", "--cache", cache, "--unfreeze-text", "0", "--init", run, "--out", out,
                         "--epochs", "1", "--no-plots"]}[kind]
    earlier = kind == "folds"  # a finished run is already at --out: it must stay as it was
    if earlier:
        shutil.copytree(run, out)
    got, text = _signal(_child("commit", "config.json", "heads", args), getattr(signal, sig))
    _one_paragraph(got, text, f"interrupted ({sig}): nothing of this run was kept: {out} is written only when "
                   "training ends", "run it again with: heads " + shlex.join(args), exit_code=code)
    assert ("(the earlier run there is unchanged)" in text) == earlier, text
    if earlier:
        assert sorted(os.listdir(out)) == sorted(os.listdir(run)) and \
            file_sha256(os.path.join(out, "metrics.json")) == file_sha256(os.path.join(run, "metrics.json"))
    else:
        assert not os.path.exists(out)
    assert _hidden(tmp_path) == []  # the interrupted write removed its hidden folder


def test_ctrl_c_to_the_process_group_while_folds_train_side_by_side(trained, tmp_path):
    """Ctrl-C at a terminal signals every process of the group, the fold workers too: the command alone speaks
    (one paragraph, no worker traceback), exits 130 and leaves no worker behind."""
    import sys
    cache, _ = trained
    out = str(tmp_path / "run")
    args = ["train", "--cache", cache, "--out", out, "--folds", "3", "--epochs", "50", "--patience", "0", *FAST[2:]]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": root}
    p = subprocess.Popen([sys.executable, CHILD, "fold", "1", "heads", *args], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.strip() == "paused":  # fold 1 sleeps in one worker while fold 0 trains in the other
            break
    assert lines and lines[-1].strip() == "paused", "".join(lines)
    os.killpg(p.pid, signal.SIGINT)
    rest, _ = p.communicate(timeout=60)
    text = " ".join(("".join(lines[:-1]) + rest).split())
    _one_paragraph(p.returncode, text, f"interrupted (SIGINT): nothing of this run was kept: {out}",
                   exit_code=130)
    assert "ForkPoolWorker" not in text and not os.path.exists(out)
    with pytest.raises(ProcessLookupError):  # the whole group is gone: no worker left behind
        os.killpg(p.pid, 0)


# ------------------------------------------------------------------------------------------ merge, add-text-layers
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny random RoBERTa + CLIP image tower (fast to load) and a small MVSA folder; the weights folder stays
    set for the module: add-text-layers loads the text backbone again."""
    import tiny_models as tm
    from featcache.backbones.weights import ENV_DIR
    root = tmp_path_factory.mktemp("tiny")
    tm.make_tiny_roberta(str(root / "weights" / "roberta-base"))
    tm.make_tiny_clip(str(root / "weights" / "clip-vit-b32"))
    data = tm.make_mvsa(str(root / "mvsa"), n=6, n_test=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv(ENV_DIR, str(root / "weights"))
        yield root, ["--data", data, "--backbone", "roberta-base+clip-vit-b32", "--max-text-len", "16", *EXTRACT]


@pytest.fixture(scope="module")
def shards(tiny):
    root, extract = tiny
    for i in (0, 1):
        code, text = _run(cli.featcache_app, ["extract", *extract, "--out", str(root / "m.h5"), "--shard", f"{i}/2"])
        assert code == 0, text
    return str(root / "m.manifest.json")


def _merge_failing_at_the_second_shard(shards, tmp_path, monkeypatch, exc: BaseException):
    """`featcache merge` with `exc` raised when the second shard's rows are written; (code, text, out) and a check
    that the shards are byte-identical and tmp_path is left empty (no full-size partial, no lock)."""
    import h5py
    folder = os.path.dirname(shards)
    before = {n: file_sha256(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith((".h5", ".json"))}
    out = str(tmp_path / "m.h5")
    real = h5py.Dataset.__setitem__

    def failing(ds, key, value):
        if ds.name == "/text/tokens" and isinstance(key, slice) and key.start:  # the second shard's rows
            raise exc
        real(ds, key, value)
    monkeypatch.setattr(h5py.Dataset, "__setitem__", failing)
    code, text = _run(cli.featcache_app, ["merge", shards, "--out", out])
    monkeypatch.setattr(h5py.Dataset, "__setitem__", real)
    assert os.listdir(tmp_path) == [] and {n: file_sha256(os.path.join(folder, n)) for n in before} == before
    return code, text, out


def test_a_disk_failing_during_merge_names_the_file_and_keeps_the_shards(shards, tmp_path, monkeypatch):
    import errno
    code, text, out = _merge_failing_at_the_second_shard(shards, tmp_path, monkeypatch,
                                                         OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    _one_paragraph(code, text, f"writing {partial_path(out)} failed: the disk is full", "the shards are unchanged")
    assert _run(cli.featcache_app, ["merge", shards, "--out", out])[0] == 0


def test_merge_says_when_the_disk_has_no_room_before_writing(shards, tmp_path, monkeypatch):
    import collections

    import featcache.outdir
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(featcache.outdir.shutil, "disk_usage", lambda p: usage(10 ** 6, 10 ** 6 - 2048, 2048))
    code, text = _run(cli.featcache_app, ["merge", shards, "--out", str(tmp_path / "m.h5")])
    _one_paragraph(code, text, f"{tmp_path / 'm.h5.partial'} needs about", f"{tmp_path} has 2.0 KiB free")
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def text_cache(tiny):
    root, extract = tiny
    code, text = _run(cli.featcache_app, ["extract", *extract, "--out", str(root / "c.h5")])
    assert code == 0, text
    return str(root / "c.h5")


def test_add_text_layers_names_an_unwritable_folder_before_the_model_loads(text_cache, tmp_path, monkeypatch):
    import errno

    import featcache.extract.text_layers as tl
    import featcache.outdir
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = _mount_tmpfs(folder, "size=4m")
    path = shutil.copy(text_cache, folder)
    if mounted:
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    else:
        def refuse(*a, **k):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))
        monkeypatch.setattr(featcache.outdir.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(tl, "load_text_backbone", lambda *a, **k: pytest.fail("the backbone was loaded"))
    try:
        code, text = _run(cli.featcache_app, ["add-text-layers", path, "--layers", "1"])
        _one_paragraph(code, text, f"the folder {folder} is not writable", "read-only")
        assert os.listdir(folder) == ["c.h5"]
    finally:
        if mounted:
            _umount(folder)


def test_a_disk_failing_during_add_text_layers_leaves_the_cache_unchanged(text_cache, tmp_path, monkeypatch):
    """h5py's own error for a full disk (a ValueError, errno only in its text) when the states are created."""
    import h5py
    path = shutil.copy(text_cache, tmp_path)
    digest = file_sha256(path)
    real = h5py.Group.create_dataset

    def full(group, name, *a, **k):
        if name == "text_hidden/states":
            raise ValueError("Unable to synchronously create dataset (file write failed: errno = 28, error "
                             "message = 'No space left on device')")
        return real(group, name, *a, **k)
    monkeypatch.setattr(h5py.Group, "create_dataset", full)
    code, text = _run(cli.featcache_app, ["add-text-layers", path, "--layers", "1"])
    _one_paragraph(code, text, f"writing {path}.addon.partial failed: the disk is full", f"{path} is unchanged")
    assert file_sha256(path) == digest and os.listdir(tmp_path) == ["c.h5"]  # no partial, no lock
    monkeypatch.setattr(h5py.Group, "create_dataset", real)
    code, text = _run(cli.featcache_app, ["add-text-layers", path, "--layers", "1"])
    assert code == 0 and "added text_hidden/states" in text, text


def test_ctrl_c_during_add_text_layers_says_the_cache_is_unchanged(text_cache, tmp_path, monkeypatch):
    """Ctrl-C while the states are written into the copy: the cache is byte-identical, no copy or lock stays,
    and the message says so and gives the command to run again (not --resume: there is nothing to continue)."""
    import h5py
    path = shutil.copy(text_cache, tmp_path)
    digest = file_sha256(path)
    real = h5py.Group.create_dataset

    def interrupted(group, name, *a, **k):
        if name == "text_hidden/states":
            raise KeyboardInterrupt
        return real(group, name, *a, **k)
    monkeypatch.setattr(h5py.Group, "create_dataset", interrupted)
    code, text = _run(cli.featcache_app, ["add-text-layers", path, "--layers", "1"])
    _one_paragraph(code, text, "interrupted (SIGINT)", f"{path} is unchanged", "run it again with: featcache",
                   exit_code=130)
    assert "--resume" not in text
    assert file_sha256(path) == digest and os.listdir(tmp_path) == ["c.h5"]


def test_ctrl_c_during_merge_keeps_the_shards_and_leaves_no_partial(shards, tmp_path, monkeypatch):
    code, text, _ = _merge_failing_at_the_second_shard(shards, tmp_path, monkeypatch, KeyboardInterrupt())
    _one_paragraph(code, text, "interrupted (SIGINT)", f"the shards of {shards} are unchanged",
                   "run it again with: featcache", exit_code=130)
