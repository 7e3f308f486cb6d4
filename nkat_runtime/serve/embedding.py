"""Embeddings from a generative model, as llama.cpp's ``--embeddings --pooling mean|last`` gives
them: the final norm's hidden states of the input's tokens, pooled (the mean over the tokens, or
the last token's), L2-normalised.

An input is computed in the engine thread between decode steps, through a block table taken from
the shared pool for it alone and given back at once (so it never meets a slot's cache), in
chunks of the scheduler's prefill size.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import InvalidRequestError, ServerBusyError
from .block_pool import NoBlocks
from .scheduler import PREFILL_CHUNK, Scheduler

POOLINGS = ("mean", "last")


@torch.inference_mode()
def embed(sched: Scheduler, ids: Sequence[int], pooling: str = "mean", normalize: bool = True) -> list[float]:
    """The pooled embedding of one token sequence."""
    if pooling not in POOLINGS:
        raise InvalidRequestError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    n = len(ids)
    if n == 0:
        raise InvalidRequestError("an embedding input is empty (no tokens)")
    if n > sched.lm.context:
        raise InvalidRequestError(f"an embedding input has {n} tokens; the context holds {sched.lm.context}")
    model, dev = sched.lm.model, sched.lm.device
    table: list[int] = []
    try:
        try:
            sched.pool.writable(table, 0, n)
        except NoBlocks:
            raise ServerBusyError("the KV pool has no room for this input now; try again") from None
        total, last = None, None
        toks = torch.tensor([list(ids)], dtype=torch.long, device=dev)
        for start in range(0, n, PREFILL_CHUNK):
            stop = min(n, start + PREFILL_CHUNK)
            h = model(toks[:, start:stop], torch.arange(start, stop, device=dev), tables=[table], hidden=True)[0]
            h = h.float()
            total = h.sum(0) if total is None else total + h.sum(0)
            last = h[-1]
        assert total is not None and last is not None
        vec = total / n if pooling == "mean" else last
        if normalize:
            vec = vec / vec.norm().clamp_min(1e-12)
        return vec.cpu().tolist()
    finally:
        sched.pool.release(table)
