"""`featcache extract` / `add-text-layers` options end to end through typer's CliRunner, on tiny models (RoBERTa,
CLIP, BLIP from tiny_models) given by explicit weight paths, each checked in what the cache holds: the recorded
weights and preprocessing, captions appended to the texts, CLS pooling, augmented views per seed, micro-batches
that change nothing, --force against reuse, a manifest's split column, and the added text states (issue 20)."""
from __future__ import annotations

import json
import os
import shutil

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

import tiny_models as tm
from featcache.cache.store import CacheReader

pytestmark = pytest.mark.filterwarnings("ignore")


def featcache(*args):
    from cli import featcache_app
    return CliRunner().invoke(featcache_app, [str(a) for a in args])


def flat(text: str) -> str:
    return " ".join(text.split())


def extract(env, data, *options):
    """`featcache extract` of DATA with the tiny RoBERTa + CLIP at explicit paths, on the CPU."""
    return featcache("extract", "--data", data, "--backbone", "roberta-base+clip-vit-b32", "--text-weights",
                     env["weights"]["text"], "--image-weights", env["weights"]["image"], "--device", "cpu",
                     "--batch-size", "4", "--workers", "0", "--no-progress", "--max-text-len", "24", *options)


def arrays(path, *names) -> list[np.ndarray]:
    with h5py.File(path, "r") as f:
        return [f[n][:] for n in names]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fcli")
    w = {"text": tm.make_tiny_roberta(str(root / "rob")), "image": tm.make_tiny_clip(str(root / "clip")),
         "caption": tm.make_tiny_blip(str(root / "blip"))}
    data = tm.make_mvsa(str(root / "mvsa"), n=6, n_test=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.delenv("FEATCACHE_WEIGHTS", raising=False)  # the explicit paths only
        yield {"root": root, "weights": w, "data": data}


@pytest.fixture(scope="module")
def views(env):
    """A cache with CLS pooling and one strong view per image (seed 3), extracted in image micro-batches of 2."""
    out = env["root"] / "views.h5"
    r = extract(env, env["data"], "--text-pooling", "cls", "--image-views", "1", "--image-aug", "strong",
                  "--aug-seed", "3", "--image-micro-batch", "2", "--out", out)
    assert r.exit_code == 0, r.output
    return out, r.output


def test_weights_pooling_views_and_device_are_recorded_and_act(env, views):
    out, log = views
    assert f"wrote {out}: 6 samples (4 train, 2 test), 0 invalid" in flat(log)
    with CacheReader(str(out)) as r:
        meta = r.meta
    for kind in ("text", "image"):  # the explicit paths, not a search
        assert meta["weights"][kind]["source"] == "path" and meta["weights"][kind]["location"] == env["weights"][kind]
    prep = meta["preprocessing"]
    assert (prep["text_pooling"], prep["image_views"], prep["image_aug"], prep["aug_seed"]) == ("cls", 1, "strong", 3)
    assert meta["env"]["device"] == "cpu" and meta["extract_config"]["image_micro_batch"] == 2
    tokens, pooled, clean, view = arrays(out, "text/tokens", "text/pooled", "image/pooled", "image_views/pooled")
    np.testing.assert_allclose(pooled, tokens[:, 0].astype(np.float32), atol=2e-3, rtol=2e-3)  # CLS: token 0
    assert np.abs(view[:, 0] - clean).mean() > 1e-3  # a strong view is not the clean image
    # another view seed changes the views only; one image per backbone call changes nothing
    other = env["root"] / "seed4.h5"
    r = extract(env, env["data"], "--text-pooling", "cls", "--image-views", "1", "--image-aug", "strong",
                  "--aug-seed", "4", "--image-micro-batch", "1", "--out", other)
    assert r.exit_code == 0, r.output
    clean4, view4 = arrays(other, "image/pooled", "image_views/pooled")
    np.testing.assert_allclose(clean4, clean, atol=1e-5)
    assert np.abs(view4 - view).mean() > 1e-3


def test_force_recomputes_what_is_otherwise_reused(env, views):
    out, _ = views
    args = ["--text-pooling", "cls", "--image-views", "1", "--image-aug", "strong", "--aug-seed", "3",
            "--image-micro-batch", "2", "--out", out]
    before = os.stat(out).st_mtime_ns
    r = extract(env, env["data"], *args)
    assert r.exit_code == 0 and "reusing it (--force recomputes)" in flat(r.output), r.output
    assert os.stat(out).st_mtime_ns == before
    r = extract(env, env["data"], *args, "--force")
    assert r.exit_code == 0 and f"wrote {out}" in flat(r.output) and "reusing" not in r.output, r.output
    assert os.stat(out).st_mtime_ns != before


def test_captions_are_stored_and_appended_to_the_text(env, views):
    out = env["root"] / "captions.h5"
    r = extract(env, env["data"], "--captions", "blip-base", "--caption-weights", env["weights"]["caption"],
                  "--caption-mode", "append", "--out", out)
    assert r.exit_code == 0, r.output
    with CacheReader(str(out)) as c:
        meta, captions = c.meta, c.strings("samples/caption")
    assert meta["weights"]["caption"]["location"] == env["weights"]["caption"]
    assert meta["preprocessing"]["captions"] == "blip-base" and meta["preprocessing"]["caption_mode"] == "append"
    assert len(captions) == 6 and all(captions)
    (with_caps,), (plain,) = arrays(out, "text/mask"), arrays(views[0], "text/mask")
    assert (with_caps.sum(1) > plain.sum(1)).all()  # text [SEP] caption: more tokens on every row
    r = featcache("info", out, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["backbones"]["captioner"] == "blip-base"


def test_manifest_split_column(env, tmp_path):
    rows = [{"id": f"m{k}", "text": f"post {k}", "image": os.path.join(env["data"], "data", f"{100 + k}.jpg"),
             "label": "yes" if k % 2 else "no", "part": "fit" if k < 4 else "later"} for k in range(6)]
    manifest = tmp_path / "metadata.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "m.h5"
    r = extract(env, manifest, "--format", "manifest", "--split-column", "part",
                  "--out", out)
    assert r.exit_code == 0, r.output
    r = featcache("info", out, "--json")
    summary = json.loads(r.output)
    assert {s: v["samples"] for s, v in summary["splits"].items()} == {"fit": 4, "later": 2}
    assert summary["format"] == "manifest" and summary["classes"] == ["no", "yes"]


def test_add_text_layers_batch_size_and_device(env, views, tmp_path):
    path = tmp_path / "c.h5"
    shutil.copyfile(views[0], path)
    r = featcache("add-text-layers", path, "--layers", "1", "--batch-size", "3", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "added text_hidden/states (6, 24, 32) (entering layer 1)" in flat(r.output)
    with CacheReader(str(path)) as c:
        assert c.meta["text"]["start_layer"] == 1 and c.has("text_hidden/states")
    r = featcache("add-text-layers", path, "--layers", "1", "--batch-size", "3", "--device", "cpu")
    assert r.exit_code == 0 and "already holds the hidden states entering layer 1; nothing to do" in flat(r.output)


MISTAKES = [  # (args, words of the message); "{data}" / "{tmp}" are filled in
    (["extract", "--data", "{tmp}/nowhere"], "dataset path '{tmp}/nowhere' does not exist"),
    (["extract", "--data", "{data}", "--format", "nope"], "unknown dataset format 'nope'; valid: mvsa,"),
    (["extract", "--data", "{data}", "--image-aug", "medium"], "unknown image augmentation 'medium'; valid: weak, strong"),
    (["extract", "--data", "{data}", "--captions", "blip-base", "--caption-mode", "prepend"],
     "--caption-mode must be 'store' or 'append', got 'prepend'"),
    (["extract", "--data", "{data}", "--overlap", "maybe"], "--overlap must be auto, on or off, got 'maybe'"),
    (["extract", "--data", "{data}", "--backbone", "nope+resnet18"], "unknown backbone 'nope'; valid: minilm-l6"),
    (["extract", "--data", "{data}", "--shard", "3/2"], "--shard '3/2': give I/N with 0 <= I < N"),
    (["extract", "--data", "{data}", "--device", "tpu"], "--device 'tpu': give auto, cpu, cuda or cuda:N"),
    (["extract", "--data", "{data}", "--text-weights", "{tmp}/none"], "weights path {tmp}/none given for backbone"),
    (["merge", "{tmp}/m.manifest.json", "--out", "{tmp}/m.h5"], "manifest {tmp}/m.manifest.json does not exist"),
    (["strip-text", "{tmp}/none.h5"], "cache file {tmp}/none.h5 does not exist"),
    (["add-text-layers", "{tmp}/none.h5", "--layers", "1"], "cache file {tmp}/none.h5 does not exist"),
    (["info", "{data}/train.txt"], "train.txt is not a readable HDF5 file"),
]


@pytest.mark.parametrize("args,words", MISTAKES, ids=[" ".join(a[:1] + [w[:24]]) for a, w in MISTAKES])
def test_user_mistakes_are_one_paragraph_exit_2(env, tmp_path, args, words):
    """Found before any model loads or any output exists (a mistyped --overlap used to surface only after both,
    leaving a partial file that the next run called interrupted); the message names the value and what to do."""
    fill = lambda a: a.replace("{data}", env["data"]).replace("{tmp}", str(tmp_path))  # noqa: E731
    out = tmp_path / "x.h5"
    r = featcache(*map(fill, args), *(["--out", out, "--no-progress"] if args[0] == "extract" else []))
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and flat(r.output).startswith("error:"), r.output  # nothing before it
    assert fill(words) in flat(r.output), r.output
    assert not list(tmp_path.glob("x.h5*"))  # no partial file, no lock left behind
