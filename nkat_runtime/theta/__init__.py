"""θ: the factors, their SVDs, the .nkat converter and the auto-optimiser."""
