"""Extraction: dataset -> backbones -> cache, in one process, one shard or one torchrun rank.

`featcache.extract(DATA, out=..., backbone=...)` is its Python entry (featcache.extract.api.extract, for notebooks:
no subprocess). The package itself is that callable, so its submodules (featcache.extract.engine, .config, ...)
keep their import paths; a function of the same name in featcache/__init__.py would be replaced by this package
the first time any of them is imported.
"""
import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from .api import extract  # heavy (torch, the backbones) only when called: importing the package stays light
        return extract(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
