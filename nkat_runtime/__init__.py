"""NKAT runtime: GGUF / .nkat models in pure PyTorch."""

__version__ = "0.1.0"
