"""Batch invariance at model level: a decode step's row gets the bits it gets alone.

Each case prefills 8 sequences one by one, then runs decode steps for all 8 together, for 3 of
them, and for each alone, and compares the logits bit for bit. It runs on the real models (the
types and shapes users have: Q6_K fused planes, two-part int4, biases, tied heads, GQA) and on tiny ones
(θ over packed weights, the reference path), at torch's thread count and at 3 threads (an odd
count splits element-wise work unevenly: torch then computes some elements with scalar code).
The slow tier repeats the real-model case under other instruction sets (``test_isa_matrix``).
"""

from __future__ import annotations

import os

import pytest
import torch

from nkat_runtime.loader import load_model
from nkat_runtime.model.linear import RowLocal

ROWS, PROMPT = 8, 12
STEPS = int(os.environ.get("NKAT_INVARIANCE_STEPS", "3"))  # decode steps compared (the scalar ISA case: 1)


def batched_vs_alone(model) -> float:
    """The largest |Δ| between a row decoded in a batch (of 8, and of 3) and decoded alone."""
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    tokens = torch.randint(3, min(vocab, 5000), (ROWS, PROMPT + STEPS), generator=g)
    for b in range(ROWS):
        model(tokens[b : b + 1, : PROMPT - 1], torch.arange(PROMPT - 1), rows=[b])
    worst = 0.0
    for s in range(STEPS):
        p = PROMPT - 1 + s
        alone = [model(tokens[b : b + 1, p : p + 1], torch.tensor([[p]]), rows=[b])[0, -1] for b in range(ROWS)]
        for rows in (list(range(ROWS)), [2, 5, 6]):
            batched = model(tokens[rows, p : p + 1], torch.full((len(rows), 1), p), rows=rows)[:, -1]
            worst = max([worst] + [float((alone[r] - batched[i]).abs().max()) for i, r in enumerate(rows)])
    return worst


@pytest.fixture(params=[None, 3], ids=["default-threads", "3-threads"])
def threads(request):
    before = torch.get_num_threads()
    if request.param:
        torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["gemma3-270m", pytest.param("qwen2.5-coder-0.5b", marks=pytest.mark.slow),
                                  pytest.param("smollm2-135m", marks=pytest.mark.slow)])
def test_real_model_rows_are_batch_invariant(model_path, name, threads):
    lm = load_model(model_path(name), context=64, max_batch=ROWS, progress=False)
    assert batched_vs_alone(lm.model) == 0.0, torch.backends.cpu.get_cpu_capability()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
def test_tiny_model_rows_are_batch_invariant(tiny_model, arch, reference, threads):
    lm = load_model(tiny_model(arch), context=64, max_batch=ROWS, progress=False, reference=reference)
    assert batched_vs_alone(lm.model) == 0.0


def test_theta_over_packed_weights_is_batch_invariant(tiny_model, tmp_path):
    from nkat_runtime.model.theta_fused import set_theta_fusion
    from nkat_runtime.model.theta_linear import theta_layers
    from nkat_runtime.theta.convert import ConvertOptions, convert

    out = tmp_path / "t.nkat"
    convert(ConvertOptions(tiny_model("llama"), out, rank=4, gamma=0.9, progress=False))
    lm = load_model(out, context=64, max_batch=ROWS, progress=False)
    layers = theta_layers(lm.model)
    assert any(not t.folded for t in layers)  # over packed bases θ runs from the input
    assert set_theta_fusion(lm.model, True) > 0  # q/k/v and gate/up: one stacked right product
    assert batched_vs_alone(lm.model) == 0.0


def test_the_flag_turns_row_local_decode_off_and_on(tiny_model):
    lm = load_model(tiny_model("qwen2"), context=64, progress=False, batch_invariant=False)
    layers = [m for m in lm.model.modules() if isinstance(m, RowLocal)]
    assert layers and not any(m.row_local for m in layers)
    assert lm.model.set_batch_invariant(True) == len(layers) and all(m.row_local for m in layers)


def test_the_command_line_flag_reaches_the_model(tiny_model):
    from nkat_runtime.cli import common
    from nkat_runtime.cli.generate import build_parser

    for flag, on in (([], True), (["--deterministic"], True), (["--no-deterministic"], False)):
        args = build_parser().parse_args(["--model", str(tiny_model("llama")), *flag])
        lm = common.load_from_args(args, progress=False)
        assert all(m.row_local == on for m in lm.model.modules() if isinstance(m, RowLocal))


