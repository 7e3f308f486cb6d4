"""A real nkat-server with the real default model (Gemma 3 270M), driven the way KoboldAI Lite,
SillyTavern (KoboldCpp and Classic modes) and llama.cpp clients drive KoboldCpp; plus bad input.

One server for the module; generations stay a few tokens long (the CPU path is slow)."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest

from client_bodies import LITE, ST_KOBOLDCPP
from nkat_runtime import bundled
from nkat_runtime.gguf.reader import open_gguf
from nkat_runtime.text.tokenizer import Tokenizer
from serverproc import Server, sse_data

# KoboldAI Lite reads the stream with a strict "event: X \n data: Y \n\n" regex (spec §1.6)
KOBOLD_FRAME = re.compile(r"event: message\ndata: (\{[^\n]*\})\n\n")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("kobold-server"), "--max-queue", "2", "--parallel", "1")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_metadata(open_gguf(bundled.gemma3_270m()).metadata)


def alive(server: Server) -> None:
    r = server.get("/api/v1/model")
    assert r.status == 200 and r.json()["result"].startswith("koboldcpp/")


def test_startup_log_names_model_device_context_and_url(server):
    log = server.log()
    assert "gemma-3-270m" in log and "cpu" in log and "context 4096" in log and "θ: none" in log
    assert f"http://127.0.0.1:{server.port}" in log


def test_kobold_lite_connect_sequence(server):
    auth = {"Authorization": "Bearer anything"}  # no password set: any key is accepted
    assert server.get("/api/v1/model", headers=auth).json() == {"result": "koboldcpp/gemma-3-270m-q4_k_m"}
    assert server.get("/api/v1/info/version", headers=auth).json() == {"result": "1.2.5"}
    assert server.get("/api/v1/config/max_context_length", headers=auth).json() == {"value": 4096}
    v = server.get("/api/extra/version", headers=auth).json()
    assert v["result"] == "KoboldCpp" and v["protected"] is False
    assert [int(x) for x in v["version"].split(".")] >= [1, 76]
    assert server.get("/api/extra/true_max_context_length", headers=auth).json() == {"value": 4096}
    assert server.get("/api/extra/preloadstory", headers=auth).json() == {}
    assert server.get("/sdapi/v1/sd-models", headers=auth).json() == []
    assert server.get("/api/v1/config/max_length").json()["value"] > 0
    perf = server.get("/api/extra/perf").json()
    assert {"last_process", "last_eval", "total_gens", "queue", "idle", "stop_reason", "uptime"} <= perf.keys()
    # Lite's generate body (its sampler set, memory, genkey, stop sequences)
    r = server.post("/api/v1/generate", dict(LITE, max_length=4, prompt="The weather today is"))
    assert r.status == 200
    res = r.json()["results"][0]
    assert isinstance(res["text"], str) and res["finish_reason"] in ("stop", "length")
    assert res["completion_tokens"] <= 4


def test_generate_and_stream_agree_with_strict_framing(server):
    body = {"prompt": "The capital of France is", "max_length": 6, "temperature": 0, "rep_pen": 1.0}
    text = server.post("/api/v1/generate", body).json()["results"][0]["text"]
    r = server.post("/api/extra/generate/stream", body)
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    raw = r.body.decode("utf-8")
    frames = KOBOLD_FRAME.findall(raw)
    assert "".join(f"event: message\ndata: {f}\n\n" for f in frames) == raw  # nothing else on the wire
    events = [json.loads(f) for f in frames]
    assert all(e["finish_reason"] is None for e in events[:-1])
    assert events[-1] == {"token": "", "finish_reason": "length"}
    assert "".join(e["token"] for e in events) == text
    assert "[DONE]" not in raw


def test_same_seed_same_text(server):
    body = {"prompt": "In the forest there", "max_length": 6, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
            "sampler_seed": 4242}
    a = server.post("/api/v1/generate", body).json()["results"][0]["text"]
    b = server.post("/api/v1/generate", body).json()["results"][0]["text"]
    assert a == b
    assert server.get("/api/extra/perf").json()["last_seed"] == 4242
    oa = {"prompt": "In the forest there", "max_tokens": 5, "temperature": 1.0, "seed": 7}
    assert server.post("/v1/completions", oa).json()["choices"][0]["text"] == \
        server.post("/v1/completions", oa).json()["choices"][0]["text"]


def _long_generation(server: Server, body: dict) -> tuple[dict, threading.Thread]:
    out: dict = {}

    def go():
        t0 = time.time()
        out["reply"] = server.post("/api/v1/generate", body)
        out["seconds"] = time.time() - t0

    t = threading.Thread(target=go)
    t.start()
    return out, t


def _wait_for_text(server: Server, genkey: str | None) -> str:
    deadline = time.time() + 300
    while time.time() < deadline:
        r = server.post("/api/extra/generate/check", {"genkey": genkey} if genkey is not None else None)
        text = r.json()["results"][0]["text"]
        if text:
            return text
        time.sleep(0.2)
    raise AssertionError("the generation never produced text")


def test_check_and_abort_by_genkey(server):
    body = {"prompt": "Write a very long story about a dragon.", "max_length": 200, "genkey": "KCPP7777",
            "ban_eos_token": True}
    out, t = _long_generation(server, body)
    partial = _wait_for_text(server, "KCPP7777")
    assert server.post("/api/extra/generate/check", {"genkey": "KCPP0000"}).json() == {"results": [{"text": ""}]}
    assert server.post("/api/extra/abort", {"genkey": "KCPP0000"}).json()["success"] == "false"
    assert server.post("/api/extra/abort", {"genkey": "KCPP7777"}).json() == {"success": "true", "done": "true"}
    t.join(300)
    res = out["reply"].json()["results"][0]
    assert res["text"].startswith(partial) and res["completion_tokens"] < 200  # ended early


def test_bodyless_abort_stops_the_running_generation(server):
    out, t = _long_generation(server, {"prompt": "List every number:", "max_length": 200, "ban_eos_token": True})
    _wait_for_text(server, None)
    r = server.request("POST", "/api/extra/abort", raw=b"", headers={"Content-Type": ""})
    assert r.json() == {"success": "true", "done": "true"}
    t.join(300)
    assert out["reply"].json()["results"][0]["completion_tokens"] < 200


def test_tokencount_matches_the_tokenizer(server, tokenizer):
    text = "Hello, world! Ünïcödé 你好 — tokens\n\nnew line"
    r = server.post("/api/extra/tokencount", {"prompt": text}).json()
    assert r["ids"] == tokenizer.encode(text, add_special=True) and r["value"] == len(r["ids"])
    plain = server.post("/api/extra/tokenize", {"prompt": text, "special": False}).json()
    assert plain["ids"] == tokenizer.encode(text, add_special=False)
    back = server.post("/api/extra/detokenize", {"ids": plain["ids"]}).json()
    assert back == {"result": text, "success": True}
    assert server.post("/api/extra/tokencount", {"prompt": 5}).status == 400


def test_sillytavern_koboldcpp_mode(server):
    body = dict(ST_KOBOLDCPP, prompt="User: Hi!\nAssistant:", max_tokens=4, stream=False)
    r = server.post("/v1/completions", body, headers={"Authorization": "Bearer whatever"})
    assert r.status == 200
    choice = r.json()["choices"][0]
    assert isinstance(choice["text"], str) and choice["finish_reason"] in ("stop", "length")
    streamed = server.post("/v1/completions", dict(body, stream=True))
    data = sse_data(streamed.body)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    # SillyTavern Classic: the Kobold route, no auth, its own field set
    classic = {"prompt": "Once upon a time", "use_story": False, "use_memory": False, "max_context_length": 2048,
               "max_length": 3, "rep_pen": 1.1, "rep_pen_range": 1024, "rep_pen_slope": 0.9, "temperature": 0.7,
               "tfs": 1, "top_a": 0, "top_k": 0, "top_p": 0.9, "min_p": 0.05, "typical": 1,
               "sampler_order": [6, 0, 1, 3, 4, 2, 5], "singleline": False, "use_default_badwordsids": False,
               "mirostat": 2, "mirostat_eta": 0.1, "mirostat_tau": 5, "grammar": "", "sampler_seed": -1}
    assert server.post("/api/extra/generate/stream", classic).status == 200


def test_llamacpp_routes(server, tokenizer):
    assert server.get("/health").json() == {"status": "ok"}
    props = server.get("/props").json()
    assert props["default_generation_settings"]["n_ctx"] == 4096 and "start_of_turn" in props["chat_template"]
    r = server.post("/completion", {"prompt": "The capital of France is", "n_predict": 3, "temperature": 0,
                                    "n_probs": 2}).json()
    assert r["stop"] is True and r["tokens_predicted"] <= 3 and r["stop_type"] in ("limit", "eos")
    assert len(r["completion_probabilities"]) == r["tokens_predicted"]
    s = server.post("/completion", {"prompt": "The capital of France is", "n_predict": 3, "temperature": 0,
                                    "stream": True})
    data = [json.loads(d) for d in sse_data(s.body)]
    assert "".join(d["content"] for d in data) == r["content"] and data[-1]["stop"] is True
    toks = server.post("/tokenize", {"content": "Hello world"}).json()["tokens"]
    assert toks == tokenizer.encode("Hello world", add_special=False)
    assert server.post("/detokenize", {"tokens": toks}).json() == {"content": "Hello world"}


def test_clamp_and_truncation_are_reported(server):
    body = {"prompt": "word " * 200, "max_context_length": 64, "max_length": 1000, "stop_sequence": [" "]}
    r = server.post("/api/v1/generate", body)
    assert r.status == 200
    warnings = r.json()["warnings"]
    assert any("clamped" in w for w in warnings) and any("truncated" in w for w in warnings)
    assert "clamped" in r.headers["X-NKAT-Warning"]


@pytest.mark.parametrize("path,raw,status", [
    ("/api/v1/generate", b"{not json", 400),
    ("/v1/completions", b"{not json", 400),
    ("/api/v1/generate", b'{"prompt": "x", "max_length": "lots"}', 400),
    ("/api/v1/generate", b'{"prompt": ["x"]}', 400),
    ("/api/v1/generate", b'{"prompt": "x", "max_length": -5}', 400),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": -1}', 400),
    ("/api/v1/generate", b'{"prompt": ""}', 400),
    ("/v1/chat/completions", b'{"messages": []}', 400),
    ("/v1/completions", json.dumps({"prompt": "word " * 5000, "max_tokens": 4}).encode(), 400),
    ("/completion", json.dumps({"prompt": "word " * 5000}).encode(), 400),
    ("/api/v1/generate", b"[1, 2, 3]", 400),
    ("/api/v1/generate", b'{"prompt": "x", "grammar": "root ::= no_such_rule"}', 400),
    ("/api/v1/nothing-here", b"{}", 404),
    ("/nothing/at/all", b"{}", 404),
])
def test_bad_input_gets_a_json_error_and_the_server_carries_on(server, path, raw, status):
    r = server.request("POST", path, raw=raw)
    assert r.status == status
    body = r.json()
    if path.startswith("/api/"):
        assert isinstance(body["detail"]["msg"], str)
    else:
        assert isinstance(body["error"]["message"], str)
    alive(server)


def test_context_error_shape_and_huge_body(server):
    r = server.post("/completion", {"prompt": "word " * 5000})
    err = r.json()["error"]
    assert err["type"] == "exceed_context_size_error" and err["n_ctx"] == 4096 and err["n_prompt_tokens"] > 4096
    big = b'{"prompt": "' + b"a" * (40 * 1024 * 1024) + b'"}'
    r = server.request("POST", "/api/v1/generate", raw=big)
    assert r.status == 413 and "too big" in r.json()["detail"]["msg"]
    alive(server)


def test_cors_options_head_and_suffix_routing(server):
    r = server.request("OPTIONS", "/api/v1/generate", headers={"Origin": "http://x"})
    assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
    assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
    assert server.request("HEAD", "/whatever").status == 200
    r = server.get("/api/extra/version")
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert server.get("/some/prefix/api/v1/model/").json()["result"].startswith("koboldcpp/")


def test_full_queue_is_503_and_queued_jobs_abort_by_genkey(server):
    """--max-queue 2: one running, two waiting, the next is turned away at once."""
    long = {"prompt": "Count slowly:", "max_length": 200, "ban_eos_token": True}
    running, t_run = _long_generation(server, dict(long, genkey="KCPPA001"))
    _wait_for_text(server, "KCPPA001")
    waiting = [_long_generation(server, dict(long, genkey=f"KCPPQ00{i}")) for i in range(2)]
    deadline = time.time() + 60
    while server.get("/api/extra/perf").json()["queue"] < 2 and time.time() < deadline:
        time.sleep(0.1)
    busy = server.post("/api/v1/generate", dict(long, max_length=1))
    assert busy.status == 503 and busy.json()["detail"]["type"] == "service_unavailable"
    busy = server.post("/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert busy.status == 503 and busy.headers["Retry-After"] and busy.json()["error"]["type"] == "unavailable_error"
    # a key-less abort must not touch someone else's job while others wait (KoboldCpp's privacy rule)
    assert server.post("/api/extra/abort").json()["success"] == "false"
    for i, (out, t) in enumerate(waiting):
        assert server.post("/api/extra/abort", {"genkey": f"KCPPQ00{i}"}).json() == {"success": "true",
                                                                                       "done": "false"}
        t.join(60)
        assert out["reply"].json()["results"][0]["text"] == ""  # never ran
    assert server.post("/api/extra/abort", {"genkey": "KCPPA001"}).json()["done"] == "true"
    t_run.join(300)
    assert running["reply"].json()["results"][0]["completion_tokens"] < 200
    alive(server)


def _wait_idle(server: Server) -> dict:
    deadline = time.time() + 120
    while time.time() < deadline:
        perf = server.get("/api/extra/perf").json()
        if perf["idle"] == 1 and perf["queue"] == 0:
            return perf
        time.sleep(0.2)
    raise AssertionError("the server never went idle")


def test_client_disconnect_aborts_the_generation(server):
    import http.client
    import socket

    body = json.dumps({"prompt": "Tell me everything about the sea.", "max_length": 200, "ban_eos_token": True})
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    conn.request("POST", "/api/extra/generate/stream", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.readline().startswith(b"event: message")  # text is flowing: hang up
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    perf = _wait_idle(server)
    assert perf["last_token_count"] < 200 and perf["stop_reason"] == -1  # -1: aborted
    # the same for a blocking request: send it, wait until it generates, hang up
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /api/v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body.encode()))
    _wait_for_text(server, None)
    sock.close()
    perf = _wait_idle(server)
    assert perf["last_token_count"] < 200 and perf["stop_reason"] == -1


def test_kobold_logprobs_and_last_logprobs(server):
    body = {"prompt": "The sky is", "max_length": 2, "temperature": 0, "logprobs": True, "genkey": "KCPPLP01"}
    res = server.post("/api/v1/generate", body).json()["results"][0]
    lp = res["logprobs"]
    assert len(lp["content"]) == res["completion_tokens"] and len(lp["content"][0]["top_logprobs"]) == 5
    last = server.post("/api/extra/last_logprobs", {"genkey": "KCPPLP01"}).json()["logprobs"]
    assert last["tokens"] == lp["tokens"]
    assert server.post("/api/extra/last_logprobs", {"genkey": "nope"}).json() == {"logprobs": None}
