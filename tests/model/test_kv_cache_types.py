"""KV cache types (``--cache-type-k`` / ``-v``): q8_0 is ggml's Q8_0 to the bit (gguf-py's
quantiser is the reference); what a cache stores is its type's rounding of the float32 entries;
logits stay near the float32 cache's; decode stays batch-invariant; a context-shift move and the
RAM cache's copy work on every type; the flags reach the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_batch_invariance import ROWS, batched_vs_alone

from ggufgen import write_tiny_model
from nkat_runtime.loader import load_model
from nkat_runtime.model.kv_cache import FLOAT_TYPES, dequantize_q8_0, hadamard, quantize_q8_0, rotation_sizes

TYPES = ["f16", "bf16", "q8_0"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A tiny llama with 64-wide heads (q8_0 works in blocks of 32 along the head, and a quantised
    cache turns its vectors by a 64-point Hadamard rotation)."""
    return write_tiny_model(tmp_path_factory.mktemp("kvtypes") / "t.gguf", "llama", n_embd=256, n_head=4, n_head_kv=2,
                            n_ff=256, context=256)


def test_q8_0_is_ggmls_to_the_bit():
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((48, 256)) * rng.uniform(1e-3, 40, (48, 1))).astype(np.float32)
    x[5, :32] = 0.0  # an all-zero block
    x[7, 40] = 1e4  # one outlier in its block
    ref = quants.dequantize(quants.quantize(x, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
    q, d = quantize_q8_0(torch.from_numpy(x))
    assert q.dtype == torch.int8 and d.dtype == torch.float16 and d.shape == (48, 8)
    assert np.array_equal(dequantize_q8_0(q, d).numpy(), ref)


def test_hadamard_is_the_orthonormal_sylvester_matrix_and_llama_cpps_sizes():
    h = torch.ones(1, 1)
    while h.shape[0] < 64:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    x = torch.randn(5, 3, 128, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hadamard(x, 64), (x.view(5, 3, 2, 64) @ (h / 8)).view(5, 3, 128))
    torch.testing.assert_close(hadamard(hadamard(x, 128), 128), x)  # its own inverse
    assert torch.equal(hadamard(x, 64)[2:4], hadamard(x[2:4], 64))  # row by row: batch-invariant
    assert rotation_sizes(64, "q8_0", "q8_0") == (64, 64) and rotation_sizes(256, "q8_0", "f16") == (256, 0)
    assert rotation_sizes(128, "bf16", "q8_0") == (0, 64) and rotation_sizes(96, "q8_0", "q8_0") == (0, 0)


def _run(path, kinds, steps=6):
    lm = load_model(path, context=128, progress=False, cache_types=kinds)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 200, (1, 24 + steps), generator=g)
    out = [lm.model(tokens[:, :24], torch.arange(24))[0, -1]]
    for s in range(steps):
        out.append(lm.model(tokens[:, 24 + s : 25 + s], torch.tensor([24 + s]))[0, -1])
    return lm, torch.stack(out)


def keys(lm, layer: int, start: int, stop: int) -> torch.Tensor:
    """The stored key plane of cache row 0 at positions ``start .. stop-1`` of ``layer``."""
    cache = lm.model.layers[layer].cache
    return cache.positions(cache.k, lm.model.row_table(0), start, stop)[0]


@pytest.mark.parametrize("kind", TYPES)
def test_stored_entries_and_logits(model_file, kind):
    ref_lm, ref = _run(model_file, ("f32", "f32"))
    lm, got = _run(model_file, (kind, kind))
    ref_k = keys(ref_lm, 0, 0, 24)
    stored = keys(lm, 0, 0, 24)
    if kind == "q8_0":
        cache = lm.model.layers[0].cache
        assert (cache.k_rot, cache.v_rot) == (64, 64)
        assert torch.equal(stored, quantize_q8_0(hadamard(ref_k, 64))[0])
    else:
        assert torch.equal(stored, ref_k.to(FLOAT_TYPES[kind]))
    # the first layer's keys match exactly; later layers and the logits drift by the rounding
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert rel < {"f16": 2e-2, "bf16": 4e-2, "q8_0": 4e-2}[kind], rel


@pytest.mark.parametrize("kinds", [("bf16", "bf16"), ("q8_0", "q8_0"), ("q8_0", "f16")])
def test_decode_stays_batch_invariant(model_file, kinds):
    lm = load_model(model_file, context=64, max_batch=ROWS, progress=False, cache_types=kinds)
    assert batched_vs_alone(lm.model) == 0.0


@pytest.mark.parametrize("kind", TYPES)
def test_move_and_copy_on_every_type(model_file, kind):
    """A context-shift move re-rotates keys (dequantised, rotated, stored again); a RAM-cache copy
    comes back bit for bit."""
    ref_lm, _ = _run(model_file, ("f32", "f32"), steps=0)
    lm, _ = _run(model_file, (kind, kind), steps=0)
    for m in (ref_lm.model, lm.model):
        m.shift_kv(0, 8, 2, 16)
    ref_k = keys(ref_lm, 1, 2, 18)
    cache = lm.model.layers[1].cache
    moved = cache.k.decode(cache.positions(cache.k, lm.model.row_table(0), 2, 18)).float()
    if kind == "q8_0":
        moved = hadamard(moved, 64)  # the cache holds keys turned; turned again, they are keys
    assert float((moved - ref_k).abs().max() / ref_k.abs().max()) < 3e-2
    saved = lm.model.read_kv(0, 18)
    before = [p.clone() for p in saved[1]]
    lm.model.setup_caches(1, 128)  # fresh, empty rows of the same types
    lm.model.write_kv(0, saved, 18)
    assert all(torch.equal(a, b) for a, b in zip(lm.model.read_kv(0, 18)[1], before))
    assert lm.model.layers[0].cache.types == (kind, kind)


def test_bytes_per_token(model_file):
    per = {k: load_model(model_file, context=16, progress=False, cache_types=(k, k)).model.kv_bytes_per_token()
           for k in ("f32", "bf16", "q8_0")}
    n = 2 * 2 * 2 * 64  # layers × (K, V) × heads × head size
    assert per == {"f32": 4 * n, "bf16": 2 * n, "q8_0": n + n // 32 * 2}


def test_flags_reach_the_model(model_file, tiny_model):
    from nkat_runtime.cli import common
    from nkat_runtime.cli.generate import build_parser

    for flags, kinds in (([], ("bf16", "bf16")), (["--reference-math"], ("f32", "f32")),
                         (["--reference-math", "-ctv", "q8_0"], ("f32", "q8_0")), (["-ctk", "q8_0", "-ctv", "bf16"], ("q8_0", "bf16")),
                         (["--quantkv", "1"], ("q8_0", "q8_0")), (["--quantkv", "0", "-ctv", "f32"], ("f16", "f32"))):
        args = build_parser().parse_args(["--model", str(model_file), *flags])
        assert common.load_from_args(args, progress=False).model.layers[0].cache.types == kinds
    with pytest.raises(ValueError, match="multiple of 32"):  # the usual tiny model has 16-wide heads
        load_model(tiny_model("llama"), context=16, progress=False, cache_types=("q8_0", "f32"))
