"""Constrained output: GBNF grammars, JSON schemas, Lark and regexes, by llguidance.

llguidance (the grammar engine of llama.cpp's optional backend and of TabbyAPI) computes, after
each token, the set of tokens that keep the output inside the grammar; the sampler only sees
those (the others' logits become -inf). A grammar that is complete leaves only the end token, so
the generation stops there; a grammar that cannot be completed within the length limit ends
with ``finish_reason: "length"`` like any other output.

:class:`GrammarCompiler` is made once per model (its token table is the model's vocabulary, as
bytes); :meth:`GrammarCompiler.compile` checks a request's grammar (a clear error for a bad one)
and returns a factory of :class:`Constraint` objects, one per generated sequence.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from ..errors import InvalidRequestError
from .params import GrammarSpec

log = logging.getLogger(__name__)


class _Vocabulary:
    """What llguidance's ``TokenizerWrapper`` reads: every token's bytes, the end token, a tokenizer."""

    def __init__(self, tokenizer: Any, n_vocab: int) -> None:
        n = tokenizer.vocab_size
        self.tokens = [tokenizer.token_bytes(i) for i in range(n)] + [b""] * max(0, n_vocab - n)
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = [i for i in range(n) if tokenizer.is_special(i)]
        self._encode = tokenizer.encode

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._encode(text, add_special=False, space_prefix=False)  # text continuing the output


class Constraint:
    """One sequence's position in its grammar: the allowed next tokens, and the tokens taken."""

    def __init__(self, matcher: Any, n_vocab: int) -> None:
        self.matcher, self.n_vocab = matcher, n_vocab
        self.words = (n_vocab + 31) // 32
        self._bits = torch.arange(32, dtype=torch.int32)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [V] with every token the grammar does not allow next set to -inf (a copy)."""
        bitmask = self.matcher.compute_bitmask()  # bytes: one bit per token, little-endian int32 words
        words = torch.frombuffer(bytearray(bitmask), dtype=torch.int32)[: self.words]
        allowed = ((words.unsqueeze(1) >> self._bits) & 1).flatten()[: logits.shape[-1]].bool()
        out = logits.clone()
        out[~allowed] = float("-inf")
        return out

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token} it had allowed: {self.matcher.get_error()}")

    def rollback(self, n: int) -> None:
        if n > 0:
            self.matcher.rollback(n)

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more (the generation ends here)."""
        return bool(self.matcher.is_stopped())


class GrammarCompiler:
    """Grammars for one model's vocabulary (llguidance's token table is built on first use)."""

    def __init__(self, tokenizer: Any, n_vocab: int) -> None:
        self.tokenizer, self.n_vocab = tokenizer, n_vocab
        self._lltok: Any = None

    def _llguidance(self) -> Any:
        if self._lltok is None:
            import llguidance

            self._lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(self.tokenizer, self.n_vocab)))
        return self._lltok

    def compile(self, spec: GrammarSpec) -> Callable[[], Constraint]:
        """Check ``spec`` and return a maker of fresh constraints; a bad grammar is a 400."""
        import llguidance

        try:
            grammar = llguidance.grammar_from(spec.kind, spec.text)
        except (ValueError, RuntimeError) as exc:
            raise InvalidRequestError(f"invalid {spec.kind} in '{spec.field}': {_first_line(exc)}", spec.field) from None
        lltok = self._llguidance()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
        if is_error:
            text = "; ".join(str(m) for m in messages)[:500]
            raise InvalidRequestError(f"invalid {spec.kind} in '{spec.field}': {text}", spec.field)
        n_vocab = self.n_vocab

        def make() -> Constraint:
            matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
            if matcher.is_error():
                raise InvalidRequestError(f"invalid {spec.kind} in '{spec.field}': {matcher.get_error()}", spec.field)
            return Constraint(matcher, n_vocab)

        return make


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
