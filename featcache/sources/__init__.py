"""Dataset readers and what they share: samples and problems (base), images, tweet text, augmented views.

Every module of this package is imported here, so each reader registers itself (`@READERS.register(name)`
in its own module, READERS in featcache.sources.base) and a new dataset format is one new file. The helper
modules are light to import: torch is imported only where augmented views are made.
"""
from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
