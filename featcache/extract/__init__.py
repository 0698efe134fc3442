"""Extraction: dataset -> backbones -> cache, in one process, one shard or one torchrun rank."""
