"""The cache in memory (cache.py), the splits of its rows (splits.py) and stage 2's text inputs (text_layers.py)."""
from .cache import CacheData, DataError, load_cache
from .splits import Split, SplitConfig, split_labelled

__all__ = ["CacheData", "DataError", "Split", "SplitConfig", "load_cache", "split_labelled"]
