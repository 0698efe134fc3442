"""How sure an ImageNet classifier is on a dataset's images under each preprocessing: a check that a backbone's
input normalisation is the one its weights were trained with (docs/default_choice.md, "the preprocessing
EfficientNet-Lite0's weights expect"). Wrong mean/std shifts every activation, and the classifier's top-1
probability drops: the same weights fed as trained are the more confident.

    python scripts/imagenet_confidence.py --data ../shared/mvsa --n 150 efficientnet-lite0 efficientnet-lite0-tf

Prints, per image backbone: the mean top-1 softmax probability over the first N images (sorted file names) and the
share of images on which its top-1 class equals each other backbone's.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from featcache.backbones import create_image, locate  # noqa: E402  (after the path: the script runs from any folder)


@torch.inference_mode()
def probabilities(name: str, images: list) -> torch.Tensor:
    enc = create_image(name, locate(name))
    x = torch.stack([enc.transform(im) for im in images])
    if enc.channels_last:  # the folded model runs channels_last, as extraction feeds it
        x = x.contiguous(memory_format=torch.channels_last)
    return enc.net(x).softmax(-1)  # the whole classifier (its ImageNet head), not forward_features


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("backbones", nargs="+", help="image backbone names (featcache backbones)")
    ap.add_argument("--data", default="../shared/mvsa")
    ap.add_argument("--n", type=int, default=150)
    a = ap.parse_args()
    files = sorted(glob.glob(os.path.join(a.data, "data", "*.jpg")))[:a.n]
    images = [Image.open(f).convert("RGB") for f in files]
    probs = {name: probabilities(name, images) for name in a.backbones}
    top1 = {name: p.argmax(-1) for name, p in probs.items()}
    print(f"{len(images)} images of {a.data}")
    for name, p in probs.items():
        agree = " ".join(f"{other} {(top1[name] == top1[other]).float().mean():.2f}"
                         for other in probs if other != name)
        print(f"{name}: mean top-1 probability {p.max(-1).values.mean():.3f}; top-1 agreement: {agree}")


if __name__ == "__main__":
    main()
