"""Building blocks shared by the architectures: norm, rotary embedding,
attention and feed-forward. Weight names follow GGUF (``attn_q``, ``ffn_gate``, ...)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import Yarn
from .kv_cache import BlockView, KVCache, PaddedView
from .linear import RowLocal, is_decode, rowwise
from .theta_fused import SharedTheta, project


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
    ``freq_factors`` [rot_dim/2] divide the frequencies (GGUF ``rope_freqs.weight``: Llama 3.1's
    scaling, as llama.cpp's ``ggml_rope_ext`` applies it).
    """

    def __init__(self, rot_dim: int, base: float, max_pos: int, scale: float = 1.0, neox: bool = False,
                 freq_factors: torch.Tensor | None = None, yarn: Yarn | None = None, attn_factor: float = 1.0) -> None:
        super().__init__()
        self.rot_dim = rot_dim
        self.neox = neox
        self.scale = scale
        inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
        if freq_factors is not None:
            inv_freq = inv_freq / freq_factors.to(torch.float64).cpu()
        mscale = attn_factor  # q and k scaled (phi3 longrope, YaRN's attn_factor)
        if yarn is not None:
            inv_freq, magnitude = yarn_frequencies(inv_freq, rot_dim, base, yarn)
            mscale *= magnitude
        self.inv_freq = inv_freq
        pos = torch.arange(max_pos, dtype=torch.float64) / scale
        angles = torch.outer(pos, inv_freq)  # [max_pos, rot_dim/2]
        # YaRN scales q and k (so the logits by mscale²); key shifts rotate without it
        self.register_buffer("cos", (angles.cos() * mscale).float(), persistent=False)
        self.register_buffer("sin", (angles.sin() * mscale).float(), persistent=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x: [B, T, H, D], pos: [T] (or [B, T]) positions."""
        return self._rotate(x, self.cos[pos].unsqueeze(-2), self.sin[pos].unsqueeze(-2))  # [..., T, 1, rot/2]

    def shift(self, x: torch.Tensor, delta: int) -> torch.Tensor:
        """Move already-rotated keys ``x`` [..., D] by ``delta`` positions (rotations compose)."""
        angles = (delta / self.scale) * self.inv_freq
        cos, sin = angles.cos().float().to(x.device), angles.sin().float().to(x.device)
        return self._rotate(x, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.rot_dim].float(), x[..., self.rot_dim :]
        if self.neox:
            x1, x2 = rot.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        out = out.to(x.dtype)
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def yarn_frequencies(inv_freq: torch.Tensor, rot_dim: int, base: float, y: Yarn) -> tuple[torch.Tensor, float]:
    """YaRN's per-pair frequencies and magnitude scale, as llama.cpp computes them
    (``ggml_rope_yarn_corr_dims`` and ``rope_yarn``; ``llama-context.cpp`` cancels its own
    attn_factor so that the net scale is ``(1 + 0.1 ln factor)``, times the file's attn_factor,
    which the caller applies)."""

    def corr_dim(n_rot: float) -> float:
        return rot_dim * math.log(y.orig_ctx / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(0.0, math.floor(corr_dim(y.beta_fast)))
    high = min(rot_dim - 1.0, math.ceil(corr_dim(y.beta_slow)))
    i = torch.arange(rot_dim // 2, dtype=torch.float64)
    ramp = (1 - ((i - low) / max(0.001, high - low)).clamp(0, 1)) * y.ext_factor
    mixed = inv_freq / y.factor * (1 - ramp) + inv_freq * ramp
    magnitude = 1 + 0.1 * math.log(y.factor) if y.ext_factor != 0 and y.factor > 1 else 1.0
    return mixed, magnitude


def attention_mask(pos: torch.Tensor, kv_len: int, window: int = 0) -> torch.Tensor | None:
    """Boolean mask: key s is visible to the query at p when s ≤ p (and p - s < window).

    ``pos`` [T] gives [T, kv_len]; per-sequence ``pos`` [B, T] gives [B, 1, T, kv_len]. Returns
    None when every key is visible (one decode step with no window), so SDPA takes its unmasked
    path.
    """
    keys = torch.arange(kv_len, device=pos.device)
    p = pos.unsqueeze(-1)
    allowed = keys <= p
    if window > 0:
        allowed = allowed & (p - keys < window)
    if pos.numel() == 1 and bool(allowed.all()):
        return None
    return allowed.unsqueeze(1) if pos.dim() == 2 else allowed


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
        softcap: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn_q, self.attn_k, self.attn_v, self.attn_output = wq, wk, wv, wo
        self.group_theta()
        self.n_head, self.n_head_kv, self.head_dim, self.scale = n_head, n_head_kv, head_dim, scale
        self.softcap = softcap
        self.rotary = rotary
        self.attn_q_norm, self.attn_k_norm = q_norm, k_norm

    def group_theta(self) -> None:
        """q, k and v read one input: their θ terms share one product (``theta_fused.py``)."""
        self.theta_qkv = SharedTheta.of((self.attn_q, self.attn_k, self.attn_v))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache: KVCache, mask: torch.Tensor | list | None,
                view: BlockView | PaddedView) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q, k, v = project((self.attn_q, self.attn_k, self.attn_v), self.theta_qkv, x)
        q = q.view(bsz, seqlen, self.n_head, self.head_dim)
        k = k.view(bsz, seqlen, self.n_head_kv, self.head_dim)
        v = v.view(bsz, seqlen, self.n_head_kv, self.head_dim)
        if self.attn_q_norm is not None:
            q = self.attn_q_norm(q)
        if self.attn_k_norm is not None:
            k = self.attn_k_norm(k)
        q = self.rotary(q, pos).transpose(1, 2)
        k = self.rotary(k, pos).transpose(1, 2)
        v = v.transpose(1, 2)
        kv = cache.update(view, k, v)  # each sequence's keys and values, through its block table
        q = cache.rotate_q(q)  # as the cached keys are (a quantised cache's Hadamard rotation)
        if isinstance(mask, list):  # batched decode: each sequence attends over its own keys, as it would alone
            out = torch.cat([self._sdpa(q[b : b + 1], k_b, v_b, mask[b]) for b, (k_b, v_b) in enumerate(kv)])
        elif len(kv) == 1:  # one sequence, or a padded decode batch (its mask [B, 1, 1, keys])
            out = self._sdpa(q, *kv[0], mask)
        else:  # sequences of one length (a batched prefill)
            out = self._sdpa(q, torch.cat([k_b for k_b, _ in kv]), torch.cat([v_b for _, v_b in kv]), mask)
        out = cache.unrotate_out(out).transpose(1, 2).reshape(bsz, seqlen, self.n_head * self.head_dim)
        return self.attn_output(out)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.softcap > 0:
            return self._capped(q, k.to(q.dtype), v.to(q.dtype), mask)
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=self.scale,
                                              enable_gqa=self.n_head != self.n_head_kv)


    def _capped(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention with soft-capped scores (SDPA has no hook between the product and the softmax)."""
        if self.n_head != self.n_head_kv:
            rep = self.n_head // self.n_head_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        scores = self.softcap * torch.tanh(scores / self.softcap)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": gelu_tanh}


class FeedForward(RowLocal, nn.Module):
    """Gated FFN: ``down(act(gate(x)) * up(x))`` (in a decode step the activation runs row by row
    unless ``row_local`` is off: see :mod:`.linear`)."""

    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module, act: str) -> None:
        super().__init__()
        self.ffn_gate, self.ffn_up, self.ffn_down = gate, up, down
        self.act = ACTIVATIONS[act]
        self.group_theta()

    def group_theta(self) -> None:
        """gate and up read one input: their θ terms share one product (``theta_fused.py``)."""
        self.theta_gate_up = SharedTheta.of((self.ffn_gate, self.ffn_up))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project((self.ffn_gate, self.ffn_up), self.theta_gate_up, x)
        gate = rowwise(self.act, gate) if self.row_local and is_decode(x) else self.act(gate)
        return self.ffn_down(gate * up)
