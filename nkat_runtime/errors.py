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


class InvalidRequestError(NKATError, ValueError):
    """A generation/tokenization request that cannot be served as given (bad field, empty prompt...).

    ``param`` names the offending field when there is one.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """The prompt does not fit the context (and the request asked not to cut it)."""

    def __init__(self, message: str, n_prompt_tokens: int, n_ctx: int) -> None:
        super().__init__(message, "prompt")
        self.n_prompt_tokens, self.n_ctx = n_prompt_tokens, n_ctx


class RequestNotSupportedError(InvalidRequestError):
    """A request asks for a feature this server does not implement (grammar, images, tools...)."""


class ServerBusyError(NKATError):
    """The generation queue is full; the client should retry later."""
