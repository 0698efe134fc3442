"""Augmented image views for the cache (`featcache extract --image-views K --image-aug weak|strong`).

Training a head on features of one fixed crop per image overfits quickly; re-running the image backbone on
fresh augmentations every epoch is exactly the cost the cache exists to avoid. Tip-Adapter's answer is ours:
run the backbone on K augmented views once, store them next to the clean features, and let heads draw one
stored view per sample per epoch.

A view is a PIL -> PIL policy applied *before* the backbone's own transform, so it works for every image
backbone: the random crop keeps the image's size (the backbone then resizes and crops as it always does).
Each view is seeded by (seed, guid, view), never by the order of processing, so views are identical
whatever the batch size, worker count, resume point or shard.

    weak    RandomResizedCrop(scale 0.7-1.0) + horizontal flip + light colour jitter + occasional blur
    strong  weak + RandAugment(num_ops=2, magnitude=9)
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

from ..registry import Registry


@dataclass(frozen=True)
class AugSpec:
    name: str
    description: str
    rand_augment: bool  # add RandAugment(2, 9) after the weak policy


AUGMENTATIONS: Registry[AugSpec] = Registry("image augmentation")
for _spec in (AugSpec("weak", "RandomResizedCrop 0.7-1.0, flip, light colour jitter, blur p=0.2", False),
              AugSpec("strong", "weak + RandAugment(2, 9)", True)):
    AUGMENTATIONS.add(_spec.name, _spec)


def get_aug_spec(name: str) -> AugSpec:
    return AUGMENTATIONS.get(name)


def build_policy(name: str) -> Callable:
    """PIL image -> augmented PIL image of the same size (draws from torch's global RNG)."""
    from torchvision import transforms as T  # heavy: only where views are made (the DataLoader workers)

    spec = get_aug_spec(name)
    colour = [T.RandomHorizontalFlip(),
              T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
              T.RandomApply([T.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=0.2)]
    extra = [T.RandAugment(num_ops=2, magnitude=9)] if spec.rand_augment else []

    def policy(img):
        crop = T.RandomResizedCrop((img.height, img.width), scale=(0.7, 1.0), antialias=True)
        return T.Compose([crop, *colour, *extra])(img)
    return policy


def view_seed(seed: int, guid: str, view: int) -> int:
    return zlib.crc32(f"{seed}:{guid}:{view}".encode("utf-8"))


class ViewMaker:
    """Makes the K augmented views of one image, each under its own seed; the global RNG is left untouched."""

    def __init__(self, views: int, aug: str, seed: int):
        get_aug_spec(aug)  # fail on an unknown name before any work
        self.views, self.aug, self.seed = views, aug, seed
        self._policy = None

    def __call__(self, img, guid: str) -> list:
        import torch  # heavy: featcache.sources is imported by light commands (`featcache info`, merge)
        if self._policy is None:  # built lazily: in the DataLoader worker, not pickled to it
            self._policy = build_policy(self.aug)
        out = []
        for k in range(1, self.views + 1):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(view_seed(self.seed, guid, k))
                out.append(self._policy(img))
        return out
