"""A GGUF of a real model's shapes with random quantised blocks: for timing where no model file can
travel (the GPU machine has no network). Its text is noise; its bytes, shapes and types are those
of a Llama-3-8B Q4_K_M (Q4_K matrices, Q6_K ``attn_v``/``ffn_down`` in every other layer and the
output head, as llama.cpp's Q4_K_M mix does).

    python benchmarks/synthetic_gguf.py /tmp/synthetic-8b.gguf
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES

#: byte offsets of each type's float16 scale fields in a block (random bytes there could be inf/NaN)
F16_FIELDS = {T.Q4_0: (0,), T.Q5_0: (0,), T.Q8_0: (0,), T.Q4_1: (0, 2), T.Q5_1: (0, 2), T.Q2_K: (80, 82),
              T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def random_blocks_np(qtype: int, n: int, k: int, rng: np.random.Generator, scale: float = 0.01) -> np.ndarray:
    """uint8 [n, row_bytes]: random codes, float16 scales in [0.1, 1.1] × ``scale``."""
    qk, ts = GGML_QUANT_SIZES[T(qtype)]
    b = rng.integers(0, 256, size=(n, k // qk, ts), dtype=np.uint8)
    for at in F16_FIELDS[T(qtype)]:
        d = ((rng.random((n, k // qk, 1), dtype=np.float32) + 0.1) * scale).astype(np.float16)
        b[..., at : at + 2] = d.view(np.uint8)
    return b.reshape(n, -1)


def write_synthetic(path: Path, n_layer: int = 32, n_embd: int = 4096, n_ff: int = 14336, n_head: int = 32,
                    n_head_kv: int = 8, n_vocab: int = 128256, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(8192)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    specials, pieces = ["<unk>", "<s>", "</s>"], [f"<0x{b:02X}>" for b in range(256)]
    tokens = specials + pieces + [f"▁t{i}" for i in range(n_vocab - len(specials) - len(pieces))]
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (n_vocab - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def mat(name: str, n: int, k: int, qtype: T) -> None:
        w.add_tensor(name, random_blocks_np(qtype, n, k, rng), raw_dtype=qtype)

    def norm(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    head = n_embd // n_head
    mat("token_embd.weight", n_vocab, n_embd, T.Q4_K)
    norm("output_norm.weight", n_embd)
    mat("output.weight", n_vocab, n_embd, T.Q6_K)
    for i in range(n_layer):
        p, wide = f"blk.{i}.", T.Q6_K if i % 2 == 0 else T.Q4_K
        norm(p + "attn_norm.weight", n_embd)
        norm(p + "ffn_norm.weight", n_embd)
        mat(p + "attn_q.weight", n_head * head, n_embd, T.Q4_K)
        mat(p + "attn_k.weight", n_head_kv * head, n_embd, T.Q4_K)
        mat(p + "attn_v.weight", n_head_kv * head, n_embd, wide)
        mat(p + "attn_output.weight", n_embd, n_head * head, T.Q4_K)
        mat(p + "ffn_gate.weight", n_ff, n_embd, T.Q4_K)
        mat(p + "ffn_up.weight", n_ff, n_embd, T.Q4_K)
        mat(p + "ffn_down.weight", n_embd, n_ff, wide)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


if __name__ == "__main__":
    print(write_synthetic(Path(sys.argv[1])))
