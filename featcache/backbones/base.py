"""The two interfaces every backbone implements; the seam between featcache and heads.

Like timm's `forward_features`, a backbone returns what the heads consume and nothing more:

    TextEncoder.forward_features(batch)  -> {"tokens": (B, L, D), "mask": (B, L) bool, "pooled": (B, Dp)}
    ImageEncoder.forward_features(pixels) -> {"tokens": (B, P, D), "pooled": (B, Dp)}

Text encoders are also split at a layer boundary for stage 2 (`embed` -> `run_blocks` -> `forward_layers(h, batch,
k)`, with h the states entering block k: the cache's `start_layer`), and expose their transformer blocks through a table
of attribute paths so `lock(text_layers)` can freeze everything but the top N, as open_clip's
HFTextEncoder.lock does.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


def get_attr_path(module: nn.Module, path: str):
    """`module.a.b.c` from "a.b.c"; raise naming the missing attribute (no silent fallback)."""
    obj = module
    for part in path.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"{type(module).__name__} has no attribute '{path}' (missing '{part}'); "
                                 "the layer table of this backbone does not match the model")
        obj = getattr(obj, part)
    return obj


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)


class TextEncoder(nn.Module):
    """Subclasses set: token_dim, pooled_dim, max_len, num_layers, layer_table (dict of attribute paths)."""

    token_dim: int
    pooled_dim: int
    max_len: int
    num_layers: int
    # "layers": the ModuleList of blocks; "post": modules after the last block (final norm, projection)
    layer_table: dict[str, str | tuple[str, ...]] = {}
    # Whether `tokenize` takes (text, second segment) pairs through the tokenizer's pair input (HF: text_pair);
    # otherwise featcache.text_tower.text_inputs joins the two as captions are appended.
    pair_input: bool = False

    def tokenize(self, texts: list) -> dict[str, torch.Tensor]:
        """input_ids / attention_mask for `texts`: strings, or (text, second segment) pairs when pair_input."""
        raise NotImplementedError

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hidden states entering block 0."""
        raise NotImplementedError

    def run_block(self, block: nn.Module, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def run_blocks(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor], start: int, stop: int) -> torch.Tensor:
        """The states entering block `stop`, from `hidden`, those entering block `start` (stage 2 runs the frozen
        blocks between the stored states and the unfrozen ones with this)."""
        for block in list(self.layers())[start:stop]:
            hidden = self.run_block(block, hidden, batch)
        return hidden

    def finish(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict:
        """Final norm / pooling / projection after the last block -> tokens, mask, pooled."""
        raise NotImplementedError

    def forward_layers(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor], first_block: int = 0,
                       start_layer: int | None = None) -> dict:
        """Run blocks first_block..end and `finish` on `hidden`, the states entering block `first_block` (stage 2
        passes the cache's start_layer here: `heads finetune` runs only the top blocks on the stored states).

        With start_layer=k the result also holds "hidden": the states entering block k, which is what the
        cache stores for stage 2 (text_hidden/states).
        """
        kept = hidden if start_layer == first_block else None
        for i, block in enumerate(list(self.layers())[first_block:], start=first_block):
            hidden = self.run_block(block, hidden, batch)
            if start_layer == i + 1:
                kept = hidden
        out = self.finish(hidden, batch)
        if start_layer is not None:
            out["hidden"] = kept
        return out

    def forward_features(self, batch: dict[str, torch.Tensor], start_layer: int | None = None) -> dict:
        return self.forward_layers(self.embed(batch), batch, 0, start_layer)

    def layers(self) -> nn.ModuleList:
        return get_attr_path(self, self.layer_table["layers"])

    def lock(self, text_layers: int = 0) -> None:
        """Freeze all but the top `text_layers` blocks (and the post-block modules when any is unlocked).

        Idempotent: calling it again with another N sets exactly that state.
        """
        layers = self.layers()
        if not 0 <= text_layers <= len(layers):
            raise ConfigError(f"text_layers={text_layers} but the model has {len(layers)} layers")
        for p in self.parameters():
            p.requires_grad_(False)
        if text_layers == 0:
            return
        for block in list(layers)[len(layers) - text_layers:]:
            for p in block.parameters():
                p.requires_grad_(True)
        for path in self.layer_table.get("post", ()):
            obj = get_attr_path(self, path)
            params = obj.parameters() if isinstance(obj, nn.Module) else [obj]
            for p in params:
                p.requires_grad_(True)


