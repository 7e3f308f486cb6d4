"""backend_selector.py: decisions for a table of probes, the real probe on this machine, the
JSON of a dry run, a real launch of this runtime, and a Kobold.cpp stand-in that dies (the
only stand-in: no Kobold.cpp binary exists on the test machines)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from nkat_selector.launch import LaunchError, LaunchOptions, command, run
from nkat_selector.probe import CPU, GPU, Kobold, ModelInfo, Probe, probe, probe_model
from nkat_selector.rules import SelectionError, Settings, decide
from paths import REPO
from serverproc import free_port

SELECTOR = [sys.executable, str(REPO / "backend_selector.py")]

KOBOLD = Kobold(["/opt/koboldcpp"], "1.102")
SMALL_GPU = GPU(0, "small", 4096, 1500, (7, 5))
LARGE_GPU = GPU(0, "large", 24576, 22000, (8, 9))


def _probe(gpus=(), kobold=Kobold(), kind="gguf", arch="llama", unsupported=(), size_mb=2000.0) -> Probe:
    model = ModelInfo(f"/m/model.{kind}", kind, size_mb, arch, 32, ["Q4_K"], list(unsupported))
    return Probe("3.11", "2.13", "12.4" if gpus else "", list(gpus), CPU(8, 32000, True), model, kobold)


@pytest.mark.parametrize("case, probe_, expect", [
    ("no GPU", _probe(), ("nkat", "cpu")),
    ("no GPU, Kobold.cpp present", _probe(kobold=KOBOLD), ("nkat", "cpu")),
    ("large GPU", _probe([LARGE_GPU], KOBOLD), ("nkat", "cuda")),
    ("small GPU, Kobold.cpp present: partial offload", _probe([SMALL_GPU], KOBOLD), ("koboldcpp", "cuda")),
    ("small GPU, Kobold.cpp absent: NKAT on the CPU", _probe([SMALL_GPU]), ("nkat", "cpu")),
    (".nkat even where Kobold.cpp would win", _probe([SMALL_GPU], KOBOLD, kind="nkat"), ("nkat", "cpu")),
    (".nkat on a large GPU", _probe([LARGE_GPU], KOBOLD, kind="nkat"), ("nkat", "cuda")),
    ("unsupported architecture, Kobold.cpp present", _probe([LARGE_GPU], KOBOLD, arch="mamba",
                                                            unsupported=["architecture mamba"]), ("koboldcpp", "cuda")),
])
def test_decision_table(case, probe_, expect):
    d = decide(probe_, Settings())
    assert (d.backend, d.device) == expect, case
    assert d.reasons and all(isinstance(r, str) and r for r in d.reasons)


def test_partial_offload_counts_layers_that_fit():
    d = decide(_probe([SMALL_GPU], KOBOLD), Settings())
    # 1500 MiB free - 1024 headroom = 476 MiB of a 2400 MiB need → 6 of 32 layers
    assert d.gpu_layers == 6 and "partial offload of 6 of 32 layers" in " ".join(d.reasons)


def test_preference_and_its_fallback():
    assert decide(_probe([LARGE_GPU], KOBOLD), Settings(prefer="koboldcpp")).backend == "koboldcpp"
    d = decide(_probe([LARGE_GPU]), Settings(prefer="koboldcpp"))
    assert d.backend == "nkat" and any("absent" in r for r in d.reasons)


def test_unsupported_without_kobold_is_a_clear_error():
    with pytest.raises(SelectionError, match="does not support architecture mamba.*Kobold.cpp was not found"):
        decide(_probe(arch="mamba", unsupported=["architecture mamba"]), Settings())


def test_real_probe_on_this_machine(tiny_model):
    found = probe(str(tiny_model("llama")))
    assert found.cpu.cores >= 1 and found.cpu.ram_mb > 256
    assert found.python.startswith("3.") and found.torch
    for g in found.gpus:
        assert g.total_mb >= g.free_mb >= 0 and g.name
    m = found.model
    assert (m.kind, m.arch, m.n_layer, m.unsupported, m.error) == ("gguf", "llama", 2, [], "")
    assert {"Q4_0", "Q8_0", "F32"} <= set(m.tensor_types)


def test_probe_reports_unreadable_and_unsupported_files(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 4)
    assert "not a GGUF file" in probe_model(bad).error


def test_dry_run_json_parses(tiny_model):
    out = subprocess.run([*SELECTOR, "--model", str(tiny_model("llama")), "--dry-run", "--json", "--port", "5999"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["decision"]["backend"] == "nkat" and doc["error"] is None
    assert doc["probe"]["model"]["arch"] == "llama"
    cmd = doc["command"]
    assert cmd[1:4] == ["-m", "nkat_server.cli", "--model"] and "5999" in cmd


def test_check_exits_zero_when_the_backend_can_start(tiny_model):
    out = subprocess.run([*SELECTOR, "--model", str(tiny_model("llama")), "--check", "--port", str(free_port())],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[ok  ] backend: nkat on cpu" in out.stdout and "Kobold.cpp" in out.stdout


def test_launches_this_runtime_and_stops_on_sigterm(tiny_model, tmp_path):
    port = free_port()
    proc = subprocess.Popen([*SELECTOR, "--model", str(tiny_model("llama")), "--port", str(port), "--ctx", "256"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 180
        lines = []
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if "ready: http://127.0.0.1" in line or time.monotonic() > deadline:
                break
        assert any("ready" in line for line in lines), "".join(lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/model", timeout=10) as r:
            assert json.loads(r.read())["result"].startswith("koboldcpp/")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def _fake_kobold(tmp_path: Path) -> Path:
    fake = tmp_path / "koboldcpp"
    fake.write_text("#!/bin/sh\n"
                    "if [ \"$1\" = --version ]; then echo 1.102; exit 0; fi\n"
                    "echo 'fake koboldcpp: CUDA error: out of memory'\nexit 3\n")
    fake.chmod(0o755)
    return fake


def test_kobold_that_dies_is_reported_with_its_output(tiny_model, tmp_path):
    fake = _fake_kobold(tmp_path)
    out = subprocess.run([*SELECTOR, "--model", str(tiny_model("llama")), "--prefer", "koboldcpp", "--koboldcpp",
                          str(fake), "--port", str(free_port()), "--ready-timeout", "30"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 1
    assert "exited with status 3 before it was ready" in out.stderr
    assert "fake koboldcpp: CUDA error: out of memory" in out.stderr
    assert "Traceback" not in out.stderr


def test_port_in_use_is_refused(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        opts = LaunchOptions("m.gguf", port=port)
        with pytest.raises(LaunchError, match=f"port {port} on 127.0.0.1 is in use"):
            run(["true"], opts)


def test_password_is_passed_and_masked():
    from nkat_selector.launch import shown

    d = decide(_probe(kobold=KOBOLD), Settings(prefer="koboldcpp"))
    cmd = command(d, _probe(kobold=KOBOLD), LaunchOptions("m.gguf", password="s3cret", ctx=8192))
    assert cmd[cmd.index("--password") + 1] == "s3cret" and cmd[cmd.index("--contextsize") + 1] == "8192"
    assert "s3cret" not in shown(cmd)
