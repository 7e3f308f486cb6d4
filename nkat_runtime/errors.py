"""Typed errors that reach a user.

Library code raises these; the edges (CLI ``main()`` functions, HTTP handlers) turn them
into one clear line with exit status 2, or a JSON error body.
"""

from __future__ import annotations


class NKATError(Exception):
    """Base class of every error NKAT reports to a user."""


class ModelFormatError(NKATError):
    """The file is not a (valid) GGUF / .nkat file: truncated, corrupt, wrong magic, ..."""


class UnsupportedError(NKATError):
    """A valid file that uses something this runtime does not implement (architecture, tensor type)."""


class TokenizerError(NKATError):
    """The tokenizer described in the GGUF metadata cannot be built or used."""


class ChatTemplateError(NKATError):
    """The chat template failed to render (syntax error, sandbox violation, raise_exception)."""


class ModelNotFoundError(NKATError):
    """A model path or alias that does not exist."""
