"""Training: the small trainer (loop.py), losses, optimiser, metrics, bias tuning, stage 1, stage 2, the probe."""
