"""Decode steps replayed as CUDA graphs: one graph per (batch bucket, table-width bucket).

A decode step launches a few hundred small kernels; at batch 1 on a fast GPU their launch
costs as much as the work (gpt-fast and nano-vllm capture the step for that reason). A graph
replays a fixed shape, so a step is padded to its bucket: the batch to the next of
:data:`BATCH_BUCKETS` (the padding rows feed token 0 at position 0 through a block held for them
alone, ``trash``, so they never touch a sequence's cache), and every table to the next power of
two of blocks (past a row's own blocks its table repeats its first block, masked). The step is
:meth:`DecoderModel.decode_padded`: device operations only, tables and positions as tensors.

What this costs: attention gathers each row's blocks into one padded tensor per layer (memory
and time grow with the bucket's width, not each row's length; a paged-attention kernel would read
the blocks in place), and graphs stay captured (their memory shared in one pool) for the
life of their :class:`DecodeGraphs`. Where no GPU is (``capture=False``) the same padded step runs eagerly,
which is how it is tested on the CPU; the graphs themselves are exercised by
``benchmarks/gpu_check.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from .decoder import DecoderModel
from .kv_cache import PaddedView

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
WARMUP = 2  # eager steps on a side stream before a capture (Triton compiles, cuBLAS picks its kernels)


def unsupported(model: DecoderModel, slots: int = 1) -> str | None:
    """Why this model's decode step, with up to ``slots`` sequences, cannot be captured (None: it can)."""
    from .moe import MoEFeedForward  # noqa: PLC0415 - only the check needs it

    if any(isinstance(m, MoEFeedForward) for m in model.modules()):
        return "mixture-of-experts routing reads the chosen experts back to the host"
    if slots > BATCH_BUCKETS[-1]:
        return f"{slots} slots are more than the largest graph bucket ({BATCH_BUCKETS[-1]})"
    return None


def bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"a decode batch of {n} is beyond the largest graph bucket ({buckets[-1]})")


def width(blocks: int, most: int) -> int:
    """The table width (in blocks) a row of ``blocks`` blocks is padded to: the next power of two,
    at most ``most``."""
    return min(most, 1 << max(0, blocks - 1).bit_length())


@dataclass
class _Step:
    tokens: torch.Tensor  # [Bb] static inputs
    pos: torch.Tensor  # [Bb]
    table: torch.Tensor  # [Bb, M]
    logits: torch.Tensor | None = None  # [Bb, V] the graph's output
    graph: "torch.cuda.CUDAGraph | None" = None


class DecodeGraphs:
    """Runs a decode batch through a padded step, captured as a CUDA graph per bucket (``capture``,
    the default on a CUDA device) or eagerly."""

    def __init__(self, model: DecoderModel, trash: int, capture: bool | None = None) -> None:
        assert model.kv is not None, "set up the KV pool first"
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"decode graphs: {reason}")
        self.model, self.trash = model, trash
        self.device = model.output_norm.weight.device
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.block_size = model.kv.block_size
        self.steps: dict[tuple[int, int], _Step] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    def __call__(self, tokens: Sequence[int], positions: Sequence[int], tables: Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits [B, V] of one decode step: ``tokens[b]`` at ``positions[b]`` of ``tables[b]``."""
        B, bs = len(tokens), self.block_size
        if max(positions) >= self.model.max_seq:
            raise ValueError(f"position {max(positions)} is beyond the cache ({self.model.max_seq} tokens)")
        counts = [p // bs + 1 for p in positions]
        key = (bucket(B, BATCH_BUCKETS), width(max(counts), self.model.row_blocks))
        rows = [list(t[:c]) + [t[0]] * (key[1] - c) for t, c in zip(tables, counts)]
        rows += [[self.trash] * key[1]] * (key[0] - B)
        tok = torch.tensor(list(tokens) + [0] * (key[0] - B), dtype=torch.long)
        pos = torch.tensor(list(positions) + [0] * (key[0] - B), dtype=torch.long)
        table = torch.tensor(rows, dtype=torch.long)
        if not self.capture:
            tok, pos, table = tok.to(self.device), pos.to(self.device), table.to(self.device)
            return self.model.decode_padded(tok, pos, PaddedView.of(table, pos, bs))[:B]
        step = self.steps.get(key)
        if step is None:
            try:
                step = self.steps[key] = self._capture(key)
            except Exception:  # noqa: BLE001 - decode goes on without graphs rather than fail each step
                log.exception("decode graph capture failed (batch %d, %d blocks); decoding without graphs", *key)
                self.capture = False
                return self(tokens, positions, tables)
        step.tokens.copy_(tok, non_blocking=True)
        step.pos.copy_(pos, non_blocking=True)
        step.table.copy_(table, non_blocking=True)
        assert step.graph is not None and step.logits is not None
        step.graph.replay()
        return step.logits[:B]

    def _capture(self, key: tuple[int, int]) -> _Step:
        Bb, M = key
        dev = self.device
        step = _Step(torch.zeros(Bb, dtype=torch.long, device=dev), torch.zeros(Bb, dtype=torch.long, device=dev),
                     torch.full((Bb, M), self.trash, dtype=torch.long, device=dev))

        def run() -> torch.Tensor:  # every row a padding row while capturing: writes land in the trash block
            return self.model.decode_padded(step.tokens, step.pos, PaddedView.of(step.table, step.pos, self.block_size))

        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                run()
        torch.cuda.current_stream(dev).wait_stream(side)
        step.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(step.graph, pool=self.pool):
            step.logits = run()
        log.info("decode graph captured: batch %d, %d blocks a row", Bb, M)
        return step
