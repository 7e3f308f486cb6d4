"""No silent ignoring: a file with a tensor or metadata key that would change the math and that
NKAT does not implement is refused with one line naming it (exit 2), never run wrong."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ggufgen import write_tiny_model
from nkat_runtime.errors import UnsupportedError
from nkat_runtime.loader import load_model

CASES = {
    "unknown tensor": (dict(extra_tensors={"blk.0.attn_gate.weight": (64, 64)}), "blk.0.attn_gate.weight"),
    "expert tensors without expert_count": (dict(extra_tensors={"blk.0.ffn_gate_inp.weight": (4, 64)}), "expert"),
    "experts on qwen2": (dict(arch="qwen2", extra_metadata={"qwen2.expert_count": 4}), "mixture of experts"),
    "logit soft-capping": (dict(extra_metadata={"llama.final_logit_softcapping": 30.0}), "final_logit_softcapping"),
    "sliding window on llama": (dict(extra_metadata={"llama.attention.sliding_window": 16}), "sliding_window"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_by_name(case, tmp_path):
    kwargs, needle = CASES[case]
    kwargs = {"arch": "llama", **kwargs}
    path = write_tiny_model(tmp_path / "m.gguf", **kwargs)
    with pytest.raises(UnsupportedError, match=needle):
        load_model(path, device="cpu", context=16, progress=False, reference=True)
    res = subprocess.run([sys.executable, "-m", "nkat_runtime.cli.generate", "--model", str(path), "--prompt", "hi",
                          "--max-tokens", "1"], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in res.stderr, res.stderr


def test_harmless_and_known_tensors_load(tmp_path):
    """Listed harmless tensors load, and a window as long as the context does not refuse."""
    path = write_tiny_model(tmp_path / "ok.gguf", "llama", extra_tensors={"blk.0.attn_rot_embd": (8,)},
                            extra_metadata={"llama.attention.sliding_window": 256})
    lm = load_model(path, device="cpu", context=16, progress=False, reference=True)
    assert lm.model(torch.tensor([[1, 2, 3]]), torch.arange(3)).isfinite().all()


def test_rope_freqs_change_the_output(tmp_path):
    """A file's rope_freqs (Llama 3.1 scaling) is applied: factors of 1 change nothing, others do."""
    ids, pos = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]]), torch.arange(8)
    plain = load_model(write_tiny_model(tmp_path / "a.gguf", "llama"), device="cpu", context=16, progress=False,
                       reference=True).model(ids, pos)
    lm = load_model(write_tiny_model(tmp_path / "b.gguf", "llama", extra_tensors={"rope_freqs.weight": (8,)}),
                    device="cpu", context=16, progress=False, reference=True)
    assert lm.model.rope_freqs is not None and not torch.equal(lm.model(ids, pos), plain)


def test_backend_selector_sees_the_refusal(tmp_path):
    """The start-up probe reports what the loader would refuse, so the selector can hand the file
    to Kobold.cpp instead of starting NKAT on it."""
    from nkat_selector.probe import probe_model

    bad = write_tiny_model(tmp_path / "bad.gguf", "llama", extra_tensors={"blk.0.attn_gate.weight": (64, 64)})
    good = write_tiny_model(tmp_path / "good.gguf", "llama")
    assert any("blk.0.attn_gate.weight" in u for u in probe_model(bad).unsupported)
    assert probe_model(good).unsupported == []
