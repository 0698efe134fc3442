"""Opening untrusted images: size check before decoding, every mode to 8-bit RGB, a named problem otherwise.

`load_rgb` never raises for a bad file: it returns (image or None, notes). A note is a short sentence a
user can act on; `fatal` tells whether the sample is unusable (missing, empty, corrupt, truncated,
too large) or was repaired (odd mode, wrong extension), in which case it is still used.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile

# A truncated JPEG must be an error, not a half-grey picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# We enforce our own limit (before decoding) and report it; PIL's own bomb check would only warn or raise later.
Image.MAX_IMAGE_PIXELS = None

DEFAULT_MAX_PIXELS = 40_000_000  # 40 MP: larger than any real tweet photo, far below a decompression bomb.

_EXT_FORMAT = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".webp": "WEBP", ".bmp": "BMP"}


@dataclass(frozen=True)
class ImageNote:
    kind: str  # missing | empty | corrupt | truncated | too_large | mode | format
    message: str
    fatal: bool


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; alpha is composited on white (a transparent logo is not black)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit grey: rescale to the full 8-bit range instead of clipping everything to white.
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None):
    """Open `path` as RGB. Returns (PIL image or None, list[ImageNote]).

    draft_size lets JPEG decode at a reduced scale (DCT scaling) when the model only needs ~224 px:
    several times faster on large photos and identical in what the model sees after resizing.
    """
    notes: list[ImageNote] = []
    name = os.path.basename(path)
    if not os.path.exists(path):
        return None, [ImageNote("missing", f"{name}: image file not found", True)]
    if os.path.getsize(path) == 0:
        return None, [ImageNote("empty", f"{name}: image file is empty (0 bytes)", True)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF / ICC chatter; real failures raise below
            img = Image.open(path)
            fmt = img.format
            w, h = img.size
            if w * h > max_pixels:
                img.close()
                return None, [ImageNote("too_large", f"{name}: {w}x{h} pixels exceeds the limit of "
                                        f"{max_pixels:,} (decompression-bomb guard; raise --max-image-pixels "
                                        f"if the image is genuine)", True)]
            expected = _EXT_FORMAT.get(os.path.splitext(path)[1].lower())
            if expected and fmt and fmt != expected and not (fmt == "MPO" and expected == "JPEG"):
                notes.append(ImageNote("format", f"{name}: file is {fmt}, not {expected} as its name says "
                                       f"(decoded as {fmt})", False))
            mode = img.mode
            if draft_size and fmt == "JPEG" and mode in ("RGB", "L", "CMYK"):
                img.draft(mode, (draft_size, draft_size))
            img.load()
    except Exception as exc:  # PIL raises many types: UnidentifiedImageError, OSError, SyntaxError, ...
        text = str(exc)
        if "truncated" in text or "broken data stream" in text or "image file is incomplete" in text:
            return None, notes + [ImageNote("truncated", f"{name}: image data is truncated ({text})", True)]
        return None, notes + [ImageNote("corrupt", f"{name}: cannot decode image ({type(exc).__name__}: {text})", True)]
    if mode != "RGB":
        notes.append(ImageNote("mode", f"{name}: image mode {mode} converted to RGB", False))
    try:
        return _to_rgb(img), notes
    except Exception as exc:
        return None, notes + [ImageNote("corrupt", f"{name}: cannot convert mode {mode} to RGB ({exc})", True)]
