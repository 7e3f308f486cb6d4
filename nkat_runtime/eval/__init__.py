"""Measurements on real runs: perplexity and timing."""
