"""Several models behind one real nkat-server: Gemma 3 270M and SmolLM2-135M given with --model,
Qwen2.5-Coder-0.5B and a broken file found by --models-dir, at most two loaded at once.

Each request is answered by the model it names (its id in the answer, and its own tokenizer's
count of the prompt), a third model unloads the least recently used idle one, the admin routes
need --admin-password, an unload/load cycle of one model leaves another's running stream whole,
and a file that fails to load is reported while the others keep serving."""

from __future__ import annotations

import json
import threading
import time

import openai
import pytest

from serverproc import Server

ADMIN = {"Authorization": "Bearer admin-key"}
GEMMA, SMOL, QWEN = "gemma-3-270m-q4_k_m", "SmolLM2-135M-Instruct.Q4_1", "qwen2.5-coder-0.5b-instruct-q4_k_m"
TEXT = "Tokenizers disagree: supercalifragilisticexpialidocious, naïve café, 東京タワー, 3.14159."

pytestmark = pytest.mark.slow  # three real models loaded and reloaded: the slow tier


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_path):
    folder = tmp_path_factory.mktemp("models-dir")
    (folder / f"{QWEN}.gguf").symlink_to(model_path("qwen2.5-coder-0.5b"))
    (folder / "broken.gguf").write_bytes(b"GGUF" + b"\x00" * 60)
    srv = Server(tmp_path_factory.mktemp("models-server"), "--model", "gemma3-270m", "--model", "smollm2-135m",
                 "--models-dir", str(folder), "--models-max", "2", "--admin-password", "admin-key",
                 "--parallel", "1")
    _wait_status(srv, "koboldcpp/" + SMOL, "loaded")
    yield srv
    srv.stop()


def _listing(srv: Server) -> dict[str, dict]:
    return {m["id"]: m for m in srv.request("GET", "/v1/models").json()["data"]}


def _wait_status(srv: Server, model_id: str, value: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while _listing(srv)[model_id]["status"]["value"] != value:
        assert time.time() < deadline, _listing(srv)
        time.sleep(0.2)


def _count(srv: Server, model: str) -> int:
    return len(srv.post("/tokenize", {"content": TEXT, "model": model, "add_special": True}).json()["tokens"])


def test_each_request_is_answered_by_the_model_it_names(server):
    listing = _listing(server)
    assert set(listing) == {"koboldcpp/" + n for n in (GEMMA, SMOL, QWEN, "broken")}
    assert listing["koboldcpp/" + GEMMA]["status"]["value"] == "loaded"
    counts = {name: _count(server, name) for name in (GEMMA, SMOL)}
    assert counts[GEMMA] != counts[SMOL], counts  # two tokenizers: 262k and 49k pieces
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=600)
    for name in (GEMMA, SMOL):
        for model in (name, "koboldcpp/" + name, name + ".gguf"):
            out = client.completions.create(model=model, prompt=TEXT, max_tokens=2, temperature=0)
            assert out.model == "koboldcpp/" + name
            assert out.usage.prompt_tokens == counts[name]
    # no model field: the first --model
    assert server.post("/v1/completions", {"prompt": TEXT, "max_tokens": 1}).json()["model"] == "koboldcpp/" + GEMMA
    with pytest.raises(openai.NotFoundError, match="gemma-3-270m"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)


def test_a_third_model_unloads_the_least_recently_used(server):
    _count(server, SMOL)
    _count(server, GEMMA)  # SmolLM2 is now the least recently used
    count = _count(server, QWEN)  # loaded on demand
    assert count > 0
    status = {k: v["status"]["value"] for k, v in _listing(server).items()}
    assert status["koboldcpp/" + QWEN] == "loaded" and status["koboldcpp/" + GEMMA] == "loaded"
    assert status["koboldcpp/" + SMOL] == "unloaded"
    assert _count(server, SMOL) > 0  # back on demand, now Gemma goes (least recent)
    assert _listing(server)["koboldcpp/" + GEMMA]["status"]["value"] == "unloaded"


def test_a_model_that_fails_to_load_is_reported(server):
    reply = server.post("/v1/completions", {"model": "broken", "prompt": "x", "max_tokens": 1})
    assert reply.status == 503, reply.body
    assert "broken failed to load" in reply.json()["error"]["message"]
    entry = _listing(server)["koboldcpp/broken"]
    assert entry["status"]["value"] == "failed" and entry["status"]["error"]
    assert _count(server, SMOL) > 0  # the others still serve


def test_admin_routes_need_the_admin_password(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        reply = server.post("/models/unload", {"model": SMOL}, headers=headers)
        assert reply.status == 401 and "admin" in reply.json()["error"]["message"]
    assert server.post("/models/load", {}, headers=ADMIN).status == 400
    assert server.post("/models/load", {"model": "nope"}, headers=ADMIN).status == 404
    names = server.request("GET", "/api/admin/list_options", headers=ADMIN).json()
    assert GEMMA + ".gguf" in names and "broken.gguf" in names
    tags = {m["name"]: m for m in server.request("GET", "/api/tags").json()["models"]}
    assert set(tags) == {GEMMA, SMOL, QWEN, "broken"} and tags[GEMMA]["size"] > 0


def test_unload_and_load_while_another_model_streams(server):
    server.post("/models/load", {"model": GEMMA}, headers=ADMIN)
    server.post("/models/load", {"model": SMOL}, headers=ADMIN)
    body = {"model": GEMMA, "prompt": "Once upon a time", "max_tokens": 48, "temperature": 0}
    alone = server.post("/v1/completions", {**body, "ignore_eos": True}).json()["choices"][0]["text"]

    pieces: list[str] = []
    first = threading.Event()

    def stream() -> None:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=600)
        for chunk in client.completions.create(**body, stream=True, extra_body={"ignore_eos": True}):
            pieces.append(chunk.choices[0].text if chunk.choices else "")
            first.set()

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(300)
    out = server.post("/models/unload", {"model": SMOL}, headers=ADMIN).json()
    assert out == {"success": True, "model": "koboldcpp/" + SMOL, "status": {"value": "unloaded"}}
    assert server.post("/models/load", {"model": SMOL}, headers=ADMIN).json()["status"]["value"] == "loaded"
    assert _count(server, SMOL) > 0
    t.join(600)
    assert "".join(pieces) == alone
    reload = server.post("/models/reload", {"model": SMOL}, headers=ADMIN).json()
    assert reload["status"]["value"] == "loaded"


def test_kobold_admin_reload_switches_the_default(server):
    assert server.post("/api/admin/reload_config", {"filename": SMOL + ".gguf"}, headers=ADMIN).json() == \
        {"success": True}
    assert json.loads(server.request("GET", "/api/v1/model").body)["result"] == f"koboldcpp/{SMOL}"
    assert server.post("/v1/completions", {"prompt": "x", "max_tokens": 1}).json()["model"] == "koboldcpp/" + SMOL
    server.post("/api/admin/reload_config", {"filename": GEMMA}, headers=ADMIN)


def test_metrics_are_off_without_the_flag(server):
    reply = server.request("GET", "/metrics")
    assert reply.status == 404 and "--metrics" in reply.json()["error"]["message"]
