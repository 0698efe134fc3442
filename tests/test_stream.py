"""Caches larger than memory (heads.data.stream): a head over the memory budget reads its batches from disk.

What must hold: the streamed batcher returns exactly the in-memory values (so validation, test and predict
numbers are identical); an epoch still visits every training row once, in block-shuffled order whose batches
touch a bounded number of blocks, repeatably per seed; training learns as well as in memory; the decision
follows the budget, and a bad budget is a user mistake (exit 2).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import heads_app
from heads.config import TrainConfig
from heads.data.stream import StreamData, load_data, parse_budget
from heads.fusions import HeadDims, create_fusion, list_fusions
from heads.infer import infer
from heads.train.stage1 import train

KEYS = ("text_tokens", "text_mask", "text_pooled", "image_tokens", "image_pooled")


def _cli(*args):
    return CliRunner().invoke(heads_app, [str(a) for a in args])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from conftest import build_synthetic_cache  # noise 3: not separable, so orders and heads give other numbers
    return build_synthetic_cache(str(tmp_path_factory.mktemp("stream") / "c.h5"), n_train=300, noise=3.0,
                                 extra_invalid=(305,))


def test_budget_decides_and_parses(cache):
    assert type(load_data(cache, budget="auto")).__name__ == "CacheData"
    streamed = load_data(cache, budget="1KB")
    assert isinstance(streamed, StreamData) and streamed.need > 1024 and streamed.budget == 1024
    # what a film head reads (text_pooled + image_tokens) fits a budget that all arrays do not
    film = ("text_pooled", "image_tokens")
    need = load_data(cache, keys=film, budget="0").need
    assert not isinstance(load_data(cache, keys=film, budget=need), StreamData)
    assert isinstance(load_data(cache, keys=film, budget=need - 1), StreamData)
    assert parse_budget("4GB") == 4 << 30 and parse_budget("1.5 mb") == 3 << 19 and parse_budget("0") == 0
    for bad in ("lots", "4XB", "-1GB"):
        with pytest.raises(ValueError, match="not a size"):
            parse_budget(bad)


@pytest.mark.parametrize("block", [1, 7, 64])
def test_streamed_batches_equal_memory(cache, block):
    mem, st = load_data(cache), load_data(cache, budget="0", block_rows=block, buffer_blocks=2)
    rng = np.random.default_rng(block)
    for rows in (rng.permutation(len(mem))[:50], np.arange(len(mem)), np.array([3])):
        for normed in ((), ("text_tokens", "image_tokens")):
            a = mem.batch(rows, keys=KEYS, normed=normed)
            b = st.batch(rows, keys=KEYS, normed=normed)
            assert a.keys() == b.keys()
            for k in a:
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("fusion", list_fusions())
def test_inference_is_identical(cache, fusion):
    mem, st = load_data(cache), load_data(cache, budget="0", block_rows=5, buffer_blocks=2)
    torch.manual_seed(0)
    model = create_fusion(TrainConfig.from_flat(fusion=fusion).head,
                          HeadDims(**mem.dims(), num_classes=len(mem.classes)))
    rows = np.flatnonzero(mem.valid)
    a, b = infer(model, mem, rows, batch_size=37)["logits"], infer(model, st, rows, batch_size=37)["logits"]
    if "text_tokens" not in model.inputs:
        assert np.array_equal(a, b)
    else:  # in memory these rows go in order of text length (other batches, other float rounding), streamed not
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert np.array_equal(a.argmax(1), b.argmax(1))


def test_epoch_order_is_a_block_shuffle(cache):
    st = load_data(cache, budget="0", block_rows=10, buffer_blocks=3)
    rows = np.flatnonzero(st.valid & (st.splits == "train"))[::2]  # a split's rows: gaps, not every block full
    orders = [st.epoch_order(rows, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(orders[0], orders[1]) and not torch.equal(orders[0], orders[2])  # seeded
    for order in orders:
        assert sorted(order.tolist()) == list(range(len(rows)))  # every row once
        blocks = rows[order.numpy()] // 10
        # bounded buffer: at any point of the epoch at most 3 blocks are open (begun and not yet finished)
        span = {b: (np.flatnonzero(blocks == b)[0], np.flatnonzero(blocks == b)[-1]) for b in set(blocks)}
        assert max(sum(lo <= i <= hi for lo, hi in span.values()) for i in range(len(blocks))) == 3
        assert not np.all(np.diff(rows[order.numpy()]) > 0)  # shuffled inside the buffers
    assert torch.equal(load_data(cache).epoch_order(rows, torch.Generator().manual_seed(0)),
                       torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)))  # in memory: as before


def test_streamed_epochs_of_text_token_heads_group_lengths_inside_the_buffer(cache):
    """group = batch size (heads that read text tokens): batches of similar text length, drawn from the buffer's
    rows; every row once, seeded, and a batch's blocks still come from at most two neighbouring buffers."""
    st = load_data(cache, budget="0", block_rows=10, buffer_blocks=6)  # about 30 of the rows below per buffer
    assert st.row_lengths is not None and st.text_lengths() is None  # inference keeps block order
    lengths = load_data(cache).text_lengths()
    assert torch.equal(st.row_lengths, lengths)
    assert load_data(cache, keys=("text_pooled", "image_tokens"), budget="0").row_lengths is None
    rows = np.flatnonzero(st.valid & (st.splits == "train"))[::2]
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    grouped = [st.epoch_order(rows, gen(s), group=8) for s in (0, 0, 1)]
    assert torch.equal(grouped[0], grouped[1]) and not torch.equal(grouped[0], grouped[2])
    plain = st.epoch_order(rows, gen(0))
    spread = lambda order: np.mean([np.ptp(lengths[rows[b]].numpy())  # noqa: E731
                                    for b in order.numpy()[:len(rows) // 8 * 8].reshape(-1, 8)])
    assert spread(grouped[0]) < 0.6 * spread(plain)  # batches of similar length (0.45 here; lengths 2-12)
    for order in grouped:
        assert sorted(order.tolist()) == list(range(len(rows)))
        blocks = rows[order.numpy()] // 10  # open blocks (begun, not finished): this buffer's and the last's
        span = {b: (np.flatnonzero(blocks == b)[0], np.flatnonzero(blocks == b)[-1]) for b in set(blocks)}
        assert max(sum(lo <= i <= hi for lo, hi in span.values()) for i in range(len(blocks))) <= 2 * 6


@pytest.mark.parametrize("fusion", ["film", "cross-attn"])
def test_streamed_training_learns_like_memory(cache, fusion):
    cfg = TrainConfig.from_flat(fusion=fusion, epochs=4, patience=0, plots=False, threads=1)
    mem = train(cfg, load_data(cache))
    st = train(cfg, load_data(cache, budget="0", block_rows=16, buffer_blocks=4))
    assert st.metrics["data"]["streamed"] and not mem.metrics["data"]["streamed"]
    assert np.array_equal(st.split.val, mem.split.val)  # the split does not depend on how rows are read
    # another batch order, so other weights; the same quality within the noise of this small cache
    assert not np.array_equal(st.val_logits, mem.val_logits)
    assert abs(st.metrics["macro_f1"] - mem.metrics["macro_f1"]) < 0.12
    assert st.metrics["macro_f1"] > 0.5  # three classes: chance is about 0.33


def test_cli_train_and_predict_stream(cache, tmp_path):
    res = _cli("train", "--cache", cache, "--fusion", "film", "--epochs", "2", "--no-plots", "--threads", "1",
               "--memory-budget", "10KB", "--out", tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert "over the memory budget of 0.00 GiB" in " ".join(res.output.split())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["data"]["streamed"] and metrics["data"]["budget_bytes"] == 10 << 10
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["memory_budget"] == "10KB"
    outs = []
    for budget in ("auto", "0"):  # predictions read through the streamer are the in-memory ones, byte for byte
        out = tmp_path / f"pred-{budget}.csv"
        res = _cli("predict", "--run", tmp_path / "run", "--cache", cache, "--proba", "--memory-budget", budget,
                   "--out", out)
        assert res.exit_code == 0, res.output
        outs.append(out.read_text())
    assert outs[0] == outs[1] and len(outs[0].splitlines()) == 41


def test_bad_budget_is_a_user_mistake(cache, tmp_path):
    res = _cli("train", "--cache", cache, "--memory-budget", "plenty", "--out", tmp_path / "run")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "memory budget 'plenty' is not a size" in " ".join(res.output.split())
    assert not (tmp_path / "run").exists()


def test_ablation_streams_in_forked_workers(cache, tmp_path):
    """Two workers side by side, each opening the file itself (h5py handles are not fork-safe): the same runs
    as one worker, and the probe reads its pooled features through the streamer."""
    from heads.ablate import AblateConfig, ablate
    base = {"plots": False, "epochs": 2, "patience": 0, "memory_budget": "0", "threads": 1}
    results = {}
    for workers in (2, 1):
        cfg = AblateConfig(cache=cache, out=str(tmp_path / f"w{workers}"), grid={"fusion": ["film", "gmu"]},
                           seeds=[0], base=base, probe=True, progress=False, workers=workers, n_boot=50)
        res = ablate(cfg)
        assert res.trained == 3 and res.workers == workers
        results[workers] = {os.path.basename(d): json.load(open(os.path.join(d, "metrics.json")))
                            for d in res.run_dirs}
    assert results[1].keys() == results[2].keys()
    for name, m in results[1].items():
        assert m["data"]["streamed"] if "probe" not in name else True
        assert m["macro_f1"] == results[2][name]["macro_f1"], name


def test_cli_ablate_memory_budget(cache, tmp_path):
    res = _cli("ablate", "--cache", cache, "--out", tmp_path / "abl", "--fusion", "concat", "--seeds", "0",
               "--set", "epochs=1", "--memory-budget", "0", "--no-progress")
    assert res.exit_code == 0, res.output
    runs = sorted((tmp_path / "abl" / "runs").iterdir())
    assert [r.name for r in runs] == ["fusion=concat,epochs=1,seed=0"]
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["data"]["streamed"] and metrics["data"]["budget_bytes"] == 0


def test_streamed_image_views_equal_memory(cache, tmp_path):
    """A cache with stored image views (--image-views K): the view a batch picks per row is read from disk too."""
    import shutil

    import h5py
    path = str(tmp_path / "views.h5")
    shutil.copy(cache, path)
    rng = np.random.default_rng(0)
    with h5py.File(path, "a") as f:
        n, p, d = f["image/tokens"].shape
        f["image_views/tokens"] = rng.normal(size=(n, 2, p, d)).astype(np.float16)
        f["image_views/pooled"] = rng.normal(size=(n, 2, f["image/pooled"].shape[1])).astype(np.float32)
    mem, st = load_data(path), load_data(path, budget="0", block_rows=9)
    assert mem.num_views() == st.num_views() == 2
    rows, views = np.array([4, 100, 7, 250, 31]), np.array([0, 1, 2, 2, 1])
    a = mem.batch(rows, keys=KEYS, views=views)
    b = st.batch(rows, keys=KEYS, views=views)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["image_tokens"], mem.batch(rows, keys=KEYS)["image_tokens"])  # the views were used


def test_row_reader_reads_every_layout_like_h5py(tmp_path):
    """pread of row-chunked arrays (ranges inside one chunk, across chunks, the partial last chunk), a contiguous
    array, and the h5py fallback for a compressed one: the same values as h5py's own slicing."""
    import h5py
    from featcache.cache.rows import _File
    rng = np.random.default_rng(0)
    path = str(tmp_path / "layouts.h5")
    arrays = {"chunked": rng.normal(size=(50, 3, 4)).astype(np.float16), "mask": rng.random((50, 6)) > 0.5,
              "contiguous": rng.normal(size=(50, 5)).astype(np.float32),
              "compressed": rng.normal(size=(50, 5)).astype(np.float32)}
    with h5py.File(path, "w") as f:
        f.create_dataset("chunked", data=arrays["chunked"], chunks=(7, 3, 4))
        f.create_dataset("mask", data=arrays["mask"], chunks=(16, 6))
        f.create_dataset("contiguous", data=arrays["contiguous"])
        f.create_dataset("compressed", data=arrays["compressed"], chunks=(10, 5), compression="gzip")
    class Reader:  # what _File takes from a CacheReader
        def __init__(self, h5):
            self.f, self.path = h5, path

        def __len__(self):
            return 50

    with h5py.File(path, "r") as h5:
        file = _File(Reader(h5))
        try:
            for name, want in arrays.items():
                for lo, hi in ((0, 50), (3, 6), (6, 15), (13, 50), (49, 50), (14, 14)):
                    got = file.rows(name, lo, hi)
                    assert got.dtype == want.dtype and np.array_equal(got, want[lo:hi]), (name, lo, hi)
            assert file._layout("chunked") and file._layout("contiguous") and file._layout("compressed") is None
        finally:
            file.close()


def test_kept_validation_rows_read_no_block_and_sort_as_in_memory(cache):
    """keep(val): once an epoch has read their blocks, validation reads no block, and inference goes in order of
    text length as in memory, so its logits are the in-memory ones exactly; rows over the budget are not kept."""
    mem = load_data(cache)
    need = load_data(cache, budget="0").need
    st = load_data(cache, budget=need - 1, block_rows=8, buffer_blocks=2)  # streams; a fifth of the rows fits
    rows = np.flatnonzero(st.valid & (st.splits == "train"))
    val, train_rows = rows[::5], np.setdiff1d(rows, rows[::5])
    assert st.keep(val) and st.kept_rows() == len(val)
    assert st.sort_lengths(val) is None  # nothing copied yet: inference would read blocks, so keeps their order
    for b in st.epoch_order(train_rows, torch.Generator().manual_seed(0)).split(16):  # one epoch's reads
        st.batch(train_rows[b.numpy()], keys=KEYS)
    reads = []
    get = st._blocks.get
    st._blocks.get = lambda b: reads.append(b) or get(b)
    torch.manual_seed(0)
    model = create_fusion(TrainConfig.from_flat(fusion="cross-attn").head,
                          HeadDims(**mem.dims(), num_classes=len(mem.classes)))
    a, b = infer(model, mem, val, batch_size=37)["logits"], infer(model, st, val, batch_size=37)["logits"]
    assert reads == [] and np.array_equal(a, b)
    for k, v in mem.batch(val[:20], keys=KEYS).items():
        assert torch.equal(v, st.batch(val[:20], keys=KEYS)[k]), k
    infer(model, st, train_rows[:5])
    assert reads  # other rows still come from their blocks
    assert not load_data(cache, budget="0", block_rows=8).keep(val)  # budget 0: nothing kept
    assert load_data(cache).keep(val)  # in memory: every row is


def test_an_epoch_reads_each_block_once(cache):
    """Blocks read ahead are not evicted before their turn: least-recently-used alone evicted them (a block read
    ahead but not yet used looks older than the blocks just finished with), and they were read a second time."""
    st = load_data(cache, budget="0", block_rows=4, buffer_blocks=3)  # 9 blocks in memory at most
    rows = np.flatnonzero(st.valid & (st.splits == "train"))
    reads, lock = [], __import__("threading").Lock()
    read = type(st._blocks)._read

    def counted(self, b):
        with lock:
            reads.append(b)
        return read(self, b)

    st._blocks._read = counted.__get__(st._blocks)
    for b in st.epoch_order(rows, torch.Generator().manual_seed(0), group=8).split(8):
        st.batch(rows[b.numpy()], keys=KEYS)
        __import__("time").sleep(0.002)  # a training step: the thread reads ahead meanwhile
    assert len(reads) == len(set(reads)) == len(np.unique(rows // 4))
