"""The fast path against the reference path on the real models (logits of prompts, prefill and
decode steps), and the compiled decode step against eager."""

from __future__ import annotations

import gc

import pytest
import torch

from nkat_runtime.loader import load_model
from nkat_runtime.model import packed

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is Paris. It is known for",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to",
]


MODELS = ["gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "smollm2-135m"]


@pytest.fixture(scope="module", params=MODELS)
def both(request, model_path):
    path = model_path(request.param)
    fast = load_model(path, device="cpu", context=512, progress=False, cache_types=("f32", "f32"))  # weights, not cache
    ref = load_model(path, device="cpu", context=512, progress=False, reference=True)
    yield request.param, fast, ref
    del fast, ref
    gc.collect()


#: SmolLM2's bound: its activations have the largest outliers of the four, and the int4 kernel's bf16
#: activations move its decode logits by up to 1.29 % of their range on an AMD EPYC (AVX-512), 2.04 % on
#: a Xeon with AVX512-FP16 and AMX (1.71 % there under ATEN_CPU_CAPABILITY=avx2; the int4 kernel itself
#: gave the same bits under both): rounding, not a kernel fault
SHARE = {"smollm2-135m": 0.025}


def _check_logits(fast_logits: torch.Tensor, ref_logits: torch.Tensor, what: str,
                  worst: list[float] | None = None, share: float = 0.02) -> None:
    """Max |Δ| ≤ ``share`` (2 %) of the largest |logit|, and the same argmax wherever the reference's
    top-2 margin is wider than that bound (closer calls are decided by rounding).

    The first position of a prompt (BOS) is allowed 1.5 times as much: SmolLM2's BOS row carries its
    largest activations, and bf16 activations move its logits by 2.4 % of their range
    (measured on the AMD EPYC)."""
    bound = share * float(ref_logits.abs().max())
    diff = (fast_logits - ref_logits).abs().amax(dim=-1)  # per position
    if worst is not None:
        worst.append(float(diff[..., 1:].max() if diff.shape[-1] > 1 else diff.max()) / (bound / share))
    if diff.shape[-1] > 1:
        assert float(diff[..., 0].max()) <= 1.5 * bound, what
        diff = diff[..., 1:]
    assert float(diff.max()) <= bound, what
    top2 = ref_logits.topk(2, dim=-1).values
    decided = (top2[..., 0] - top2[..., 1]) > bound
    same = fast_logits.argmax(-1) == ref_logits.argmax(-1)
    assert bool(same[decided].all()), what
    assert float(same.float().mean()) >= 0.9, what


def test_real_model_logits_match_reference(both, capsys):
    name, fast, ref = both
    worst: list[float] = []
    share = SHARE.get(name, 0.02)
    tok = fast.tokenizer
    for prompt in PROMPTS:  # short prompts: the int4 kernel
        ids = torch.tensor([tok.encode(prompt, add_special=True)])
        pos = torch.arange(ids.shape[1])
        _check_logits(fast.model(ids, pos), ref.model(ids, pos), f"{name}: {prompt!r}", worst, share)
    text = " ".join(PROMPTS) * 12  # a long prompt: the kernels' prefill, the dense one, then decode steps
    ids = torch.tensor([tok.encode(text, add_special=True)[:300]])
    dense = packed.DENSE_FROM_ROWS
    assert ids.shape[1] >= dense
    for rows in (dense, 80):  # the dense path, then the kernels' (whose cache the decode steps read)
        _check_logits(fast.model(ids[:, :rows], torch.arange(rows)), ref.model(ids[:, :rows], torch.arange(rows)),
                      f"{name}: prefill of {rows}", share=share)
    for p in range(80, 96):
        step = ids[:, p : p + 1], torch.tensor([p])
        _check_logits(fast.model(*step), ref.model(*step), f"{name}: decode at {p}", worst, share)
    with capsys.disabled():
        print(f"\n{name}: largest |Δlogit| of prompts and decode steps (BOS row aside): "
              f"{100 * max(worst):.2f} % of the largest |logit| (bound {100 * share:g} %)")


def test_compiled_decode_matches_eager(tiny_model, inductor_cache):
    path = tiny_model("llama")  # 2 layers: compiling gemma3's 6 took 133 s of the slow tier
    # float32 cache: inductor does not round the fused bf16 store-and-read as eager does (2e-3 apart)
    eager = load_model(path, context=64, progress=False, cache_types=("f32", "f32"))
    compiled = load_model(path, context=64, progress=False, compile=True, cache_types=("f32", "f32"))
    seq = torch.randint(3, eager.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4))
    for lm in (eager, compiled):
        lm.model(seq[:, :8], torch.arange(8))
    for p in range(8, 12):
        step = seq[:, p : p + 1], torch.tensor([p])
        torch.testing.assert_close(compiled.model(*step), eager.model(*step), rtol=1e-3, atol=1e-3)
