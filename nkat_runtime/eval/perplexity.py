"""Perplexity by llama.cpp's ``llama-perplexity`` method.

Tokenise the text (BOS per the model's ``add_bos_token``), cut it into chunks of
``n_ctx`` tokens, evaluate each chunk from an empty cache (its first token replaced by BOS
when the model adds one), and score only the second half of each chunk: the logits at
positions ``n_ctx/2 … n_ctx-2`` against the next tokens. The ± figure is llama.cpp's:
``sqrt((mean(nll²) - mean(nll)²) / (count - 1)) · ppl``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..loader import LoadedModel


@dataclass
class PerplexityResult:
    ppl: float
    ppl_error: float
    n_ctx: int
    n_chunks: int
    n_tokens_scored: int
    n_tokens_text: int  # tokens of the text tokenised (the chunks' share of it when a chunk count is given)
    running: list[float] = field(default_factory=list)  # ppl after each chunk, as llama.cpp prints
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.n_chunks * self.n_ctx / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "perplexity": self.ppl,
            "perplexity_error": self.ppl_error,
            "n_ctx": self.n_ctx,
            "chunks": self.n_chunks,
            "tokens_scored": self.n_tokens_scored,
            "tokens_in_text": self.n_tokens_text,
            "running": self.running,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second,
        }


def chunk_nll(lm: LoadedModel, chunk: Sequence[int]) -> torch.Tensor:
    """Negative log-likelihoods [n_ctx - 1 - n_ctx/2] of the second half of one chunk."""
    n_ctx = len(chunk)
    first = n_ctx // 2
    tokens = torch.tensor([list(chunk)], dtype=torch.long, device=lm.device)
    logits = lm.model(tokens, torch.arange(n_ctx, device=lm.device), logits_from=first)[0]  # [n_ctx-first, V]
    logits = logits[:-1].double()
    targets = tokens[0, first + 1 :]
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(1, targets.unsqueeze(1)).squeeze(1).cpu()


def perplexity(
    lm: LoadedModel,
    text: str,
    n_ctx: int = 512,
    n_chunks: int | None = None,
    on_chunk: Callable[[int, float], None] | None = None,
) -> PerplexityResult:
    """Perplexity of ``text`` by the llama.cpp method; ``on_chunk(i, running_ppl)`` after each chunk.

    With ``n_chunks`` only as much of the text is tokenised as the chunks need (see
    :func:`leading_tokens`): the same ids as the whole text's first ones.
    """
    if n_chunks is not None and n_chunks > 0:
        ids = leading_tokens(lm.tokenizer, text, n_chunks * n_ctx)
    else:
        ids = lm.tokenizer.encode(text, add_special=True)
    return perplexity_of_tokens(lm, ids, n_ctx, n_chunks, on_chunk)


def leading_tokens(tokenizer, text: str, n: int, chars_per_token: int = 8) -> list[int]:
    """The first ``n`` ids (at least; fewer when the text has fewer) of ``encode(text, add_special=True)``,
    tokenising only a prefix of ``text``.

    A prefix tokenises like the whole text except near its cut. A prefix is taken when its first
    ``n`` ids equal those of a prefix twice as long (the cut then changed nothing before them);
    the prefix grows until they do, up to the whole text.
    """
    size = max(1024, n * chars_per_token)
    ids = tokenizer.encode(text[:size], add_special=True)
    while size < len(text):
        longer = tokenizer.encode(text[: 2 * size], add_special=True)
        if len(ids) > n and ids[:n] == longer[:n]:
            return ids
        size, ids = 2 * size, longer
    return ids


def eval_chunk(tokenizer, ids: Sequence[int], n_ctx: int, i: int) -> list[int]:
    """Chunk ``i`` of ``n_ctx`` tokens of ``ids``, its first token replaced by BOS when the model
    adds one (llama.cpp's rule: every chunk is evaluated from an empty cache)."""
    chunk = list(ids[i * n_ctx : (i + 1) * n_ctx])
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        chunk[0] = tokenizer.bos_id
    return chunk


def perplexity_of_tokens(
    lm: LoadedModel,
    ids: Sequence[int],
    n_ctx: int = 512,
    n_chunks: int | None = None,
    on_chunk: Callable[[int, float], None] | None = None,
) -> PerplexityResult:
    """The same on an already tokenised text (``ids`` as ``encode(text, add_special=True)``)."""
    if n_ctx < 4 or n_ctx % 2:
        raise ValueError("n_ctx must be an even number >= 4")
    if n_ctx > lm.context:
        raise ValueError(f"n_ctx {n_ctx} is larger than the model's allocated context {lm.context}")
    tok = lm.tokenizer
    available = len(ids) // n_ctx
    if available == 0:
        raise ValueError(f"the text has {len(ids)} tokens; at least {n_ctx} are needed for one chunk")
    chunks = available if n_chunks is None or n_chunks <= 0 else min(n_chunks, available)
    nll_sum = nll2_sum = 0.0
    count = 0
    running: list[float] = []
    t0 = time.perf_counter()
    for i in range(chunks):
        nll = chunk_nll(lm, eval_chunk(tok, ids, n_ctx, i))
        nll_sum += float(nll.sum())
        nll2_sum += float((nll * nll).sum())
        count += nll.numel()
        running.append(math.exp(nll_sum / count))
        if on_chunk is not None:
            on_chunk(i, running[-1])
    seconds = time.perf_counter() - t0
    mean = nll_sum / count
    var = nll2_sum / count - mean * mean
    ppl = math.exp(mean)
    err = math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else 0.0
    return PerplexityResult(ppl, err, n_ctx, chunks, count, len(ids), running, seconds)
