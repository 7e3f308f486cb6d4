"""The forward pass on tiny random-weight models of each architecture: cached decode
equals a full recompute, the sliding window is honoured, and sampling/generation run."""

from __future__ import annotations

import pytest
import torch

from nkat_runtime.loader import load_model
from nkat_runtime.sampling.params import SamplingParams
from nkat_runtime.serve.driver import generate
from nkat_runtime.serve.sequence import GenerationParams

ARCHS = ["llama", "qwen2", "gemma3"]


@pytest.mark.parametrize("reference", [True, False], ids=["reference", "fast"])
@pytest.mark.parametrize("arch", ARCHS)
def test_decode_equals_full_prefill(tiny_model, arch, reference):
    """Exact on the reference path; on the fast path the full prefill takes the dense bf16
    GEMM and the steps the int4 kernel, so they agree to bf16 rounding (2 % of max |logit|)."""
    lm = load_model(tiny_model(arch), device="cpu", context=64, progress=False, reference=reference)
    gen = torch.Generator().manual_seed(1)
    seq = torch.randint(3, lm.config.vocab_size, (1, 20), generator=gen)
    full = lm.model(seq, torch.arange(20))  # [1, 20, V]
    n_prompt = 7
    step_logits = [lm.model(seq[:, :n_prompt], torch.arange(n_prompt))[:, -1]]
    for pos in range(n_prompt, 20):
        step_logits.append(lm.model(seq[:, pos : pos + 1], torch.tensor([pos]))[:, -1])
    stepped = torch.stack(step_logits[:-1], dim=1)  # predictions for positions n_prompt-1 .. 18
    expected = full[:, n_prompt - 1 : 19]
    if reference:
        torch.testing.assert_close(stepped, expected, rtol=1e-4, atol=1e-4)
    else:
        assert (stepped - expected).abs().max() <= 0.02 * expected.abs().max()
    assert torch.isfinite(full).all()


def test_gemma3_sliding_window_changes_local_layers(tiny_model):
    """With a window of 4, tokens more than 4 back must not influence local layers: the
    result differs from the same model with a huge window once the prompt is longer."""
    small = load_model(tiny_model("gemma3", sliding_window=4), context=64, progress=False, reference=True)
    large = load_model(tiny_model("gemma3", sliding_window=4096), context=64, progress=False, reference=True)
    assert small.config.swa_layers == [True] * 5 + [False]
    seq = torch.randint(3, small.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    a = small.model(seq, torch.arange(12))
    b = large.model(seq, torch.arange(12))
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=1e-5, atol=1e-5)  # inside the window: same
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3  # beyond it: the window matters


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_greedy_and_seeded(tiny_model, arch):
    lm = load_model(tiny_model(arch), context=64, progress=False)
    prompt = lm.tokenizer.encode("the and of")
    g1 = generate(lm, prompt, GenerationParams(10, SamplingParams.greedy(), stop_ids=()))
    g2 = generate(lm, prompt, GenerationParams(10, SamplingParams.greedy(), stop_ids=()))
    assert g1.token_ids == g2.token_ids and len(g1.token_ids) == 10 and g1.finish_reason == "length"
    sampled = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=123)
    s1 = generate(lm, prompt, GenerationParams(10, sampled, stop_ids=()))
    s2 = generate(lm, prompt, GenerationParams(10, sampled, stop_ids=()))
    assert s1.token_ids == s2.token_ids


def test_generation_stops_at_context_end(tiny_model):
    lm = load_model(tiny_model("llama"), context=16, progress=False)
    prompt = lm.tokenizer.encode("the the the")
    res = generate(lm, prompt, GenerationParams(100, SamplingParams.greedy(), stop_ids=()))
    assert len(prompt) + len(res.token_ids) == 16 and res.finish_reason == "length"
