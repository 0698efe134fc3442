"""The decoding side of the extraction loop: rows of decoded, transformed images, batch by batch, from
DataLoader workers or from this thread while the image lane runs the image tower (featcache.extract.forward).

A row is (index, tensors or None, notes): the backbone's view, the captioner's view if any, then the augmented
views; None when the image failed (the loop then writes zeros and marks the row invalid).
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset as TorchDataset

from ..env import cpu_threads
from ..sources.images import load_rgb
from .forward import SHARED, ImageLane


class ImageRows(TorchDataset):
    """Runs in the workers: decode one image and apply the backbone's (and captioner's) transform; with
    views, also the backbone's transform of each augmented view (appended after the transforms' outputs)."""

    def __init__(self, paths, guids, transforms, max_pixels, draft, views=None, shared=frozenset()):
        self.paths, self.guids, self.transforms = paths, guids, transforms
        self.max_pixels, self.draft, self.views = max_pixels, draft, views
        self.shared = shared  # rows whose image an earlier row decodes (featcache.extract.shared)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        if i in self.shared:
            return i, SHARED, []
        img, notes = load_rgb(self.paths[i], self.max_pixels, draft_size=self.draft)
        if img is None:
            return i, None, notes
        out = [t(img) for t in self.transforms]
        if self.views is not None:
            out += [self.transforms[0](v) for v in self.views(img, self.guids[i])]
        return i, out, notes


def collate_rows(rows):
    return rows  # tensors are stacked in the main loop, where failed images become zero rows


MAX_CUDA_WORKERS = 16


def auto_workers(requested: int, device: torch.device | None = None) -> int:
    """--workers -1, counted on the CPUs this process may use (featcache.env.cpu_threads: cgroups, SLURM), not
    the machine's. CPU: the backbone keeps two cores (its two threads), workers decode on the rest; on 2 cores
    that is no worker (a worker stealing a core slowed the model more than serial decoding costs, ~5%). CUDA:
    the GPU runs the backbones and this process only feeds it, so every other CPU decodes, at least one (the
    image lane, which overlaps decoding on the CPU, is off on CUDA): decoding is what a GPU waits on."""
    if requested >= 0:
        return requested
    cpus = cpu_threads()
    if device is not None and device.type == "cuda":
        return max(1, min(MAX_CUDA_WORKERS, cpus - 1))
    return min(4, max(0, cpus - 2))


def loader_batches(rows: ImageRows, order: list[int], batch_size: int, workers: int):
    """Yield (batch, None): batches of rows `order`, decoded by `workers` DataLoader processes (0: this one)."""
    loader = DataLoader(torch.utils.data.Subset(rows, order), batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_rows, persistent_workers=False, prefetch_factor=4 if workers else None)
    for batch in loader:
        yield batch, None


def lane_batches(lane: ImageLane, rows: ImageRows, order: list[int], bs: int):
    """Yield (batch, image arrays) in order. This thread decodes batch b+1 (and the caller then runs the text
    tower on batch b and writes it) while the lane runs the image tower on batch b."""
    chunks = [order[k:k + bs] for k in range(0, len(order), bs)]
    pending = []
    for k, chunk in enumerate(chunks):
        batch = [rows[i] for i in chunk]  # (i, tensors or None, notes): what the DataLoader yields
        pending.append((batch, lane.submit(batch)))
        if k:
            done, image = pending.pop(0)
            yield done, image.result()
    for done, image in pending:
        yield done, image.result()
