"""Dataset readers and what they share: samples, problems and the reader registry (base), the helpers of the
readers (common), images, tweet text, augmented views.

Each reader registers itself where it is defined (`@READERS.register(name)` on a DatasetReader in its own
module, READERS in featcache.sources.base); the imports below load them, in the order `featcache formats`
lists them. A new dataset format is one new file and one name on that line. The modules are light to import:
torch is imported only where augmented views are made.
"""
from __future__ import annotations

from . import mvsa, mvsa_single, mvsa_multiple, twitter, hateful_memes, table  # noqa: F401  isort: skip
from .base import READERS, Dataset, DatasetReader, Problem, Sample, detect_format, read_dataset

__all__ = ["READERS", "Dataset", "DatasetReader", "Problem", "Sample", "detect_format", "read_dataset"]
