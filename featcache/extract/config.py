"""What `featcache extract` is asked to do: one dataclass, built by the CLI from its options.

Its own module because every step of extraction reads it (plan, engine, forward, launch) and none of them
should import another just for the type.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..backbones.registry import DEFAULT_BACKBONE
from ..errors import ConfigError
from ..sources.images import DEFAULT_MAX_PIXELS


@dataclass
class ExtractConfig:
    data: str
    format: str = "auto"  # a featcache.sources READERS name, or auto: detected from the files (detect_format)
    # The reader's own options (twitter: images; manifest: id_column, text_column, ...); None values are unset.
    reader_options: dict = field(default_factory=dict)
    backbone: str = DEFAULT_BACKBONE
    captions: str | None = None  # a captioner name (blip-base) or None
    caption_mode: str = "store"  # store: strings only | append: encode "text [SEP] caption"
    out: str | None = None
    clean_text: bool = False
    max_text_len: int = 64
    text_layers: int = 0  # also keep the hidden states entering the top N text layers
    image_views: int = 0  # K augmented views per image stored next to the clean features (sources/augment.py)
    image_aug: str = "weak"  # weak | strong: the policy of those views
    aug_seed: int = 0  # views are seeded by (aug_seed, guid, view)
    batch_size: int = 32  # 0 = auto (the CLI's default): 32 on CPU, 128 on CUDA (auto_batch_size)
    # Image backbone calls per batch, in chunks of this many images (0 = auto: 2-4 on CPU, see
    # featcache.extract.forward.cpu_image_micro; the whole batch on CUDA). Text prefers whole batches.
    image_micro_batch: int = 0
    workers: int = -1  # -1: auto (cores beyond the two the backbone uses, at most 4)
    # auto: on CPU without workers, the image tower runs in a second thread while this one decodes and runs the
    # text tower, each with half the threads (featcache.extract.forward.ImageLane); on | off force it (a
    # captioner always runs serially).
    overlap: str = "auto"
    limit: int | None = None
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    device: str = "auto"
    max_image_tokens: int = 0  # pool the patch grid to at most this many tokens (0: every patch, as always)
    image_size: int = 0  # the image backbone's input in px, square (timm CNNs: more patches); 0 = its own size
    text_pooling: str = ""  # cls | mean: overrides an hf: text backbone's pooling ("" = its own)
    text_weights: str | None = None
    image_weights: str | None = None
    caption_weights: str | None = None
    shard: str | None = None  # "I/N": only rows of shard I (zero-based) of N, into their own file (shards.py)
    no_text: bool = False  # the cache keeps features, ids, labels and splits, not the posts' texts
    # Only the rows of these splits (`--split test`: the 511 unlabelled MVSA pairs, not all 3710); () = every
    # row. Not in preprocessing(): the dataset fingerprint (over the rows kept) already keys the selection.
    splits: tuple[str, ...] = ()

    @classmethod
    def like(cls, recorded: dict, data: str, **options) -> "ExtractConfig":
        """The extraction that reproduces the features of a cache on other data: backbones and preprocessing
        from `recorded` (a cache's meta, or the part a heads run keeps of it in cache.json), `options` for the
        rest (format, splits, out, text_layers, device, ...). Its weights: see `recorded_weights`."""
        prep, backbone = recorded.get("preprocessing") or {}, recorded.get("backbone") or {}
        if not backbone.get("name"):
            raise ConfigError("the features were recorded without their backbone name (cache meta 'backbone'); "
                              "they cannot be reproduced: extract the data by hand with the same --backbone")
        same = dict(backbone=backbone["name"], captions=prep.get("captions"),
                    caption_mode=prep.get("caption_mode") or "store", clean_text=bool(prep.get("clean_text")),
                    max_text_len=prep.get("max_text_len") or 64,
                    max_image_pixels=prep.get("max_image_pixels") or DEFAULT_MAX_PIXELS,
                    max_image_tokens=prep.get("max_image_tokens") or 0, text_pooling=prep.get("text_pooling") or "",
                    image_size=prep.get("image_size") or 0)
        return cls(data=data, **same, **options)


    def precision(self) -> str:
        """fp16 when extraction runs on CUDA (autocast), else fp32: the device matters only through this."""
        # heavy: torch, only to resolve the device (this module is imported by light code)
        from ..device import compute_precision, resolve_device
        return compute_precision(resolve_device(self.device))

    def preprocessing(self) -> dict:
        """What changes the features (and so the cache key); batch size, workers and the device (apart from
        its precision: fp16 on CUDA, recorded only then so CPU keys stay what they were) do not."""
        precision = self.precision()
        return {"clean_text": self.clean_text, "max_text_len": self.max_text_len, "captions": self.captions,
                "caption_mode": self.caption_mode if self.captions else None, "text_layers": self.text_layers,
                "max_image_pixels": self.max_image_pixels, "limit": self.limit,
                # only with views, so that caches without them keep the keys they always had
                **({"image_views": self.image_views, "image_aug": self.image_aug, "aug_seed": self.aug_seed}
                   if self.image_views else {}),
                # only when set: other keys stay as they were
                **({"no_text": True} if self.no_text else {}),
                **({"max_image_tokens": self.max_image_tokens} if self.max_image_tokens else {}),
                **({"image_size": self.image_size} if self.image_size else {}),
                **({"text_pooling": self.text_pooling} if self.text_pooling else {}),
                **({"precision": precision} if precision != "fp32" else {})}


def recorded_weights(recorded: dict) -> dict[str, str]:
    """role -> the sha256 of the weights that made the features (`extract(..., expect_weights=...)`), from a
    cache's meta (weights.ROLE.sha256) or a heads run's cache.json (signature.weights)."""
    weights = (recorded.get("signature") or {}).get("weights") or {
        role: w.get("sha256") for role, w in (recorded.get("weights") or {}).items()}
    return {role: sha for role, sha in weights.items() if sha}


CPU_BATCH, CUDA_BATCH = 32, 128


def auto_batch_size(cfg: ExtractConfig) -> int:
    """cfg.batch_size, or for 0 the default of the device: 32 rows on the CPU (what every cache so far used; the
    towers run there in small chunks anyway), 128 on CUDA (fewer, larger kernel launches and syncs per row)."""
    if cfg.batch_size > 0:
        return cfg.batch_size
    return CUDA_BATCH if cfg.precision() == "fp16" else CPU_BATCH
