"""Writers killed mid-write: the converter and the optimiser are SIGKILLed the moment a temp file
for an output exists; the output being written is byte-identical to before, and every output parses."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nkat_runtime.gguf.reader import open_gguf
from nkat_runtime.theta.convert import ConvertOptions, convert

pytestmark = pytest.mark.slow


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _valid(path: Path) -> None:
    """The file is whole: it parses as what its name says."""
    if path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".png":
        from PIL import Image

        Image.open(path).load()
    else:
        open_gguf(path)


def _kill_while_writing(cmd: list[str], folder: Path, names: list[str], attempts: int = 6) -> int:
    """Run ``cmd`` up to ``attempts`` times and SIGKILL it as soon as a temp file for one of ``names``
    exists (the write has begun: the temp is created, then filled, then renamed). After each kill the file that was being written is still its previous self, and
    every final name holds a whole file. Returns how many runs were killed mid-write."""
    hits = 0
    for _ in range(attempts):
        before = {n: _digest(folder / n) for n in names}
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        caught = None
        while proc.poll() is None and caught is None:
            for p in folder.iterdir():
                target = next((n for n in names if p.name.startswith(n + ".") and p.suffix == ".tmp"), None)
                if target:
                    proc.send_signal(signal.SIGKILL)
                    caught = target
                    break
            time.sleep(0.0005)
        proc.wait(120)
        if caught is not None:
            hits += 1
            assert _digest(folder / caught) == before[caught], f"{caught} changed although its writer was killed"
        for n in names:
            _valid(folder / n)
        for p in folder.iterdir():
            if p.suffix == ".tmp":
                p.unlink()  # what a killed writer leaves beside the output (never under its name)
        if hits >= 2:
            break
    return hits


def test_converter_killed_mid_write_keeps_the_previous_output(tmp_path):
    from ggufgen import write_tiny_model

    big = write_tiny_model(tmp_path / "big.gguf", "llama", n_layer=6, n_embd=512, n_head=8, n_head_kv=4, n_ff=2048)
    out = tmp_path / "out" / "m.nkat"
    out.parent.mkdir()
    convert(ConvertOptions(input=big, output=out, rank=8, progress=False))
    cmd = [sys.executable, "-m", "nkat_runtime.cli.convert", "--input", str(big), "--output", str(out),
           "--theta-rank", "16"]
    hits = _kill_while_writing(cmd, out.parent, [out.name])
    assert hits >= 1, "the writer was never caught writing"
    assert open_gguf(out).get("nkat.theta.rank") == 8  # the previous output, whole


def test_optimiser_killed_mid_write_keeps_the_previous_outputs(tmp_path):
    from ggufgen import write_tiny_model

    model = write_tiny_model(tmp_path / "m.gguf", "llama", n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=512)
    out = tmp_path / "opt"
    base = [sys.executable, "-m", "nkat_runtime.cli.autoopt", "--model", str(model), "--output-dir", str(out),
            "--mode", "custom", "--ctx", "64", "--eval-chunks", "2", "--decode-steps", "4", "--quiet",
            "--storage", f"sqlite:///{tmp_path / 's.db'}", "--study-name", "k"]
    subprocess.run(base + ["--trials", "2"], check=True, capture_output=True)
    names = sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".png", ".nkat"))
    assert "optimization_history.json" in names
    hits = _kill_while_writing(base + ["--trials", "200"], out, names)
    assert hits >= 1, "the writer was never caught writing"
