"""Hostile and damaged model files and hostile chat templates (writers killed mid-write and the
long fuzz: ``tests/slow/``).

* Fuzz: ``gguf_fuzz.py`` mutates small real GGUF and .nkat files (bit flips, truncation, huge
  counts and lengths, out-of-file / overlapping / unaligned offsets, huge dimensions, unknown
  types, NaN and inf scales) and loads each one in a worker under a memory limit and a
  watchdog. ``NKAT_FUZZ_CASES`` sets the case count (the fast tier: 800; the slow tier's test_fuzz_long runs 5,000).
* A chat template that reaches for Python internals, carried in a generated GGUF, is refused and
  the server keeps serving.
"""

from __future__ import annotations

import os

from gguf_fuzz import campaign, fuzz_seeds

FUZZ_CASES = int(os.environ.get("NKAT_FUZZ_CASES", "800"))


def test_fuzzed_model_files_are_rejected_or_load_never_crash(tiny_model, tmp_path):
    result = campaign(fuzz_seeds(tiny_model, tmp_path), FUZZ_CASES, int(os.environ.get("NKAT_FUZZ_SEED", "1")))
    print(f"\nfuzz: {result.cases} cases, {result.loaded} loaded, {result.rejected} rejected, 0 crashes, "
          f"peak RSS {result.peak_rss_mb} MiB")


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
        assert r.status == 400 and "template" in r.json()["error"]["message"].lower()
        assert not marker.exists()
        assert srv.get("/api/v1/model").status == 200
        ok = srv.post("/v1/completions", {"prompt": "the", "max_tokens": 2})
        assert ok.status == 200 and ok.json()["usage"]["completion_tokens"] == 2
    finally:
        srv.stop()
    assert not marker.exists() and "Traceback" not in srv.log()


# --- killed mid-write ----------------------------------------------------------------------------


