"""Kill safety (issue 6): `featcache extract` is SIGKILLed again and again (before a batch, in the middle of
a write, between a batch's rows and its done flags, from outside at a random moment, while finishing, around
the final rename) and resumed each time;
the cache it finally leaves equals an uninterrupted run array for array, and at no moment is there an
incomplete file at the final path. Also: a live writer's output is refused by name.

Every run is a real subprocess (tests/crash_child.py) killed with SIGKILL: no finally blocks, no HDF5 close.
The kill points are drawn from a seeded RNG (KILL_SEED=N picks another chain; the seed is in every message).
The dataset is the generated bad-input corpus, so image problems found before a kill must survive it too.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from featcache.cache.store import CacheError, CacheReader, partial_path, problems_path
from mvsa_fixtures import HUGE_LIMIT, bad_corpus

pytestmark = pytest.mark.slow
CHILD = Path(__file__).with_name("crash_child.py")
SEED = int(os.environ.get("KILL_SEED", "0"))
BATCH = 2
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}  # same threads every run: same rounding


def _start(point: str, n, data: Path, out: Path, resume: bool) -> subprocess.Popen:
    args = ["--data", data, "--out", out, "--batch-size", BATCH, "--workers", "0", "--no-progress",
            "--max-image-pixels", HUGE_LIMIT] + (["--resume"] if resume else [])
    return subprocess.Popen([sys.executable, str(CHILD), point, str(n), *map(str, args)], env=ENV, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(p: subprocess.Popen) -> tuple[int, str]:
    out, err = p.communicate(timeout=300)
    return p.returncode, out + err


def _wait_for(p: subprocess.Popen, line: str, count: int = 1) -> list[float]:
    """Read the child's stdout up to the `count`-th `line` ("wrote": any batch); the times they came."""
    seen = []
    for got in p.stdout:
        if (got.strip() == line) if line != "wrote" else got.startswith("wrote "):
            seen.append(time.perf_counter())
        if len(seen) == count:
            return seen
    raise AssertionError(f"the child ended before printing {line!r} x{count}: {p.stderr.read()}")


def _arrays(path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[:]) if isinstance(v, h5py.Dataset) else None)
    return out


def _assert_same_cache(got, want, why):
    a, b = _arrays(got), _arrays(want)
    assert sorted(a) == sorted(b), why
    for name in b:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), f"{name} differs; {why}"
    with CacheReader(str(got)) as x, CacheReader(str(want)) as y:
        for k in ("key", "dataset", "problems", "preprocessing"):
            assert x.meta[k] == y.meta[k], f"meta {k} differs; {why}"


def _done(out: Path) -> np.ndarray | None:
    """The done flags of the partial file (None before it exists)."""
    if not os.path.exists(partial_path(str(out))):
        return None
    with h5py.File(partial_path(str(out)), "r") as f:
        return f["samples/done"][:]


def _check_flag_window(point: str, n: int, before, out: Path, reference: Path, why: str) -> None:
    """After a kill at "flags K" the K-th batch's rows are on disk unflagged; after "flagged K" they are flagged
    AND hold the uninterrupted run's values (a writer flushing flags before data leaves them empty)."""
    done = _done(out)
    before = np.zeros_like(done) if before is None else before
    fresh = np.flatnonzero(done & ~before)
    assert fresh.size == (n - 1 + (point == "flagged")) * BATCH, f"{why}: {fresh.size} rows newly flagged"
    rows = fresh[-BATCH:] if point == "flagged" else np.flatnonzero(~done)[:BATCH]
    with h5py.File(partial_path(str(out)), "r") as f, h5py.File(reference, "r") as ref:
        for name in ("text/tokens", "text/pooled", "image/pooled"):
            assert np.array_equal(f[name][rows], ref[name][rows]), f"{why}: {name} of rows {rows} not written"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return bad_corpus(tmp_path_factory.mktemp("kill-data"), n_good=20)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("kill-ref") / "ref.h5"
    code, log = _finish(_start("none", 0, corpus.root, out, resume=False))
    assert code == 0, log
    with CacheReader(str(out)) as r:
        assert r.meta["problems"] and len(r) > 8 * BATCH  # image problems to carry over, many batches
    return out


