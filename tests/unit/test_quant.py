"""nkat_runtime.quant against gguf-py's numpy dequantisation, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

from nkat_runtime import quant
from nkat_runtime.errors import ModelFormatError, UnsupportedError
from nkat_runtime.quant import SUPPORTED_TYPES, block_info, dequantize, tensor_nbytes, type_name

# Byte offsets of the float16 fields (d, m / dmin) inside one block.
F16_FIELDS: dict[T, tuple[int, ...]] = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
}
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
ROWS, BLOCKS_PER_ROW = 4, 3


def _assert_bit_equal(got: torch.Tensor, ref: np.ndarray) -> None:
    ref_t = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))
    assert got.dtype == torch.float32
    assert tuple(got.shape) == tuple(ref_t.shape)
    assert not torch.isnan(ref_t).any()
    if not torch.equal(got.view(torch.int32), ref_t.view(torch.int32)):
        bad = (got.view(torch.int32) != ref_t.view(torch.int32)).nonzero()[:5].tolist()
        pytest.fail(f"bit mismatch at {bad}: got {[got[tuple(i)].item() for i in bad]}, "
                    f"want {[ref_t[tuple(i)].item() for i in bad]}")


def _random_f16(rng: np.random.Generator, n: int, wide: bool) -> np.ndarray:
    """``n`` finite float16 values: uniform in +-1, or (wide) any finite bit pattern."""
    if not wide:
        return rng.uniform(-1.0, 1.0, n).astype(np.float16)
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    bits[(bits & 0x7C00) == 0x7C00] &= 0xBFFF  # inf/NaN exponent -> a finite one
    return bits.view(np.float16)


def _random_blocks(qtype: T, rng: np.random.Generator, wide: bool) -> tuple[np.ndarray, tuple[int, int]]:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (ROWS, BLOCKS_PER_ROW, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        vals = _random_f16(rng, ROWS * BLOCKS_PER_ROW, wide)
        data[..., off : off + 2] = vals.view(np.uint8).reshape(ROWS, BLOCKS_PER_ROW, 2)
    return data.reshape(ROWS, -1), (ROWS, BLOCKS_PER_ROW * block_size)


@pytest.mark.parametrize("wide", [False, True], ids=["scales_pm1", "scales_any_f16"])
@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda t: t.name)
def test_quantised_types_match_gguf(qtype: T, wide: bool) -> None:
    rng = np.random.default_rng(1000 + int(qtype) + 100 * wide)
    data, shape = _random_blocks(qtype, rng, wide)
    got = dequantize(torch.from_numpy(data), int(qtype), shape)
    _assert_bit_equal(got, gguf_quants.dequantize(data, qtype))


def _float_bytes(qtype: T, rng: np.random.Generator) -> np.ndarray:
    n = ROWS * 24
    if qtype == T.F32:
        vals = (rng.standard_normal(n) * 10.0 ** rng.integers(-40, 38, n)).astype(np.float32)
        vals[:6] = [0.0, -0.0, np.inf, -np.inf, 1e-45, -3e-39]  # zeros, infinities, subnormals
        return vals.view(np.uint8).reshape(ROWS, -1)
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    exp_mask = 0x7C00 if qtype == T.F16 else 0x7F80
    nan = ((bits & exp_mask) == exp_mask) & ((bits & (0x7FFF ^ exp_mask)) != 0)
    bits[nan] &= 0xBFFF  # clear the top exponent bit: finite
    bits[:4] = [0x0000, 0x8000, exp_mask, 0x0001]  # +0, -0, +inf, smallest subnormal
    return bits.view(np.uint8).reshape(ROWS, -1)


@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda t: t.name)
def test_float_types_match_gguf(qtype: T) -> None:
    data = _float_bytes(qtype, np.random.default_rng(int(qtype)))
    shape = (ROWS, data.shape[1] // (4 if qtype == T.F32 else 2))
    got = dequantize(torch.from_numpy(data), int(qtype), shape)
    _assert_bit_equal(got, gguf_quants.dequantize(data, qtype).reshape(shape))


def test_i8() -> None:
    raw = torch.tensor([0, 1, 127, 128, 255], dtype=torch.uint8)
    assert dequantize(raw, int(T.I8), (5,)).tolist() == [0.0, 1.0, 127.0, -128.0, -1.0]


def test_chunked_output_is_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    data, shape = _random_blocks(T.Q4_K, rng, wide=False)
    whole = dequantize(torch.from_numpy(data), int(T.Q4_K), shape)
    monkeypatch.setattr(quant, "CHUNK_ELEMENTS", 700)  # 2 blocks per step, ragged last step
    chunked = dequantize(torch.from_numpy(data), int(T.Q4_K), shape)
    assert torch.equal(whole, chunked)
    _assert_bit_equal(chunked, gguf_quants.dequantize(data, T.Q4_K))


def test_shapes_and_raw_layouts() -> None:
    rng = np.random.default_rng(3)
    data, (rows, cols) = _random_blocks(T.Q8_0, rng, wide=False)
    ref = gguf_quants.dequantize(data, T.Q8_0)
    flat = torch.from_numpy(data.reshape(-1))
    _assert_bit_equal(dequantize(flat, int(T.Q8_0), (2, 2, cols)), ref.reshape(2, 2, cols))
    _assert_bit_equal(dequantize(flat, int(T.Q8_0), (rows * cols,)), ref.reshape(-1))
    # a float32 tensor (as GGUFReader returns for F32) is read as its bytes
    vals = rng.standard_normal((3, 5)).astype(np.float32)
    assert torch.equal(dequantize(torch.from_numpy(vals), int(T.F32), (5, 3)), torch.from_numpy(vals).view(5, 3))
    empty = dequantize(torch.empty(0, dtype=torch.uint8), int(T.Q4_K), (0, 256))
    assert empty.shape == (0, 256) and empty.dtype == torch.float32


def test_unpack_q4_k_shapes_and_formula() -> None:
    data, _ = _random_blocks(T.Q4_K, np.random.default_rng(5), wide=False)
    blocks = torch.from_numpy(data.reshape(-1, 144))
    codes, scales, mins = quant.handler(int(T.Q4_K)).unpack(blocks)
    n = blocks.shape[0]
    assert codes.dtype == torch.uint8 and codes.shape == (n, 256) and int(codes.max()) <= 15
    assert scales.dtype == mins.dtype == torch.float32
    assert scales.shape == mins.shape == (n, 8)
    w = scales.repeat_interleave(32, dim=1) * codes.float() - mins.repeat_interleave(32, dim=1)
    _assert_bit_equal(w.reshape(data.shape[0], -1), gguf_quants.dequantize(data, T.Q4_K))


def test_supported_types_and_metadata() -> None:
    want = {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
            T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.I8}  # I8: .nkat θ factors
    assert SUPPORTED_TYPES == frozenset(int(t) for t in want)
    assert type_name(int(T.Q4_K)) == "Q4_K" and type_name(9999) == "type 9999"
    assert block_info(int(T.Q6_K)) == (256, 210) and block_info(int(T.F16)) == (1, 2)
    assert tensor_nbytes(int(T.Q4_0), (3, 64)) == 3 * 2 * 18
    assert tensor_nbytes(int(T.IQ2_XS), (1, 256)) == 74  # sizes are known for every GGML type


def test_unsupported_type_names_it() -> None:
    with pytest.raises(UnsupportedError, match=r"tensor type IQ2_XS is not supported \(supported: F32, F16"):
        dequantize(torch.zeros(74, dtype=torch.uint8), int(T.IQ2_XS), (1, 256))
    with pytest.raises(UnsupportedError, match="type 9999"):
        dequantize(torch.zeros(4, dtype=torch.uint8), 9999, (1,))


def test_wrong_byte_count() -> None:
    with pytest.raises(ModelFormatError, match="needs 68 bytes, got 35"):
        dequantize(torch.zeros(35, dtype=torch.uint8), int(T.Q8_0), (1, 64))
    with pytest.raises(ModelFormatError):
        dequantize(torch.zeros(145, dtype=torch.uint8), int(T.Q4_K), (1, 256))


def test_row_not_multiple_of_block() -> None:
    with pytest.raises(ModelFormatError, match="not a multiple of the block size 256"):
        dequantize(torch.zeros(144, dtype=torch.uint8), int(T.Q4_K), (2, 128))
    with pytest.raises(ModelFormatError):
        tensor_nbytes(int(T.Q4_0), (4, 33))


def test_real_model_tensors_match_gguf() -> None:
    """One tensor of each type in the default model (first rows only), against gguf-py."""
    from nkat_runtime.bundled import gemma3_270m
    from nkat_runtime.errors import ModelNotFoundError
    from nkat_runtime.gguf.reader import open_gguf  # checked against gguf-py's reader in test_gguf_io

    try:
        path = gemma3_270m()
    except ModelNotFoundError as exc:  # pragma: no cover - the package is a dependency
        pytest.skip(str(exc))
    seen: set[int] = set()
    for t in open_gguf(path).tensors.values():
        if t.qtype in seen:
            continue
        seen.add(t.qtype)
        assert tensor_nbytes(t.qtype, t.shape) == t.nbytes, t.name
        rows = min(64, int(np.prod(t.shape[:-1]))) if len(t.shape) > 1 else 1
        row_bytes = t.nbytes // (int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1)
        data = np.array(t.raw[: rows * row_bytes], copy=True).reshape(rows, row_bytes)
        shape = (rows, t.shape[-1])
        got = dequantize(torch.from_numpy(data), t.qtype, shape)
        _assert_bit_equal(got, gguf_quants.dequantize(data, T(t.qtype)).reshape(shape))
    assert len(seen) >= 5  # F32, Q8_0, Q5_0, Q4_K, Q6_K
