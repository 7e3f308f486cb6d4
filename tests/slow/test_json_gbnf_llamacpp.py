"""Our JSON schema → GBNF against llama.cpp's (``tests/test-json-schema-to-grammar.cpp``: each
case a schema and the grammar llama.cpp's converter must produce).

For every case we convert, texts generated from each grammar (random walks over bytes) are fed to
the other. Where the two disagree, ``jsonschema`` decides, and it must side with us: a text only
llama.cpp's grammar takes must be invalid JSON or fail the schema (llama.cpp's grammars let a
few through: ``-04``, an invalid escape in a key, a case whose root rule is shadowed), and a text
only ours takes must be valid. Cases we refuse must be refused for a keyword we document as
unsupported (``pattern``); cases llama.cpp expects to fail must fail here too."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

import hfconvert
from bytegrammar import FORMATS, accepts, closed, samples
from nkat_runtime.errors import InvalidRequestError
from nkat_runtime.sampling.json_gbnf import schema_to_gbnf

pytestmark = pytest.mark.slow

CASE = re.compile(r'test\(\{\s*(SUCCESS|FAILURE),\s*"([^"]*)",\s*R"""\((.*?)\)""",\s*R"""\((.*?)\)"""\s*\}\)', re.S)
REFUSED_OK = ("'pattern'", "allOf is supported for objects and enums only")  # documented limits


def _cases() -> list[tuple[str, str, str, str]]:
    try:
        root = hfconvert.converter_dir()
    except hfconvert.Unavailable as exc:
        pytest.skip(str(exc))
    return CASE.findall((root / "tests" / "test-json-schema-to-grammar.cpp").read_text(encoding="utf-8"))


def _valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), closed(schema), format_checker=FORMATS)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def test_agrees_with_llama_cpp_or_jsonschema_sides_with_us(capsys):
    cases = _cases()
    assert len(cases) >= 60, "llama.cpp's case list was not found"
    same = refused = disputes = 0
    for status, name, schema_text, theirs in cases:
        try:
            schema = json.loads(schema_text)
        except ValueError:
            continue  # the case is about malformed JSON, which our route turns into a 400 before this
        try:
            ours = schema_to_gbnf(schema)
        except InvalidRequestError as exc:
            assert status == "FAILURE" or any(k in str(exc) for k in REFUSED_OK), (name, exc)
            refused += status == "SUCCESS"
            continue
        assert status == "SUCCESS", f"{name}: llama.cpp refuses this schema, we converted it"
        theirs_texts, ours_texts = samples(theirs, 15, seed=1), samples(ours, 15, seed=2)
        for text in ours_texts:
            assert _valid(text, schema), (name, text)
        only_theirs = [t for t in theirs_texts if not accepts(ours, t)]
        only_ours = [t for t in ours_texts if not accepts(theirs, t)]
        for text in only_theirs:
            assert not _valid(text, schema), (name, "we refuse a valid text", text)
        disputes += bool(only_theirs or only_ours)
        same += not (only_theirs or only_ours)
    with capsys.disabled():
        print(f"\njson_to_grammar vs llama.cpp: {same} cases agree, {disputes} differ where jsonschema sides with us, "
              f"{refused} refused (pattern / allOf of alternatives)")
    assert same >= 40