def test_sigkill_anywhere_then_resume_is_bit_identical(corpus, reference, tmp_path):
    rng = random.Random(SEED)
    out = tmp_path / "k.h5"
    with h5py.File(reference, "r") as f:
        n_batches = -(-f["samples/guid"].shape[0] // BATCH)
    # Each resumed run counts its batches from 1; kills early in each run leave work for the next ones.
    # "flagged" and "flags" are in every chain, whatever the seed: a kill just after a batch's done flags are
    # flushed (its rows must be there already; it follows "batch", which leaves the next rows empty, so stale
    # rows of an earlier kill cannot stand in for them), and one after its rows are flushed but not its flags.
    steps = [("batch", rng.randint(2, 3)),
             ("flagged", rng.randint(1, 2)),
             ("flags", rng.randint(1, 2)),
             ("mid-write", f"{rng.randint(1, 2)}:{rng.randint(1, 7)}"),  # anywhere else in a write
             ("pause", rng.randint(1, 2)),
             ("outside", rng.randint(2, 3)),
             ("close", 0), ("rename", 0), ("after-rename", 0)]
    for k, (point, n) in enumerate(steps):
        why = f"KILL_SEED={SEED}, step {k}: {point} {n}; steps {steps}"
        done_before = _done(out)
        p = _start("none" if point == "outside" else point, n, corpus.root, out, resume=k > 0)
        if point == "pause":  # a live writer: its output is refused by name, not read half-written
            _wait_for(p, "paused")
            for path in (out, Path(partial_path(str(out)))):
                with pytest.raises(CacheError, match="still being written") as exc:
                    CacheReader(str(path))
                assert path.name in str(exc.value), why
            p.send_signal(signal.SIGKILL)
        elif point == "outside":  # from outside, at a random moment of the next batch (one batch = the
            seen = _wait_for(p, "wrote", n)  # time between the last two)
            time.sleep(rng.uniform(0.0, seen[-1] - seen[-2]))
            p.send_signal(signal.SIGKILL)
        code, log = _finish(p)
        assert code == -signal.SIGKILL, f"{why}: the child was not killed (exit {code}):\n{log}"
        assert "Traceback" not in log, f"{why}:\n{log}"
        if point in ("flags", "flagged"):
            _check_flag_window(point, n, done_before, out, reference, why)
        if point == "after-rename":  # the rename happened: the final file is complete
            with CacheReader(str(out)) as r:
                assert r.meta["key"]
        else:  # never anything at the final path before the rename
            assert not out.exists(), why
            assert os.path.exists(partial_path(str(out))), why
            with pytest.raises(CacheError, match="interrupted"):
                CacheReader(str(out))
    # One more run: the finished file is reused as is, and equals the uninterrupted one.
    code, log = _finish(_start("none", 0, corpus.root, out, resume=True))
    assert code == 0 and "reusing" in log, log
    assert not os.path.exists(partial_path(str(out))) and not os.path.exists(problems_path(str(out)))
    assert n_batches > 8
    _assert_same_cache(out, reference, f"KILL_SEED={SEED}, steps {steps}")


def test_image_problems_found_before_a_kill_are_reported_after_resume(corpus, reference, tmp_path):
    """Image problems of rows written before a kill live in the log beside the partial file (written, atomically,
    before the rows of the batch that found them); the resumed run reads them back and reports all of them."""
    out = tmp_path / "p.h5"
    kill_at = 14  # the bad rows follow the 19 good train rows: by batch 14, several image problems are found
    code, log = _finish(_start("batch", kill_at, corpus.root, out, resume=False))
    assert code == -signal.SIGKILL, log
    with open(problems_path(str(out))) as f:
        logged = json.load(f)
    with h5py.File(partial_path(str(out)), "r") as f:
        done = f["samples/done"][:]
    written = (kill_at - 1) * BATCH
    assert done.sum() == written and not done[written:].any()
    assert len({row for row, *_ in logged}) >= 3 and all(row < written for row, *_ in logged)
    code, log = _finish(_start("none", 0, corpus.root, out, resume=True))
    assert code == 0, log
    _assert_same_cache(out, reference, f"killed before batch {kill_at}")


def test_damaged_partial_is_named_not_a_traceback(corpus, tmp_path):
    out = tmp_path / "d.h5"
    Path(partial_path(str(out))).write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    code, log = _finish(_start("none", 0, corpus.root, out, resume=True))
    flat = " ".join(log.split())
    assert code == 2 and "Traceback" not in log, log
    assert "cannot be resumed" in flat and "d.h5.partial" in flat and "without --resume" in flat


def test_problems_of_a_batch_killed_before_its_flags_are_reported_once(corpus, reference, tmp_path):
    """A batch's image problems are logged before its rows and flags; killed in between, the resumed run
    decodes that batch again and must not report its problems a second time (they were counted twice)."""
    out, kill_at = tmp_path / "f.h5", 11  # batch 11 (rows 20, 21): the first bad rows after the 20 good ones
    code, log = _finish(_start("flags", kill_at, corpus.root, out, resume=False))
    assert code == -signal.SIGKILL, log
    with open(problems_path(str(out))) as f:
        logged = {row for row, *_ in json.load(f)}
    assert logged & set(np.flatnonzero(~_done(out))[:BATCH].tolist())  # the unflagged batch had logged problems
    code, log = _finish(_start("none", 0, corpus.root, out, resume=True))
    assert code == 0, log
    _assert_same_cache(out, reference, f"killed before the flags of batch {kill_at}")
