"""The fast path (packed weights) against the reference path (float32 dequantised weights).

On tensors quantised by gguf-py: the int4 types reproduce their dequantised weight up to
bf16 rounding, on both the int4 kernel (few rows) and the dense path (many rows); tiny models
match the reference. (Every type's kernel against float64: ``tests/unit/test_block_kernels.py``.) (The real models: ``tests/slow/test_fast_path_real.py`` and
``tests/slow/test_perplexity_real.py``.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf.quants import quantize

from nkat_runtime import quant
from nkat_runtime.gguf.reader import open_gguf
from nkat_runtime.loader import load_model
from nkat_runtime.model import fused, int4, packed

CPU = torch.device("cpu")
INT4_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]  # gguf-py quantises these (not the K-quants)


def _gguf_with(tmp_path, tensors: dict[str, tuple[np.ndarray, T]]):
    path = tmp_path / "t.gguf"
    w = GGUFWriter(str(path), "llama")
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, quantize(data.astype(np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return open_gguf(path)


def _weight(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 0.2, (rows, 1))).astype(np.float32)


@pytest.mark.parametrize("qtype", INT4_TYPES, ids=lambda t: t.name)
def test_packed_linear_reproduces_dequantised_weight(tmp_path, qtype):
    g = _gguf_with(tmp_path, {"w": (_weight(208, 256), qtype)})
    ref = g.tensor("w")
    w = quant.dequantize(ref.raw_tensor(), ref.qtype, ref.shape)
    layer = packed.pack_linear(ref, CPU)
    assert isinstance(layer, packed.Int4Linear) and layer.n_parts == packed.INT4_PARTS[qtype.name]
    # x = identity reads the weight back out of the int4 kernel, column by column
    eye = torch.eye(256)
    recovered = torch.cat([layer(eye[i : i + 8]) for i in range(0, 256, 8)]).t()
    assert (recovered - w).abs().max() <= 0.01 * w.abs().max()
    x = torch.randn(packed.DENSE_FROM_ROWS, 256, generator=torch.Generator().manual_seed(1))
    expected = x @ w.t()
    for rows in (1, 3, 40, packed.DENSE_FROM_ROWS):  # int4 kernel, and the dense path from DENSE_FROM_ROWS on
        got = layer(x[:rows])
        assert (got - expected[:rows]).abs().max() <= 0.02 * expected[:rows].abs().max()


@pytest.mark.parametrize("qtype,rows", [(T.Q8_0, 208), (T.Q8_0, 200)], ids=["int4", "planes"])
def test_row_chunked_packing_equals_whole(tmp_path, monkeypatch, qtype, rows):
    # 208: not a multiple of 64 (int4 chunks); 200: not of 16 either (the int4 op refuses it: planes)
    g = _gguf_with(tmp_path, {"w": (_weight(rows, 128), qtype)})
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(2))
    whole = packed.pack_linear(g.tensor("w"), CPU)(x)
    monkeypatch.setattr(int4, "PACK_ROWS", 64)
    monkeypatch.setattr(packed, "PLANE_CHUNK_BYTES", 64 * 4 * 34)  # 64 rows of 4 Q8_0 blocks
    chunked = packed.pack_linear(g.tensor("w"), CPU)(x)
    assert torch.equal(whole, chunked)


def test_quant_embedding_gathers_exact_rows(tmp_path):
    g = _gguf_with(tmp_path, {"e": (_weight(300, 64), T.Q8_0)})
    ref = g.tensor("e")
    table = quant.dequantize(ref.raw_tensor(), ref.qtype, ref.shape)
    emb = packed.QuantEmbedding(ref, CPU)
    ids = torch.tensor([[0, 299, 5, 5], [17, 3, 250, 1]])
    assert torch.equal(emb(ids), table[ids])


def test_forms_by_type_and_shape(tmp_path):
    g = _gguf_with(tmp_path, {"f16": (_weight(64, 256), T.F16), "odd": (_weight(40, 64), T.Q4_0),
                              "q4": (_weight(64, 64), T.Q4_0)})
    assert packed.pack_linear(g.tensor("f16"), CPU).weight.dtype == torch.float32  # float types: dense
    assert isinstance(packed.pack_linear(g.tensor("q4"), CPU), packed.Int4Linear)
    # 40 rows: not a multiple of 16, which the int4 op needs: byte-code planes instead
    assert isinstance(packed.pack_linear(g.tensor("odd"), CPU), fused.FusedLinear)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_tiny_model_fast_matches_reference(tiny_model, arch):
    path = tiny_model(arch)
    fast = load_model(path, context=64, progress=False)
    ref = load_model(path, context=64, progress=False, reference=True)
    assert any(isinstance(m, packed.Int4Linear) for m in fast.model.modules())
    seq = torch.randint(3, fast.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(3))
    for n in (5, 24):  # int4 kernel / dense path
        assert _rel_err(fast.model(seq[:, :n], torch.arange(n)), ref.model(seq[:, :n], torch.arange(n))) <= 0.02
