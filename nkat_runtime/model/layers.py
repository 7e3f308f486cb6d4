"""Building blocks shared by the architectures: norm, rotary embedding, KV cache,
attention and feed-forward. Weight names follow GGUF (``attn_q``, ``ffn_gate``, ...)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) * w`` over the last dim (GGUF norms are used as stored)."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused op (bit-identical here to the spelled-out float32 formula, and cheaper per decode step)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embedding with a precomputed cos/sin table.

    ``neox=False`` rotates adjacent pairs (x[2i], x[2i+1]) as llama.cpp's "normal" mode
    (GGUF llama Q/K weights are permuted for it); ``neox=True`` rotates the halves
    (x[i], x[i + d/2]). Only the first ``rot_dim`` dims of each head are rotated.
    """

    def __init__(self, rot_dim: int, base: float, max_pos: int, scale: float = 1.0, neox: bool = False) -> None:
        super().__init__()
        self.rot_dim = rot_dim
        self.neox = neox
        inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
        pos = torch.arange(max_pos, dtype=torch.float64) / scale
        angles = torch.outer(pos, inv_freq)  # [max_pos, rot_dim/2]
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x: [B, T, H, D], pos: [T] (or [B, T]) positions."""
        cos = self.cos[pos].unsqueeze(-2)  # [..., T, 1, rot/2]
        sin = self.sin[pos].unsqueeze(-2)
        rot, rest = x[..., : self.rot_dim].float(), x[..., self.rot_dim :]
        if self.neox:
            x1, x2 = rot.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        out = out.to(x.dtype)
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


class KVCache(nn.Module):
    """Static per-layer cache [B, H_kv, S_max, D]; slot index = token position."""

    def __init__(self, batch: int, n_head_kv: int, max_seq: int, head_dim: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        shape = (batch, n_head_kv, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, H_kv, T, D] at ``pos`` and return the first ``kv_len`` slots."""
        batch = k.shape[0]
        self.k[:batch].index_copy_(2, pos, k.to(self.k.dtype))
        self.v[:batch].index_copy_(2, pos, v.to(self.v.dtype))
        return self.k[:batch, :, :kv_len], self.v[:batch, :, :kv_len]


def attention_mask(pos: torch.Tensor, kv_len: int, window: int = 0) -> torch.Tensor | None:
    """Boolean [T, kv_len] mask: key s is visible to query at p when s ≤ p (and p - s < window).

    Returns None when every key is visible (one decode step with no window), so SDPA takes
    its unmasked path.
    """
    keys = torch.arange(kv_len, device=pos.device)
    p = pos.unsqueeze(-1)
    allowed = keys <= p
    if window > 0:
        allowed = allowed & (p - keys < window)
    if pos.numel() == 1 and bool(allowed.all()):
        return None
    return allowed


class Attention(nn.Module):
    def __init__(
        self,
        wq: nn.Module,
        wk: nn.Module,
        wv: nn.Module,
        wo: nn.Module,
        n_head: int,
        n_head_kv: int,
        head_dim: int,
        scale: float,
        rotary: Rotary,
        q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
    ) -> None:
        super().__init__()
        self.attn_q, self.attn_k, self.attn_v, self.attn_output = wq, wk, wv, wo
        self.n_head, self.n_head_kv, self.head_dim, self.scale = n_head, n_head_kv, head_dim, scale
        self.rotary = rotary
        self.attn_q_norm, self.attn_k_norm = q_norm, k_norm

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, cache: KVCache, mask: torch.Tensor | None, kv_len: int
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.attn_q(x).view(bsz, seqlen, self.n_head, self.head_dim)
        k = self.attn_k(x).view(bsz, seqlen, self.n_head_kv, self.head_dim)
        v = self.attn_v(x).view(bsz, seqlen, self.n_head_kv, self.head_dim)
        if self.attn_q_norm is not None:
            q = self.attn_q_norm(q)
        if self.attn_k_norm is not None:
            k = self.attn_k_norm(k)
        q = self.rotary(q, pos).transpose(1, 2)
        k = self.rotary(k, pos).transpose(1, 2)
        v = v.transpose(1, 2)
        k_all, v_all = cache.update(pos, k, v, kv_len)
        out = F.scaled_dot_product_attention(
            q, k_all.to(q.dtype), v_all.to(q.dtype), attn_mask=mask, scale=self.scale,
            enable_gqa=self.n_head != self.n_head_kv,
        )
        out = out.transpose(1, 2).reshape(bsz, seqlen, self.n_head * self.head_dim)
        return self.attn_output(out)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": gelu_tanh}


class FeedForward(nn.Module):
    """Gated FFN: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module, act: str) -> None:
        super().__init__()
        self.ffn_gate, self.ffn_up, self.ffn_down = gate, up, down
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_down(self.act(self.ffn_gate(x)) * self.ffn_up(x))
