"""Constrained output on a real instruction-tuned model through the ``openai`` client: 10 prompts
with a JSON schema must each parse and validate (``jsonschema``), unless the length limit cut them."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

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
                 "--parallel", "2", "--contextsize", "1024")
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=600)
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
