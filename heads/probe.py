"""Transitional: the report modules (moved by another branch) still import PROBE_NAME from here; the merge
repoints them to heads.train.probe and deletes this file."""
from .train.probe import PROBE_NAME

__all__ = ["PROBE_NAME"]
