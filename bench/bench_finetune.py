"""One stage-2 training epoch (N=1 unfrozen text layer) three ways, in one run on the same train pairs:

  cached    : the top text block on the cache's text_hidden/states + head (what `heads finetune` runs)
  full_text : the whole text tower every step (frozen blocks under no_grad) + head; image from the cache
  e2e       : full_text plus the image tower on every step (frozen, no_grad) on images decoded beforehand

Same model, optimizer (AdamW, two LR groups), batch order and batch size in all three; only training steps
are timed (no evaluation; image decoding and tokenization are done once up front and not timed).
Target (issue 4): cached >= 4x faster than full_text. Writes bench/out/finetune.json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import cache_image_encoder, default_cache, write_result  # noqa: E402  (bench/ is sys.path[0])
from featcache.extract.forward import cpu_image_micro  # noqa: E402
from featcache.sources.images import load_rgb  # noqa: E402
from featcache.text_tower import load_text_backbone  # noqa: E402
from heads.data.cache import load_cache  # noqa: E402
from heads.data.splits import SplitConfig, split_labelled  # noqa: E402
from heads.data.text_layers import with_text_inputs  # noqa: E402
from heads.fusions import DEFAULT_FUSION, HeadConfig, HeadDims, create_fusion  # noqa: E402
from heads.train.text_model import FinetuneModel  # noqa: E402


class E2EModel(torch.nn.Module):
    """FinetuneModel whose image features come from the image tower each step instead of the cache."""

    def __init__(self, inner: FinetuneModel, image):
        super().__init__()
        self.inner, self.image = inner, image.eval()

    def forward(self, batch):
        with torch.no_grad():
            parts = [self.image.forward_features(p) for p in batch.pop("pixels").split(cpu_image_micro())]
        batch.update(image_tokens=torch.cat([p["tokens"] for p in parts]),
                     image_pooled=torch.cat([p["pooled"] for p in parts]))
        return self.inner(batch)


def epoch(model, make_batch, labels, rows, bs, text_params, head_params) -> float:
    opt = torch.optim.AdamW([{"params": head_params, "lr": 2e-4}, {"params": text_params, "lr": 5e-5}])
    model.train()
    if isinstance(model, E2EModel):
        model.image.eval()
    loss_fn = torch.nn.CrossEntropyLoss()
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    for s in range(0, len(rows), bs):
        idx = rows[order[s:s + bs]]
        loss = loss_fn(model(make_batch(idx))["logits"], labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=default_cache(),
                    help="the full default cache (`make run`); stage-2 states are added to it if missing")
    ap.add_argument("--samples", type=int, default=256, help="train pairs timed (the same for all three)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default="bench/out/finetune.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(os.cpu_count() or 1)

    from featcache.extract.text_layers import add_text_layers
    from featcache.cache.store import CacheReader
    with CacheReader(args.cache) as r:
        has_states = r.has("text_hidden/states") and r.start_layer is not None
        top = has_states and r.start_layer == r.meta["text"]["num_layers"] - 1
    if has_states and not top:  # states for more layers (an N=4 cache): time N=1 on a copy with N=1's states
        copy = os.path.join(os.path.dirname(args.cache), "bench-n1-" + os.path.basename(args.cache))
        if not os.path.exists(copy):
            shutil.copy(args.cache, copy + ".tmp")
            add_text_layers(copy + ".tmp", 1)
            os.replace(copy + ".tmp", copy)
        args.cache, has_states = copy, True
    if not has_states:  # the documented add-on step; the features themselves are not recomputed
        print(f"adding stage-2 states to {args.cache} (featcache add-text-layers --layers 1)", flush=True)
        add_text_layers(args.cache, 1)
    data = load_cache(args.cache, keys=("text_tokens", "text_mask", "text_pooled", "image_tokens", "image_pooled",
                                        "text_states"), texts=True)
    rows = torch.from_numpy(split_labelled(data, SplitConfig(0.2), 0).train[:args.samples])
    labels = torch.from_numpy(data.labels)
    text = load_text_backbone(data.meta)
    text.lock(1)
    data = with_text_inputs(data, text, 1, "cached")
    if "text_states" not in data.features:
        sys.exit(f"{args.cache} has no text_hidden/states for N=1: run `featcache add-text-layers` first")
    torch.manual_seed(0)
    head = create_fusion(HeadConfig(fusion=DEFAULT_FUSION), HeadDims(**data.dims(), num_classes=len(data.classes)))
    model = FinetuneModel(head, text, 1)  # reads the stored states
    full_model = FinetuneModel(head, text, 1, cached=False)  # the same modules, the whole text tower each step
    text_params, head_params = list(model.text_params().values()), list(head.parameters())
    init = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("text.")}
    init.update({f"text.{k}": v.detach().clone() for k, v in model.text_params().items()})

    image = cache_image_encoder(data.meta)
    root = data.meta["dataset"]["root"]
    t0 = time.perf_counter()
    pixels = {int(r): image.transform(load_rgb(os.path.join(root, "data", f"{data.guids[int(r)]}.jpg"),
                                               draft_size=image.decode_side())[0]) for r in rows}
    decode_s = time.perf_counter() - t0

    def e2e_batch(idx):
        b = data.batch(idx, "cpu", ("input_ids", "text_mask"))
        b["pixels"] = torch.stack([pixels[int(r)] for r in idx])
        return b

    variants = {
        "cached": (model, lambda idx: data.batch(idx, "cpu", model.inputs)),
        "full_text": (full_model, lambda idx: data.batch(idx, "cpu", full_model.inputs)),
        "e2e": (E2EModel(full_model, image), e2e_batch),
    }
    times = {}
    for name, (m, make) in variants.items():
        model.load_state_dict(init, strict=False)  # every variant starts from the same weights
        epoch(m, make, labels, rows[:args.batch_size * 2], args.batch_size, text_params, head_params)  # warm-up
        model.load_state_dict(init, strict=False)
        times[name] = epoch(m, make, labels, rows, args.batch_size, text_params, head_params)
        print(f"{name}: {times[name]:.2f}s for {len(rows)} samples", flush=True)
    res = {"cached_epoch_s": round(times["cached"], 3), "full_text_epoch_s": round(times["full_text"], 3),
           "e2e_epoch_s": round(times["e2e"], 3),
           "speedup_vs_full_text": round(times["full_text"] / times["cached"], 2),
           "speedup_vs_e2e": round(times["e2e"] / times["cached"], 2), "samples": len(rows),
           "note": (f"one training epoch over the same {len(rows)} train pairs of {args.cache} (a fixed subset, "
                    f"batch {args.batch_size}, {torch.get_num_threads()} CPU threads), {data.meta['backbone']['text']}"
                    f" with N=1 of {text.num_layers} layers unfrozen + {DEFAULT_FUSION} head; training steps "
                    f"only. e2e also runs {data.meta['backbone']['image']} (frozen, no_grad) every step on images "
                    f"decoded once beforehand ({decode_s:.1f}s, not timed).")}
    write_result(args.out, res)


if __name__ == "__main__":
    main()
