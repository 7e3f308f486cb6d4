"""Hostile and damaged model files, hostile chat templates, and writers killed mid-write.

* Fuzz: ``gguf_fuzz.py`` mutates small real GGUF and .nkat files (bit flips, truncation, huge
  counts and lengths, out-of-file / overlapping / unaligned offsets, huge dimensions, unknown
  types, NaN and inf scales) and loads each one in a worker under a memory limit and a
  watchdog. ``NKAT_FUZZ_CASES`` sets the case count (CI: 2000).
* A chat template that reaches for Python internals, carried in a generated GGUF, is refused and
  the server keeps serving.
* The converter and the optimiser, killed while writing, leave the previous output whole and no
  half file under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nkat_runtime.gguf.reader import open_gguf
from nkat_runtime.theta.convert import ConvertOptions, convert

HERE = Path(__file__).resolve().parent
FUZZ_CASES = int(os.environ.get("NKAT_FUZZ_CASES", "2000"))
CASE_TIMEOUT_S = 60  # no case may take longer (a hang)


def _fuzz_seeds(tiny_model, tmp_path: Path) -> list[Path]:
    nkat = tmp_path / "seed.nkat"
    convert(ConvertOptions(input=tiny_model("llama"), output=nkat, rank=4, progress=False))
    return [tiny_model("llama"), tiny_model("gemma3"), tiny_model("qwen2"), nkat]


def test_fuzzed_model_files_are_rejected_or_load_never_crash(tiny_model, tmp_path):
    seeds = _fuzz_seeds(tiny_model, tmp_path)
    proc = subprocess.Popen([sys.executable, str(HERE / "gguf_fuzz.py"), *map(str, seeds), "--cases",
                             str(FUZZ_CASES), "--seed", os.environ.get("NKAT_FUZZ_SEED", "1")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
    verdicts: dict[str, int] = {"ok": 0, "rejected": 0}
    crashes, other, peak = [], [], None
    last = "(before the first case)"
    while True:
        try:
            line = lines.get(timeout=CASE_TIMEOUT_S)
        except queue.Empty:
            proc.kill()
            pytest.fail(f"a fuzz case hung for {CASE_TIMEOUT_S} s; the last finished: {last}")
        if line is None:
            break
        line = line.rstrip()
        if line.startswith("case "):
            last = line
            verdict = line.split(": ", 1)[1]
            if verdict.startswith("CRASH"):
                crashes.append(line)
            else:
                verdicts[verdict.split(" ", 1)[0]] += 1
        elif line.startswith("peak_rss_mb"):
            peak = int(line.split()[1])
        else:
            other.append(line)
    assert proc.wait(60) == 0, "\n".join(other[-20:])
    assert not crashes, "\n".join(crashes[:20])
    assert sum(verdicts.values()) == FUZZ_CASES
    assert verdicts["ok"] > 0 and verdicts["rejected"] > 0  # both outcomes were exercised
    assert peak is not None and peak < 1500, f"peak RSS {peak} MiB"
    print(f"\nfuzz: {FUZZ_CASES} cases, {verdicts['ok']} loaded, {verdicts['rejected']} rejected, 0 crashes, "
          f"peak RSS {peak} MiB")


# --- chat template injection ---------------------------------------------------------------------
EXPLOIT = ("{% for c in ().__class__.__base__.__subclasses__() %}{% if c.__name__ == 'catch_warnings' %}"
           "{{ c()._module.__builtins__['__import__']('os').system('touch MARKER') }}{% endif %}{% endfor %}"
           "{{ messages[0]['content'] }}")


def test_template_exploit_in_a_gguf_is_refused_and_the_server_stays_up(tmp_path):
    from ggufgen import write_tiny_model
    from serverproc import Server

    marker = tmp_path / "pwned"
    model = write_tiny_model(tmp_path / "evil.gguf", "llama", chat_template=EXPLOIT.replace("MARKER", str(marker)))
    srv = Server(tmp_path, "--model", str(model), "--parallel", "1")
    try:
        r = srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status in (400, 422, 500) and "template" in r.json()["error"]["message"].lower()
        assert not marker.exists()
        assert srv.get("/api/v1/model").status == 200
        ok = srv.post("/v1/completions", {"prompt": "the", "max_tokens": 2})
        assert ok.status == 200 and ok.json()["usage"]["completion_tokens"] == 2
    finally:
        srv.stop()
    assert not marker.exists() and "Traceback" not in srv.log()


# --- killed mid-write ----------------------------------------------------------------------------
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
