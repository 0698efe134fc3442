"""The cache in memory (cache.py) and the train/validation/test splits of its rows (splits.py)."""