DECODE_MIN = 256  # px: JPEGs of 224 px models decode at reduced scale down to this short side, not below


class ImageEncoder(nn.Module):
    """Subclasses set: token_dim, pooled_dim, num_patches, image_size, and `transform` (PIL -> tensor)."""

    token_dim: int
    pooled_dim: int
    num_patches: int
    image_size: int

    def transform(self, img):
        raise NotImplementedError

    def pixel_transform(self):
        """`transform` as a callable that does not hold the model: what DataLoader workers receive. A bound
        method pickles its whole module (weights, on the GPU too) into every worker under the spawn and
        forkserver start methods (the default from Python 3.14)."""
        return self.transform

    def decode_side(self) -> int:
        """The smallest short side (px) a JPEG may be decoded at (featcache.sources.images.load_rgb's draft): the
        side the transform resizes to, and never below DECODE_MIN, what every cache at 224 px was decoded at."""
        return max(DECODE_MIN, self.image_size)

    def forward_features(self, pixels: torch.Tensor) -> dict:
        raise NotImplementedError


def budget_grid(grid: tuple[int, int], max_tokens: int) -> tuple[int, int]:
    """The largest (h, w) of the grid's aspect with h * w <= max_tokens (the grid itself when it fits)."""
    h, w = grid
    if h * w <= max_tokens:
        return h, w
    scale = (max_tokens / (h * w)) ** 0.5
    h2, w2 = max(1, int(h * scale)), max(1, int(w * scale))
    while h2 * w2 > max_tokens:  # rounding can overshoot by a row
        h2, w2 = (h2 - 1, w2) if h2 >= w2 else (h2, w2 - 1)
    return h2, w2


def pool_tokens(tokens: torch.Tensor, grid: tuple[int, int], out: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, D) patch tokens -> (B, out_h*out_w, D) by adaptive average pooling on the 2-D grid."""
    b, p, d = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, d, *grid)
    return nn.functional.adaptive_avg_pool2d(x, out).flatten(2).transpose(1, 2)


class BudgetedImage(ImageEncoder):
    """An image encoder whose patch tokens are pooled to at most `max_tokens` (--max-image-tokens). Prefix/CLS
    tokens are never among the stored tokens (every family drops them), so only the patch grid is pooled;
    pooled (the image embedding) is untouched."""

    def __init__(self, inner: ImageEncoder, max_tokens: int):
        super().__init__()
        self.inner = inner
        side = int(round(inner.num_patches ** 0.5))
        self.grid = tuple(getattr(inner, "grid", ()) or ()) or (side, side)
        if self.grid[0] * self.grid[1] != inner.num_patches:
            raise ConfigError(f"--max-image-tokens: {inner.num_patches} image tokens are not a known 2-D grid")
        self.out = budget_grid(self.grid, max_tokens)
        self.num_patches = self.out[0] * self.out[1]
        self.token_dim, self.pooled_dim, self.image_size = inner.token_dim, inner.pooled_dim, inner.image_size

    def transform(self, img):
        return self.inner.transform(img)

    def pixel_transform(self):
        return self.inner.pixel_transform()

    def decode_side(self) -> int:
        return self.inner.decode_side()

    def forward_features(self, pixels):
        out = self.inner.forward_features(pixels)
        if self.out != self.grid:
            out = {**out, "tokens": pool_tokens(out["tokens"], self.grid, self.out)}
        return out
