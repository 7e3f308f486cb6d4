"""Packed layouts read back from disk (``model/layout_cache.py``) give the same model, bit for bit."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from nkat_runtime.loader import load_model
from nkat_runtime.model import fused, packed
from nkat_runtime.model.layout_cache import layout_dir


@pytest.fixture
def layouts(tmp_path, monkeypatch):
    folder = tmp_path / "layouts"
    monkeypatch.setenv("NKAT_LAYOUT_CACHE", str(folder))
    return folder


def _logits(lm) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        return lm.model(ids, torch.arange(6))


def _forms(lm) -> set[type]:
    return {type(m) for m in lm.model.modules() if isinstance(m, (packed.Int4Linear, fused.FusedLinear))}


def test_second_load_reads_the_layout_and_matches(tiny_model, layouts):
    path = tiny_model("qwen2")
    fresh = load_model(path, device="cpu", context=32, progress=False, layout_cache=False)
    assert not layouts.exists()
    first = load_model(path, device="cpu", context=32, progress=False)
    files = list(layouts.glob("*.pt"))
    assert len(files) == 1
    second = load_model(path, device="cpu", context=32, progress=False)
    assert _forms(fresh) == _forms(second) == {packed.Int4Linear, fused.FusedLinear}
    # the second load's buffers come from the layout file (memory-mapped), not from packing
    stored = torch.load(files[0], mmap=True, weights_only=True)
    n_packed = sum(isinstance(m, (packed.Int4Linear, fused.FusedLinear)) for m in fresh.model.modules())
    assert len(stored) == n_packed
    expected = _logits(fresh)
    assert torch.equal(_logits(first), expected)
    assert torch.equal(_logits(second), expected)
    for a, b in zip(fresh.model.buffers(), second.model.buffers()):
        assert torch.equal(a, b)


def test_changed_file_gets_a_new_layout_and_the_old_one_goes(tiny_model, layouts, tmp_path):
    path = tiny_model("llama")
    copy = tmp_path / "m.gguf"
    copy.write_bytes(path.read_bytes())
    load_model(copy, device="cpu", context=32, progress=False)
    (old,) = layouts.glob("*.pt")
    st = os.stat(copy)
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # "edited": another key
    lm = load_model(copy, device="cpu", context=32, progress=False)
    (new,) = layouts.glob("*.pt")
    assert new != old
    ref = load_model(copy, device="cpu", context=32, progress=False, layout_cache=False)
    assert torch.equal(_logits(lm), _logits(ref))


def test_damaged_layout_is_repacked_and_replaced(tiny_model, layouts, caplog):
    path = tiny_model("llama")
    load_model(path, device="cpu", context=32, progress=False)
    (file,) = layouts.glob("*.pt")
    file.write_bytes(file.read_bytes()[:1000])  # cut short, as by a full disk
    with caplog.at_level(logging.WARNING):
        lm = load_model(path, device="cpu", context=32, progress=False)
    assert "unreadable" in caplog.text
    ref = load_model(path, device="cpu", context=32, progress=False, layout_cache=False)
    assert torch.equal(_logits(lm), _logits(ref))
    assert torch.load(file, mmap=True, weights_only=True)  # rewritten whole


def test_off_switch(monkeypatch):
    monkeypatch.setenv("NKAT_LAYOUT_CACHE", "0")
    assert layout_dir() is None


def test_vec_isa_stamp_skips_the_probes(tmp_path, monkeypatch):
    from torch._inductor import config as inductor_config
    from torch._inductor import cpu_vec_isa

    if fused.platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the stamp covers x86 only")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(inductor_config.cpp, "vec_isa_ok", None)
    assert fused.trust_vec_isa.__wrapped__() is True  # first start: the probes run, then the stamp
    assert inductor_config.cpp.vec_isa_ok is True
    assert (tmp_path / "nkat-vec-isa-ok.json").is_file()

    def no_probe():
        raise AssertionError("probed although the stamp says the probes passed")

    monkeypatch.setattr(inductor_config.cpp, "vec_isa_ok", None)
    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", no_probe)
    assert fused.trust_vec_isa.__wrapped__() is True
