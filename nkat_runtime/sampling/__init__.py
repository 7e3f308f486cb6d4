"""Sampling: the settings (no torch) and the chain over one row of logits."""
