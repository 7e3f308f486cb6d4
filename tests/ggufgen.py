"""Tiny GGUF files with random weights, written with gguf-py's GGUFWriter, for tests.

Each architecture gets the tensors its graph needs, quantised to a mix of types, and a
small SentencePiece-style vocabulary (control tokens, 256 byte-fallback tokens, a few
pieces) so the runtime's tokenizer loads too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf.quants import quantize

PIECES = ["▁", "▁the", "▁a", "e", "t", "a", "o", "n", "▁of", "▁and", "th", "he", "in", "er", "▁to", "is"]


def tiny_vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + PIECES
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(PIECES))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(PIECES)
    return tokens, scores, types


def _add(w: GGUFWriter, name: str, data: np.ndarray, qtype: T) -> None:
    data = data.astype(np.float32)
    if qtype == T.F32:
        w.add_tensor(name, data)
    elif qtype == T.F16:
        w.add_tensor(name, data.astype(np.float16))
    else:
        w.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)


def write_tiny_model(
    path: Path,
    arch: str = "llama",
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    context: int = 256,
    sliding_window: int = 4,
    seed: int = 0,
    chat_template: str | None = None,
    extra_tensors: dict[str, tuple[int, ...]] | None = None,
    extra_metadata: dict[str, int | float] | None = None,
) -> Path:
    """Write a random-weight model of ``arch`` (llama, qwen2 or gemma3) to ``path``; ``extra_tensors``
    (name -> shape, F32) and ``extra_metadata`` (key -> number) are added as given."""
    rng = np.random.default_rng(seed)
    tokens, scores, types = tiny_vocab()
    n_vocab = len(tokens)
    head_dim = n_embd // n_head
    w = GGUFWriter(str(path), arch)
    w.add_context_length(context)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    if arch == "gemma3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(sliding_window)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    def rnd(*shape: int, scale: float = 0.08) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32) * scale

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    _add(w, "token_embd.weight", rnd(n_vocab, n_embd, scale=0.5), T.Q8_0)
    _add(w, "output_norm.weight", norm(n_embd), T.F32)
    if arch != "gemma3":
        _add(w, "output.weight", rnd(n_vocab, n_embd), T.Q8_0)
    mats = [T.Q4_0, T.Q8_0, T.F16, T.Q5_0, T.Q4_1, T.Q5_1, T.F32]
    for i in range(n_layer):
        p = f"blk.{i}."
        q = lambda k: mats[(i + k) % len(mats)]  # noqa: E731 - vary the types across layers
        _add(w, p + "attn_norm.weight", norm(n_embd), T.F32)
        _add(w, p + "attn_q.weight", rnd(n_head * head_dim, n_embd), q(0))
        _add(w, p + "attn_k.weight", rnd(n_head_kv * head_dim, n_embd), q(1))
        _add(w, p + "attn_v.weight", rnd(n_head_kv * head_dim, n_embd), q(2))
        _add(w, p + "attn_output.weight", rnd(n_embd, n_head * head_dim), q(3))
        _add(w, p + "ffn_norm.weight", norm(n_embd), T.F32)
        _add(w, p + "ffn_gate.weight", rnd(n_ff, n_embd), q(4))
        _add(w, p + "ffn_up.weight", rnd(n_ff, n_embd), q(5))
        _add(w, p + "ffn_down.weight", rnd(n_embd, n_ff), q(6))
        if arch == "qwen2":
            for n, rows in (("attn_q", n_head * head_dim), ("attn_k", n_head_kv * head_dim), ("attn_v", n_head_kv * head_dim)):
                _add(w, p + n + ".bias", rnd(rows, scale=0.1), T.F32)
        if arch == "gemma3":
            _add(w, p + "attn_q_norm.weight", norm(head_dim), T.F32)
            _add(w, p + "attn_k_norm.weight", norm(head_dim), T.F32)
            _add(w, p + "post_attention_norm.weight", norm(n_embd), T.F32)
            _add(w, p + "post_ffw_norm.weight", norm(n_embd), T.F32)
    for name, shape in (extra_tensors or {}).items():
        _add(w, name, rnd(*shape), T.F32)
    for key, value in (extra_metadata or {}).items():
        (w.add_float32 if isinstance(value, float) else w.add_uint32)(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def compare_with_gguf_py(path) -> None:
    """Our parser and gguf-py's reader agree on every metadata value and tensor of ``path``."""
    import gguf

    from nkat_runtime.gguf.reader import open_gguf

    ours = open_gguf(path)
    reader = gguf.GGUFReader(path)
    meta = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    assert meta == ours.metadata
    assert len(reader.tensors) == len(ours.tensors)
    for t in reader.tensors:
        mine = ours.tensors[t.name]
        assert mine.offset == t.data_offset
        assert mine.qtype == int(t.tensor_type)
        assert mine.shape == tuple(reversed(t.shape.tolist()))
        assert np.array_equal(mine.raw, t.data.reshape(-1).view(np.uint8))
