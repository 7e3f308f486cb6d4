"""Constrained output through a real nkat-server: GBNF on the Kobold and llama.cpp dialects,
``json_schema`` (llama.cpp), OpenAI ``response_format`` through the ``openai`` client; a bad
grammar is a 400. The model is a tiny random one (its text is noise, so whatever it writes
shows the constraint at work), sampled hot with several seeds."""

from __future__ import annotations

import json

import openai
import pytest

from ggufgen import write_tiny_model
from serverproc import Server

YES_NO = 'root ::= ("yes" | "no") "!"'
SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["left", "right"]}, "n": {"type": "integer"}},
          "required": ["answer", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grammar-server")
    model = write_tiny_model(folder / "tiny.gguf", "llama")
    srv = Server(folder, "--model", str(model), "--parallel", "2")
    yield srv
    srv.stop()


def _valid(text: str) -> dict:
    doc = json.loads(text)
    assert set(doc) == {"answer", "n"} and doc["answer"] in ("left", "right") and isinstance(doc["n"], int), doc
    return doc


@pytest.mark.parametrize("field", ["grammar", "grammar_string"])
def test_kobold_gbnf(server, field):
    for seed in range(4):
        r = server.post("/api/v1/generate", {"prompt": "the", "max_length": 16, "temperature": 2.0, "sampler_seed": seed + 1,
                                             field: YES_NO, "grammar_retain_state": False})
        assert r.status == 200, r.body
        assert r.json()["results"][0]["text"] in ("yes!", "no!")


def test_llamacpp_grammar_and_json_schema(server):
    r = server.post("/completion", {"prompt": "the", "n_predict": 8, "temperature": 1.5, "seed": 3, "grammar": YES_NO})
    assert r.status == 200 and r.json()["content"] in ("yes!", "no!"), r.body
    for seed in range(3):
        r = server.post("/completion", {"prompt": "the", "n_predict": 64, "temperature": 1.5, "seed": seed,
                                        "json_schema": SCHEMA})
        body = r.json()
        if body.get("stop_type") == "limit":  # cut by the length limit: the only way out of the schema
            continue
        _valid(body["content"])


def test_openai_response_format(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
    fmt = {"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA, "strict": True}}
    done = 0
    for seed in range(3):
        out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "pick"}], max_tokens=64,
                                             temperature=1.2, seed=seed, response_format=fmt)
        if out.choices[0].finish_reason == "length":
            continue
        assert out.choices[0].finish_reason == "stop"
        _valid(out.choices[0].message.content)
        done += 1
    assert done, "every reply was cut by the length limit"
    obj = client.completions.create(model="m", prompt="the", max_tokens=48, seed=1, temperature=0.0,
                                    extra_body={"response_format": {"type": "json_object"}})  # not in its signature
    if obj.choices[0].finish_reason != "length":
        assert isinstance(json.loads(obj.choices[0].text), dict)


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "grammar": "root ::= missing_rule"}, "grammar"),
    ({"prompt": "x", "json_schema": "{not json"}, "json_schema"),
    ({"prompt": "x", "grammar": YES_NO, "json_schema": SCHEMA}, "json_schema"),
])
def test_bad_grammar_is_a_400(server, body, field):
    r = server.post("/completion", body)
    assert r.status == 400, r.body
    assert field in json.dumps(r.json())


def test_eight_concurrent_constrained_streams(server):
    """Continuous batching: every sequence keeps its own matcher, its mask on its own row."""
    from concurrent.futures import ThreadPoolExecutor

    def one(seed: int) -> str:
        r = server.post("/api/v1/generate", {"prompt": "the", "max_length": 12, "temperature": 2.0,
                                             "sampler_seed": seed + 10, "grammar": YES_NO})
        assert r.status == 200, r.body
        return r.json()["results"][0]["text"]

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(8)))
    assert all(t in ("yes!", "no!") for t in texts), texts


def test_json_to_grammar_then_generate(server):
    """KoboldAI Lite's way: ask for the GBNF of a schema, then send it as the Kobold grammar."""
    r = server.post("/api/extra/json_to_grammar", {"schema": SCHEMA})
    assert r.status == 200 and r.json()["success"] is True, r.body
    gbnf = r.json()["result"]
    assert gbnf.startswith("root ::=")
    assert server.post("/api/extra/json_to_grammar", SCHEMA).json()["result"] == gbnf  # the schema as the body
    done = 0
    for seed in range(3):
        r = server.post("/api/v1/generate", {"prompt": "the", "max_length": 48, "temperature": 1.5,
                                             "sampler_seed": seed + 1, "grammar": gbnf})
        result = r.json()["results"][0]
        if result["finish_reason"] == "length":
            continue
        _valid(result["text"])
        done += 1
    assert done, "every reply was cut by the length limit"
    bad = server.post("/api/extra/json_to_grammar", {"schema": {"type": "string", "pattern": "^a$"}})
    assert bad.status == 400 and bad.json()["success"] is False and "pattern" in bad.json()["detail"]["msg"]


def test_grammar_with_stop_strings_bans_and_prompt_cache(server):
    """A grammar together with a stop string (trimmed), a banned phrase (the grammar's other branch
    is taken), and a repeated prompt that reuses its cached prefix (same text, still valid)."""
    r = server.post("/api/v1/generate", {"prompt": "the", "max_length": 8, "temperature": 2.0, "sampler_seed": 1,
                                         "grammar": YES_NO, "stop_sequence": ["!"]})
    assert r.json()["results"][0]["text"] in ("yes", "no"), r.body
    for seed in range(1, 4):
        r = server.post("/api/v1/generate", {"prompt": "the", "max_length": 8, "temperature": 2.0,
                                             "sampler_seed": seed, "grammar": YES_NO, "banned_tokens": ["yes"]})
        assert r.json()["results"][0]["text"] == "no!", r.body
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
    fmt = {"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA}}
    messages = [{"role": "user", "content": "pick left or right, and a number " * 3}]
    first, second = (client.chat.completions.create(model="m", messages=messages, max_tokens=64, temperature=0,
                                                    response_format=fmt) for _ in range(2))
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert first.choices[0].message.content == second.choices[0].message.content
    if first.choices[0].finish_reason != "length":
        _valid(first.choices[0].message.content)
