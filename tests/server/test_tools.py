"""Tool calls and reasoning through a real nkat-server and the ``openai`` client.

The model is a tiny random one with no chat template (so tools go the generic way: offered in a
system message, written in the Hermes syntax). Its text is noise, so a valid call can only come
from the constraint: ``tool_choice`` ``required`` or named must give a call whose arguments
validate against the tool's schema, whole and streamed, for every seed. Reasoning is forced into
the reply by a grammar, then split (or not) as ``reasoning_format`` says; the server runs with
``--reasoning-format deepseek``, which a request's own field overrides."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from ggufgen import write_tiny_model
from serverproc import Server

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "weather in Paris?"}]
THINK = 'root ::= "<think>" [a-z]{1,12} "</think>" [a-z]{1,12}'


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tools-server")
    model = write_tiny_model(folder / "tiny.gguf", "llama", context=4096)
    srv = Server(folder, "--model", str(model), "--parallel", "2", "--reasoning-format", "deepseek",
                 "-ctk", "bf16", "-ctv", "f16")  # and a 16-bit KV cache (the tools don't care)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _valid(call) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_required_gives_a_valid_call(client, seed):
    out = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required",
                                         temperature=1.5, seed=seed, max_tokens=120)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert len(choice.message.tool_calls) == 1 and not choice.message.content
    _valid(choice.message.tool_calls[0])


def test_named_function_and_n_choices(client):
    out = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, n=2, temperature=1.5, seed=7,
                                         tool_choice={"type": "function", "function": {"name": "get_time"}},
                                         max_tokens=120)
    assert len(out.choices) == 2
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls"
        assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]
        _valid(choice.message.tool_calls[0])


def test_streamed_call_is_assembled_by_the_client(client):
    with client.chat.completions.stream(model="m", messages=ASK, tools=TOOLS, tool_choice="required",
                                        temperature=1.5, seed=4, max_tokens=120) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    _valid(choice.message.tool_calls[0])
    whole = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=1.5, seed=4, max_tokens=120)
    assert whole.choices[0].message.tool_calls[0].function.arguments == choice.message.tool_calls[0].function.arguments


def test_stream_chunks_have_openai_shape(client):
    chunks = list(client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required",
                                                 temperature=1.5, seed=5, max_tokens=120, stream=True))
    parts = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert parts[0][0].id.startswith("call_") and parts[0][0].type == "function" and parts[0][0].function.name
    assert all(p[0].index == 0 for p in parts)
    assert json.loads("".join(p[0].function.arguments or "" for p in parts)) is not None
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_and_history(client, server):
    out = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8,
                                         temperature=0)
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason in ("stop", "length")
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "14 C, cloudy"}]
    prompt = server.post("/apply-template", {"messages": history, "tools": TOOLS}).json()["prompt"]
    assert "# Tools" in prompt and '"name": "get_weather"' in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>' in prompt
    assert "<tool_response>\n14 C, cloudy\n</tool_response>" in prompt
    out = client.chat.completions.create(model="m", messages=history, tools=TOOLS, max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")


def _chat(client, **extra):
    return client.chat.completions.create(model="m", messages=ASK, temperature=1.2, seed=3, max_tokens=60,
                                          extra_body={"grammar": THINK, **extra})


def test_reasoning_split_by_server_default_and_request(client):
    split = _chat(client).choices[0].message
    inline = _chat(client, reasoning_format="none").choices[0].message
    assert split.reasoning_content and split.reasoning_content.isalpha()
    assert split.content.isalpha() and "<think>" not in split.content
    assert inline.content == f"<think>{split.reasoning_content}</think>{split.content}"
    assert getattr(inline, "reasoning_content", None) is None
    legacy = _chat(client, reasoning_format="deepseek-legacy").choices[0].message
    assert legacy.content == inline.content and legacy.reasoning_content == split.reasoning_content
    chunks = list(client.chat.completions.create(model="m", messages=ASK, temperature=1.2, seed=3, max_tokens=60,
                                                 stream=True, extra_body={"grammar": THINK}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == split.reasoning_content
    assert "".join(d.content or "" for d in deltas) == split.content


@pytest.mark.parametrize("body,field", [
    ({"tools": "x"}, "tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "a", "parameters": {"type": "objekt"}}}],
      "tool_choice": "required"}, "tool_choice"),
    ({"reasoning_format": "verbose"}, "reasoning_format"),
    ({"chat_template_kwargs": [1]}, "chat_template_kwargs"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "x"}]}]}, "messages"),
])
def test_bad_tool_requests_are_400(server, body, field):
    r = server.post("/v1/chat/completions", {"messages": ASK, "max_tokens": 4, **body})
    assert r.status == 400, r.body
    err = r.json()["error"]
    assert err["param"] == field, err


def test_props_report_the_kv_cache(server):
    cache = server.get("/props").json()["nkat"]["kv_cache"]
    assert (cache["type_k"], cache["type_v"], cache["slots"]) == ("bf16", "f16", 2)
    assert cache["bytes_per_token"] == 2 * 2 * 2 * 16 * 2  # layers × (K, V) × heads × head size × 2 bytes
    assert cache["bytes_total"] == cache["bytes_per_token"] * 4096 * 2
