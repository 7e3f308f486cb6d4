"""JSON schema → GBNF (``/api/extra/json_to_grammar``), judged by ``jsonschema``: every text the
grammar generates (a random walk over bytes, by llguidance) parses and validates; hand-picked
valid and invalid documents are accepted and refused; integer ranges are exact; what the
converter cannot express is refused by name."""

from __future__ import annotations

import json

import jsonschema
import pytest

from bytegrammar import FORMATS, accepts, closed, samples
from nkat_runtime.errors import InvalidRequestError
from nkat_runtime.sampling.json_gbnf import int_range, literal, schema_to_gbnf

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 130},
    "email": {"type": ["string", "null"]},
    "tags": {"type": "array", "items": {"enum": ["a", "b", 3, None]}, "maxItems": 3},
    "born": {"type": "string", "format": "date"},
    "id": {"type": "string", "format": "uuid"},
    "home": {"$ref": "#/$defs/place"}},
    "required": ["name", "age"], "$defs": {"place": {"type": "object", "properties": {
        "city": {"type": "string"}, "zip": {"type": "integer", "exclusiveMinimum": 999, "exclusiveMaximum": 100000}},
        "required": ["city"]}}}
TREE = {"$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "properties": {
    "v": {"type": "number"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
    "required": ["v"]}}}
SCHEMAS = {
    "person": PERSON,
    "tree": TREE,
    "any object": {"type": "object"},
    "extras": {"type": "object", "properties": {"a": {"type": "boolean"}}, "additionalProperties": {"type": "integer"}},
    "tuple": {"type": "array", "prefixItems": [{"type": "string"}, {"const": {"k": [1, "x\n\"y"]}}]},
    "one of": {"oneOf": [{"type": "integer", "minimum": -3, "maximum": 3}, {"enum": ["left", "right"]}]},
    "all of": {"allOf": [{"properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"properties": {"b": {"type": "string"}}}]},
    "counted": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 4},
    "anything": {},
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_generated_text_validates(name):
    schema = SCHEMAS[name]
    texts = samples(schema_to_gbnf(schema), 25, seed=len(name))
    assert len(texts) >= 10, texts
    for text in texts:
        jsonschema.validate(json.loads(text), closed(schema), format_checker=FORMATS)


@pytest.mark.parametrize("doc,ok", [
    ({"name": "Ann", "age": 30}, True),
    ({"name": "Ann", "age": 30, "email": None, "tags": ["a", 3, None], "born": "1990-02-28",
      "id": "123e4567-e89b-12d3-a456-426614174000", "home": {"city": "Oslo", "zip": 1000}}, True),
    ({"name": "Ann", "age": 130, "home": {"city": "Rome", "zip": 99999}}, True),
    ({"age": 30, "name": "Ann"}, False),  # properties in the schema's order (llama.cpp's reading)
    ({"name": "", "age": 30}, False),
    ({"name": "Annabelle!", "age": 30}, False),
    ({"name": "Ann", "age": 131}, False),
    ({"name": "Ann", "age": -1}, False),
    ({"name": "Ann", "age": 3.5}, False),
    ({"name": "Ann", "age": 30, "tags": ["c"]}, False),
    ({"name": "Ann", "age": 30, "tags": ["a", "a", "a", "a"]}, False),
    ({"name": "Ann", "age": 30, "born": "1990-13-01"}, False),
    ({"name": "Ann", "age": 30, "home": {"city": "Rome", "zip": 999}}, False),
    ({"name": "Ann", "age": 30, "nick": "x"}, False),
])
def test_documents_accepted_and_refused(doc, ok):
    assert accepts(schema_to_gbnf(PERSON), json.dumps(doc)) is ok
    try:
        jsonschema.validate(doc, closed(PERSON), format_checker=FORMATS)
        valid = True
    except jsonschema.ValidationError:
        valid = False
    assert valid is ok or (not ok and list(doc) != [k for k in PERSON["properties"] if k in doc])  # only order differs


@pytest.mark.parametrize("lo,hi", [(0, 130), (-5, 5), (-120, -7), (3, None), (None, -3), (17, 4321), (0, 0),
                                   (None, 25), (1000, 1000), (-1000, -999)])
def test_integer_ranges_are_exact(lo, hi):
    grammar = f"root ::= {int_range(lo, hi)}\n"
    for n in [*range(-1100, 1100), 4320, 4321, 4322, 10**15, -(10**15)]:
        assert accepts(grammar, str(n)) is ((lo is None or n >= lo) and (hi is None or n <= hi)), n
    assert not accepts(grammar, "007") and not accepts(grammar, "-")


def test_literals_escape_everything():
    text = 'quote " backslash \\ newline \n tab \t bell \x07 é'
    assert accepts(f"root ::= {literal(text)}\n", text)


@pytest.mark.parametrize("schema,why", [
    ({"type": "string", "pattern": "^a+$"}, "'pattern'"),
    ({"type": "number", "minimum": 0}, "bounds on 'number'"),
    ({"$ref": "https://example.com/s.json"}, "local references"),
    ({"$ref": "#/$defs/missing"}, "points nowhere"),
    ({"type": "kaboom"}, "unknown type"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "'b'"),
    ({"allOf": [{"enum": [1]}, {"enum": [2]}]}, "no value in common"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "no integer"),
    ({"type": "array", "minItems": 3, "maxItems": 1}, "minItems"),
    ("not a schema", "must be an object"),
])
def test_what_it_cannot_express_is_refused(schema, why):
    with pytest.raises(InvalidRequestError, match=why):
        schema_to_gbnf(schema)
