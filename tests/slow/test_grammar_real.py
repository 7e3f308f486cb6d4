"""Constrained output on a real instruction-tuned model through the ``openai`` client: 10 prompts
with a JSON schema must each parse and validate (``jsonschema``), unless the length limit cut them;
``tool_choice`` ``required`` gives a call in Qwen's own ``<tool_call>`` syntax whose arguments
validate, whole and streamed; the call and its result go back through Qwen's template."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from client_bodies import ST_KOBOLDCPP
from serverproc import Server

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40},
                   "population_millions": {"type": "number"}, "is_capital": {"type": "boolean"}},
    "required": ["city", "country", "population_millions", "is_capital"],
    "additionalProperties": False,
}
CITIES = ["Paris", "Tokyo", "Lagos", "Lima", "Oslo", "Cairo", "Toronto", "Mumbai", "Sydney", "Berlin"]


@pytest.fixture(scope="module")
def client(model_path, tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("grammar-real"), "--model", str(model_path("qwen2.5-coder-0.5b")),
                 "--parallel", "4", "--contextsize", "1024", "--max-queue", "8")
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=600)
    c.server = srv  # type: ignore[attr-defined]  # the Kobold routes too
    yield c
    srv.stop()


def test_json_schema_replies_validate(client, capsys):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    valid = cut = 0
    for city in CITIES:
        out = client.chat.completions.create(
            model="qwen", max_tokens=96, temperature=0.7, seed=1, response_format=fmt,
            messages=[{"role": "user", "content": f"Give facts about {city} as JSON."}])
        choice = out.choices[0]
        if choice.finish_reason == "length":
            cut += 1
            continue
        doc = json.loads(choice.message.content)
        jsonschema.validate(doc, SCHEMA)
        valid += 1
    with capsys.disabled():
        print(f"\nqwen2.5-coder-0.5b, JSON schema: {valid} valid, {cut} cut by the length limit, of {len(CITIES)}")
    assert valid >= 8, f"only {valid} of {len(CITIES)} replies completed"


WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city"]}
TIME = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Local time in a city",
                                           "parameters": TIME}}]
ASK = [{"role": "user", "content": "What's the weather like in Paris right now?"}]


def _check_call(call) -> None:
    assert call.type == "function" and call.function.name in ("get_weather", "get_time")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER if call.function.name == "get_weather" else TIME)


def test_required_tool_call(client, capsys):
    out = client.chat.completions.create(model="qwen", messages=ASK, tools=TOOLS, tool_choice="required",
                                         temperature=0, max_tokens=80)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    _check_call(choice.message.tool_calls[0])
    with client.chat.completions.stream(model="qwen", messages=ASK, tools=TOOLS, tool_choice="required",
                                        temperature=0, max_tokens=80) as stream:
        for _ in stream:
            pass
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == "tool_calls" and len(streamed.message.tool_calls) == 1
    _check_call(streamed.message.tool_calls[0])
    assert streamed.message.tool_calls[0].function.arguments == choice.message.tool_calls[0].function.arguments
    call = choice.message.tool_calls[0]
    auto = client.chat.completions.create(model="qwen", messages=ASK, tools=TOOLS, temperature=0, max_tokens=80)
    for c in auto.choices[0].message.tool_calls or []:
        _check_call(c)
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 14, "sky": "cloudy"})}]
    after = client.chat.completions.create(model="qwen", messages=history, tools=TOOLS, tool_choice="none",
                                           temperature=0, max_tokens=60)
    with capsys.disabled():
        print(f"\nqwen2.5-coder-0.5b, tool_choice required: {call.function.name}({call.function.arguments}); "
              f"auto: {auto.choices[0].finish_reason} "
              f"{[(c.function.name, c.function.arguments) for c in auto.choices[0].message.tool_calls or []]}; "
              f"after the tool's result: {after.choices[0].message.content!r}")
    assert after.choices[0].finish_reason in ("stop", "length") and after.choices[0].message.content


YES_NO = 'root ::= ("yes" | "no")'


def test_kobold_and_sillytavern_grammars(client):
    srv = client.server
    for question in ("Is water wet?", "Is the sun cold?", "Can fish fly?"):
        r = srv.post("/api/v1/generate", {"prompt": f"Answer yes or no. {question}\nAnswer: ", "max_length": 8,
                                          "temperature": 0.7, "sampler_seed": 1, "grammar": YES_NO})
        assert r.status == 200 and r.json()["results"][0]["text"] in ("yes", "no"), r.body
    st = dict(ST_KOBOLDCPP, prompt="User: Is water wet? Answer yes or no.\nAssistant: ", grammar_string=YES_NO,
              stream=False)
    r = srv.post("/v1/completions", st)  # SillyTavern's whole Text Completion body, grammar on
    assert r.status == 200 and r.json()["choices"][0]["text"] in ("yes", "no"), r.body


def test_eight_concurrent_constrained_streams(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}

    def one(city: str) -> tuple[str, str]:
        text, finish = "", None
        for chunk in client.chat.completions.create(
                model="qwen", max_tokens=96, temperature=0.7, seed=2, response_format=fmt, stream=True,
                messages=[{"role": "user", "content": f"Give facts about {city} as JSON."}]):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, CITIES[:8]))
    for text, finish in results:
        if finish == "length":
            continue
        assert finish == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)
    assert sum(f == "stop" for _, f in results) >= 6, results
