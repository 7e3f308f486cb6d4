"""A decoder-only transformer whose quirks come from ``ModelConfig``.

The model sees token ids and positions, never sampling settings or HTTP. Prefill passes
the whole prompt at once; decode passes one token per sequence. The KV cache is a pool of
blocks (``model/kv_cache.py``) allocated by ``setup_caches``; each sequence of a forward pass
names its block table, or a cache row: row ``r``'s fixed table, for callers that need no pool
management (the perplexity tool, tests).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ..cache_types import REFERENCE_CACHE_TYPE
from .config import ModelConfig
from .kv_cache import DEFAULT_BLOCK_SIZE, BlockView, KVCache, KVPool, PaddedView
from .layers import Attention, FeedForward, RMSNorm, Rotary, attention_mask
from .linear import RowLocal
from .moe import MoEFeedForward


class WeightSource(Protocol):
    """Where the model gets its tensors (by GGUF name, without ``.weight``)."""

    def has(self, name: str) -> bool: ...

    def has_bias(self, name: str) -> bool: ...

    def vector(self, name: str) -> torch.Tensor: ...

    def embedding(self, name: str) -> nn.Module: ...  # token ids [B, T] -> vectors [B, T, D]

    def linear(self, name: str, bias: bool = False) -> nn.Module: ...

    def linear_rows(self, name: str, start: int, stop: int) -> nn.Module: ...  # part of a fused weight

    def tied_linear(self, name: str) -> nn.Module: ...  # the head sharing embedding ``name``


def feed_forward(cfg: ModelConfig, w: WeightSource, p: str) -> nn.Module:
    """Block ``p``'s FFN: gated, with gate and up apart or fused (phi3), or a mixture of experts."""
    if cfg.n_expert:  # each expert a gated FFN over its rows of the 3-D expert tensors
        ff, d = cfg.n_ff_expert, cfg.n_embd
        rows = lambda n, e, width: w.linear_rows(p + n, e * width, (e + 1) * width)  # noqa: E731
        experts = [FeedForward(rows("ffn_gate_exps", e, ff), rows("ffn_up_exps", e, ff), rows("ffn_down_exps", e, d),
                               cfg.act) for e in range(cfg.n_expert)]
        return MoEFeedForward(w.linear(p + "ffn_gate_inp"), experts, cfg.n_expert_used, cfg.expert_weights_scale)
    if cfg.fused_gate_up:  # phi3: gate rows, then up rows, in ffn_up
        gate, up = w.linear_rows(p + "ffn_up", 0, cfg.n_ff), w.linear_rows(p + "ffn_up", cfg.n_ff, 2 * cfg.n_ff)
    else:
        gate, up = w.linear(p + "ffn_gate"), w.linear(p + "ffn_up")
    return FeedForward(gate, up, w.linear(p + "ffn_down"), cfg.act)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, w: WeightSource) -> None:
        super().__init__()
        p = f"blk.{i}."
        norm = lambda n: RMSNorm(w.vector(p + n), cfg.rms_eps)  # noqa: E731
        self.is_swa = cfg.swa_layers[i]
        self.attn_norm = norm("attn_norm")
        # a bias is used where the file has one (llama files may carry all four, qwen2 has q/k/v)
        bias = lambda n: w.has_bias(p + n) or (cfg.qkv_bias and n != "attn_output")  # noqa: E731
        if w.has(p + "attn_qkv"):  # phi3: q, k and v rows in one tensor
            q_rows, kv_rows = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
            wq = w.linear_rows(p + "attn_qkv", 0, q_rows)
            wk = w.linear_rows(p + "attn_qkv", q_rows, q_rows + kv_rows)
            wv = w.linear_rows(p + "attn_qkv", q_rows + kv_rows, q_rows + 2 * kv_rows)
        else:
            wq, wk, wv = (w.linear(p + n, bias=bias(n)) for n in ("attn_q", "attn_k", "attn_v"))
        self.attn = Attention(
            wq,
            wk,
            wv,
            w.linear(p + "attn_output", bias=bias("attn_output")),
            cfg.n_head,
            cfg.n_head_kv,
            cfg.head_dim,
            cfg.attn_scale,
            rotary=None,  # type: ignore[arg-type]  # set by setup_caches
            q_norm=norm("attn_q_norm") if cfg.qk_norm else None,
            k_norm=norm("attn_k_norm") if cfg.qk_norm else None,
            softcap=cfg.attn_softcap,
        )
        self.post_attention_norm = norm("post_attention_norm") if cfg.post_norms else None
        self.ffn_norm = norm("ffn_norm")
        self.ffn = feed_forward(cfg, w, p)
        self.post_ffw_norm = norm("post_ffw_norm") if cfg.post_norms else None
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | list | None,
                view: BlockView | PaddedView) -> torch.Tensor:
        assert self.cache is not None, "call setup_caches() first"
        h = self.attn(self.attn_norm(x), pos, self.cache, mask, view)
        if self.post_attention_norm is not None:
            h = self.post_attention_norm(h)
        x = x + h
        h = self.ffn(self.ffn_norm(x))
        if self.post_ffw_norm is not None:
            h = self.post_ffw_norm(h)
        return x + h


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, w: WeightSource) -> None:
        super().__init__()
        self.config = cfg
        self.token_embd = w.embedding("token_embd")
        self.layers = nn.ModuleList(Block(cfg, i, w) for i in range(cfg.n_layer))
        self.output_norm = RMSNorm(w.vector("output_norm"), cfg.rms_eps)
        self.rope_freqs = w.vector("rope_freqs") if w.has("rope_freqs") else None
        self.rope_factors = {n: w.vector(f"rope_factors_{n}") for n in ("long", "short") if w.has(f"rope_factors_{n}")}
        if w.has("output"):  # as llama.cpp: a file's own head wins, also where the model ties it
            self.output = w.linear("output")
        else:
            self.output = w.tied_linear("token_embd")
        self.max_seq = 0
        self.max_batch = 0
        self.kv: KVPool | None = None
        self.row_blocks = 0
        self._decode_step = None

    def linear_modules(self) -> dict[str, nn.Module]:
        """The block linears by GGUF weight name (``blk.0.attn_q.weight`` → module)."""
        out: dict[str, nn.Module] = {}
        for i, layer in enumerate(self.layers):
            for mod in (layer.attn, layer.ffn):
                for attr in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
                    if hasattr(mod, attr):
                        out[f"blk.{i}.{attr}.weight"] = getattr(mod, attr)
        return out

    def replace_linear(self, name: str, module: nn.Module) -> nn.Module:
        """Put ``module`` where the block linear ``name`` (``blk.3.ffn_up.weight``) is; returns the old one."""
        parts = name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or not parts[1].isdigit():
            raise KeyError(f"not a block linear: {name}")
        layer = self.layers[int(parts[1])]
        parent = layer.attn if parts[2].startswith("attn") else layer.ffn
        old = getattr(parent, parts[2])
        setattr(parent, parts[2], module)
        if hasattr(parent, "group_theta"):  # θ over a shared input (q/k/v, gate/up) is grouped anew
            parent.group_theta()
        return old

    def set_batch_invariant(self, on: bool) -> int:
        """Batch-invariant decode on or off (see :mod:`.linear`); returns the layers it concerns."""
        layers = [m for m in self.modules() if isinstance(m, RowLocal)]
        for m in layers:
            m.row_local = on
        return len(layers)

    @property
    def batch_invariant(self) -> bool:
        """Whether every row-local layer computes its rows alone (``set_batch_invariant``), and no
        layer's rows depend on the batch anyway (``rows_alone = False``: the Triton kernels)."""
        return all(m.row_local if isinstance(m, RowLocal) else getattr(m, "rows_alone", True) for m in self.modules())

    def setup_caches(self, max_batch: int, max_seq: int, cache_types: tuple[str, str] | None = None, *,
                     n_blocks: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE, lazy: bool = False) -> None:
        """Allocate the KV pool and rope tables for sequences of up to ``max_seq`` tokens.

        The pool has ``n_blocks`` blocks of ``block_size`` positions (default: ``max_batch`` rows'
        worth, row ``r`` owning a fixed run of blocks, :meth:`row_table`, and one block more, which
        a block manager may need to copy a shared block into). ``cache_types`` (keys,
        values: ``f32``, ``f16``, ``bf16``, ``q8_0``) default to the last ones. ``lazy``: the pool's
        memory is not cleared (nor, on a CPU, made resident) until a block is used: the block
        manager clears each block it hands out.
        """
        self.cache_types = cache_types or getattr(self, "cache_types", (REFERENCE_CACHE_TYPE,) * 2)
        cfg = self.config
        device = self.output_norm.weight.device
        factors = self.rope_freqs
        if cfg.longrope and self.rope_factors:  # llama.cpp: long factors when the context exceeds the original
            factors = self.rope_factors["long" if cfg.rope_orig_ctx and max_seq > cfg.rope_orig_ctx else "short"]
        rope_global = Rotary(cfg.rope_dim, cfg.rope_base, max_seq, cfg.rope_scale, cfg.rope_neox, factors,
                             cfg.yarn, cfg.rope_attn_factor).to(device)
        rope_local = Rotary(cfg.rope_dim, cfg.rope_base_swa, max_seq, 1.0, cfg.rope_neox, factors).to(device)
        self.row_blocks = -(-max_seq // block_size)
        self.kv = None  # the old pool goes before the new one is allocated
        for layer in self.layers:
            layer.cache = None
        self.kv = KVPool(cfg.n_layer, cfg.n_head_kv, cfg.head_dim, n_blocks or max_batch * self.row_blocks + 1,
                         block_size, device, *self.cache_types, lazy=lazy)
        for layer, cache in zip(self.layers, self.kv.layers):
            layer.attn.rotary = rope_local if layer.is_swa else rope_global
            layer.cache = cache
        self.max_seq, self.max_batch = max_seq, max_batch

    def row_table(self, row: int) -> list[int]:
        """Cache row ``row``'s fixed block table (the default pool's layout)."""
        first = row * self.row_blocks
        if first + self.row_blocks > self.kv.n_blocks:
            raise ValueError(f"cache row {row} is beyond the pool ({self.kv.n_blocks} blocks)")
        return list(range(first, first + self.row_blocks))

    def _table(self, table: int | list[int]) -> list[int]:
        return self.row_table(table) if isinstance(table, int) else table

    def kv_bytes_per_token(self) -> int:
        """Bytes one cached token takes (every layer, K and V)."""
        assert self.kv is not None, "call setup_caches() first"
        return self.kv.bytes_per_token()

    @torch.inference_mode()
    def shift_kv(self, table: int | list[int], src: int, dst: int, n: int) -> None:
        """Move ``n`` cached positions of a sequence (its block table, or a cache row) from ``src`` to
        ``dst`` in every layer, re-rotating the keys by ``dst - src`` (context shift, reuse of a moved chunk)."""
        table = self._table(table)
        for layer in self.layers:
            assert layer.cache is not None
            layer.cache.move(table, src, dst, n, layer.attn.rotary)

    @torch.inference_mode()
    def read_kv(self, table: int | list[int], n: int) -> list[tuple[torch.Tensor, ...]]:
        """A copy of the first ``n`` cached positions of a sequence, per layer (its planes, K then V)."""
        table = self._table(table)
        return [b.cache.copy_out(table, n) for b in self.layers]  # type: ignore[union-attr]

    @torch.inference_mode()
    def write_kv(self, table: int | list[int], kv: list[tuple[torch.Tensor, ...]], n: int) -> None:
        """Put the first ``n`` positions of a :meth:`read_kv` copy back at a sequence's table."""
        table = self._table(table)
        for layer, saved in zip(self.layers, kv):
            assert layer.cache is not None
            layer.cache.copy_in(table, saved, n)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor,
        kv_len: int | None = None,
        last_only: bool = False,
        logits_from: int = 0,
        rows: list[int] | None = None,
        tables: list[list[int]] | None = None,
        lengths: list[int] | None = None,
        hidden: bool = False,
    ) -> torch.Tensor:
        """tokens [B, T] at positions ``input_pos`` [T] (or [B, T], one row per sequence) →
        float32 logits [B, T'', V].

        Each sequence's cache is its block table in ``tables``, or the cache row named in ``rows``
        (default 0 .. B-1). ``lengths``: each sequence's cached length after this pass, when the
        caller knows it (a batched decode step then reads nothing back from the device).
        ``last_only`` keeps the last position only; ``logits_from`` skips the first positions (the
        LM head is the largest matmul: perplexity needs only the second half). ``hidden``: the
        final norm's output [B, T'', D] instead of logits (what embeddings pool).
        """
        if kv_len is None:
            kv_len = int(input_pos.max()) + 1
        if kv_len > self.max_seq:
            raise ValueError(f"position {kv_len - 1} is beyond the cache ({self.max_seq} tokens)")
        cfg = self.config
        x = self.embed(tokens)
        if tables is None:
            tables = [self.row_table(r) for r in (rows if rows is not None else range(tokens.shape[0]))]
        if input_pos.dim() == 2 and tokens.shape[0] > 1 and tokens.shape[1] == 1:
            # batched decode: every sequence gets the mask it would get alone (see Attention)
            if lengths is None:
                lengths = [p + 1 for p in input_pos[:, 0].tolist()]
            mask_global: torch.Tensor | list | None = [attention_mask(input_pos[b : b + 1], n)
                                                       for b, n in enumerate(lengths)]
            mask_local: torch.Tensor | list | None = [attention_mask(input_pos[b : b + 1], n, cfg.sliding_window)
                                                      for b, n in enumerate(lengths)] if any(cfg.swa_layers) else None
        else:
            lengths = [kv_len] * tokens.shape[0]
            mask_global, mask_local = self.masks(input_pos, kv_len)
        view = BlockView(tables, input_pos, lengths, self.kv.block_size)
        if self._decode_step is not None and tokens.shape[1] == 1 and not hidden:
            return self._decode_step(x, input_pos, mask_global, mask_local, view)
        x = self._layers(x, input_pos, mask_global, mask_local, view)
        if last_only:
            x = x[:, -1:]
        elif logits_from:
            x = x[:, logits_from:]
        return self.output_norm(x) if hidden else self._logits(x)

    def masks(self, pos: torch.Tensor, kv_len: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The global and the sliding-window mask (None without windowed layers) of queries at
        ``pos`` over ``kv_len`` keys (:func:`.layers.attention_mask`)."""
        cfg = self.config
        local = attention_mask(pos, kv_len, cfg.sliding_window) if any(cfg.swa_layers) else None
        return attention_mask(pos, kv_len), local

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The first block's input: token embeddings, scaled where the architecture scales them (Gemma)."""
        x = self.token_embd(tokens)
        return x * self.config.embed_scale if self.config.embed_scale != 1.0 else x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.output(self.output_norm(x)).float()
        cap = self.config.final_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def _layers(self, x: torch.Tensor, pos: torch.Tensor, mask_global: torch.Tensor | list | None,
                mask_local: torch.Tensor | list | None, view: BlockView | PaddedView) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, pos, mask_local if layer.is_swa else mask_global, view)
        return x

    def _decode(self, x: torch.Tensor, pos: torch.Tensor, mask_global: torch.Tensor | list | None,
                mask_local: torch.Tensor | list | None, view: BlockView | PaddedView) -> torch.Tensor:
        """One decode step after the embedding: what ``compile_decode`` compiles."""
        x = self._layers(x, pos, mask_global, mask_local, view)
        return self._logits(x)

    @torch.inference_mode()
    def decode_padded(self, tokens: torch.Tensor, pos: torch.Tensor, view: PaddedView) -> torch.Tensor:
        """One decode step of B sequences, ``tokens`` [B] at positions ``pos`` [B], through a
        padded view → logits [B, V], in device operations only (what :mod:`.graphs` captures)."""
        cfg = self.config
        x = self.embed(tokens[:, None])
        mask_local = view.mask(cfg.sliding_window) if any(cfg.swa_layers) else None
        return self._decode(x, pos[:, None], view.mask(), mask_local, view)[:, -1]

    def compile_decode(self, mode: str | None = None) -> None:
        """Run decode steps (one token per sequence) through ``torch.compile``.

        Compiled on the first step (tens of seconds on a small CPU; inductor's cache keeps
        the result for the next start), with dynamic shapes so the growing KV length does
        not recompile each step. Prefill stays eager.
        """
        self._decode_step = torch.compile(self._decode, dynamic=True, mode=mode)
