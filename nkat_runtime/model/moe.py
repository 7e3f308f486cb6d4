"""Mixture-of-experts feed-forward (Mixtral-style ``llama`` files, ``qwen3moe``), as llama.cpp's
``build_moe_ffn`` with softmax gating and normalised weights: each token's router logits go
through a softmax, its top-k experts are kept, their weights renormalised to sum to 1 (and
scaled by ``expert_weights_scale`` where a file sets one), and the token's output is the
weighted sum of those experts' gated FFNs.

Every expert is an ordinary linear of the fast path over its slice of the file's 3-D expert
tensors (the rows of one expert are contiguous GGUF blocks), so expert weights stay blocks.
Experts run on the rows routed to them; a token's k contributions are added in ascending
expert order, so its result does not depend on which other tokens share the batch.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import FeedForward


class MoEFeedForward(nn.Module):
    def __init__(self, router: nn.Module, experts: list[FeedForward], n_used: int, scale: float = 0.0) -> None:
        super().__init__()
        self.ffn_gate_inp = router
        self.experts = nn.ModuleList(experts)
        self.n_used, self.scale = n_used, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs = torch.softmax(self.ffn_gate_inp(flat).float(), dim=-1)
        weights, chosen = probs.topk(self.n_used, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.scale not in (0.0, 1.0):
            weights = weights * self.scale
        out = torch.zeros(flat.shape, dtype=torch.float32, device=x.device)
        order = chosen.argsort(dim=-1)  # each token adds its experts in ascending expert order
        chosen, weights = chosen.gather(-1, order), weights.gather(-1, order)
        for slot in range(self.n_used):
            for e in chosen[:, slot].unique().tolist():
                rows = (chosen[:, slot] == e).nonzero().squeeze(1)
                y = self.experts[e](flat[rows].unsqueeze(0)).squeeze(0).float()
                out.index_add_(0, rows, y * weights[rows, slot].unsqueeze(1))
        return out.view(shape).to(x.dtype)
