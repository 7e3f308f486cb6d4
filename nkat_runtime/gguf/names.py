"""Weight names users type → GGUF tensor names.

Accepted: GGUF names (``blk.0.ffn_gate.weight``, ``.weight`` optional), Meta LLaMA names
(``layers.0.feed_forward.w1.weight``), Hugging Face names
(``model.layers.0.mlp.gate_proj.weight``) and shell-style globs of any of them
(``blk.*.ffn_down.weight``, ``layers.*.attention.wq.weight``).
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Iterable

from ..errors import NKATError

META = {
    "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
    "attention_norm": "attn_norm", "ffn_norm": "ffn_norm",
}
HF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
}
GLOBAL = {
    "tok_embeddings": "token_embd", "model.embed_tokens": "token_embd", "embed_tokens": "token_embd",
    "norm": "output_norm", "model.norm": "output_norm", "lm_head": "output", "output": "output",
}
#: the 2-D weights of a transformer block (θ's default targets, what nkat-requantize rewrites)
BLOCK_WEIGHT = re.compile(r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")
_LAYER = re.compile(r"^(?:model\.)?layers\.([0-9]+|[*?]|\[[^\]]*\])\.(.+)$")


class LayerNameError(NKATError):
    """A layer name that matches no weight of the model."""


def to_gguf(name: str) -> str:
    """Translate one Meta/HF/GGUF name or glob to the GGUF spelling (``.weight`` added)."""
    base = name[:-7] if name.endswith(".weight") else name
    suffix = ".weight"
    m = _LAYER.match(base)
    if m:
        idx, rest = m.groups()
        rest = META.get(rest) or HF.get(rest) or rest
        return f"blk.{idx}.{rest}{suffix}"
    return GLOBAL.get(base, base) + suffix


def select(patterns: Iterable[str], candidates: Iterable[str]) -> list[str]:
    """GGUF names among ``candidates`` that the user's patterns select, in file order.

    Each pattern must select at least one candidate; otherwise a ``LayerNameError`` lists
    the closest names.
    """
    cands = list(candidates)
    chosen: set[str] = set()
    for pat in patterns:
        g = to_gguf(pat.strip())
        hits = [c for c in cands if fnmatch.fnmatchcase(c, g)]
        if not hits:
            close = difflib.get_close_matches(g, cands, n=3, cutoff=0.5)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise LayerNameError(f"layer {pat!r} (GGUF name {g!r}) matches no weight of this model{hint}")
        chosen.update(hits)
    return [c for c in cands if c in chosen]
