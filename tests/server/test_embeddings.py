"""Embeddings over HTTP from a real nkat-server (Gemma 3 270M, mean pooling): the official
``openai`` client's ``embeddings.create``, the same vectors from koboldcpp's and llama.cpp's
routes, related sentences closer than unrelated ones, base64, bad input as 400 JSON, and an
embedding computed while a stream decodes equal to one computed alone."""

from __future__ import annotations

import base64
import struct
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from serverproc import Server

KEY = "emb-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SENTENCES = ["The cat sat on the mat.", "A kitten was sitting on the rug.",
             "Stock markets fell sharply after the bank raised interest rates.",
             "How do I bake bread at home?", "What is a simple recipe for homemade bread?"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("embeddings-server"), "--password", KEY, "--parallel", "2")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def vectors(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=600)
    out = client.embeddings.create(model="any", input=SENTENCES)
    assert out.usage.prompt_tokens == out.usage.total_tokens > len(SENTENCES)
    assert [d.index for d in out.data] == list(range(len(SENTENCES)))
    return [d.embedding for d in out.data]


def _cos(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def test_related_sentences_are_closer(vectors):
    assert all(len(v) == 640 and abs(_cos(v, v) - 1) < 1e-5 for v in vectors)  # Gemma 3 270M's width, unit length
    cat, kitten, stocks, bake, recipe = vectors
    assert _cos(cat, kitten) > max(_cos(cat, stocks), _cos(cat, bake), _cos(cat, recipe), _cos(kitten, stocks))
    assert _cos(bake, recipe) > max(_cos(bake, stocks), _cos(bake, cat), _cos(recipe, stocks), _cos(recipe, kitten))


def test_the_routes_agree(server, vectors):
    kobold = server.post("/api/extra/embeddings", {"input": SENTENCES[0]}, headers=AUTH).json()
    assert kobold["object"] == "list" and kobold["data"][0]["embedding"] == pytest.approx(vectors[0], abs=1e-6)
    for path in ("/embedding", "/embeddings"):
        got = server.post(path, {"content": SENTENCES[:2]}, headers=AUTH).json()
        assert [g["index"] for g in got] == [0, 1]
        for g, want in zip(got, vectors[:2]):
            assert len(g["embedding"]) == 1 and g["embedding"][0] == pytest.approx(want, abs=1e-6)
    raw = server.post("/v1/embeddings", {"input": SENTENCES[1], "encoding_format": "base64"}, headers=AUTH).json()
    blob = base64.b64decode(raw["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(blob) // 4}f", blob)) == pytest.approx(vectors[1], abs=1e-6)
    ids = server.post("/tokenize", {"content": SENTENCES[0], "add_special": True}, headers=AUTH).json()["tokens"]
    by_ids = server.post("/v1/embeddings", {"input": ids}, headers=AUTH).json()
    assert by_ids["data"][0]["embedding"] == pytest.approx(vectors[0], abs=1e-6)
    plain = server.post("/embedding", {"content": SENTENCES[0], "embd_normalize": -1}, headers=AUTH).json()
    assert abs(_cos(plain[0]["embedding"][0], plain[0]["embedding"][0]) - 1) > 1e-3  # not normalised


@pytest.mark.parametrize("path,body,message", [
    ("/v1/embeddings", {}, "'input' is required"),
    ("/v1/embeddings", {"input": []}, "'input' is empty"),
    ("/v1/embeddings", {"input": [1, 10**9]}, "outside the vocabulary"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ("/v1/embeddings", {"input": "x", "dimensions": 64}, "'dimensions' is not supported"),
    ("/v1/embeddings", {"input": [{"text": "x"}]}, "must be a string or a list of token ids"),
    ("/embedding", {"content": "x", "embd_normalize": 1}, "embd_normalize"),
    ("/embedding", {"content": "word " * 40000}, "the context holds"),
])
def test_bad_input_is_a_400(server, path, body, message):
    reply = server.post(path, body, headers=AUTH)
    assert reply.status == 400, reply.body[:300]
    assert message in reply.body.decode(), reply.body[:300]
    assert server.post(path, body).status == 401  # protected with --password


def test_an_embedding_during_a_stream_equals_one_alone(server, vectors):
    def stream():
        return server.post("/completion", {"prompt": "Once upon a time", "n_predict": 48, "stream": True,
                                           "ignore_eos": True}, headers=AUTH)

    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(stream)
        during = server.post("/v1/embeddings", {"input": SENTENCES[2]}, headers=AUTH).json()
        assert running.result().status == 200
    assert during["data"][0]["embedding"] == pytest.approx(vectors[2], abs=1e-5)


def test_infill_without_fim_tokens_is_a_400(server):
    """(Here because this module's server runs Gemma 3, which has no FIM tokens; the infill itself
    is tested on Qwen2.5-Coder in test_infill.py.)"""
    reply = server.post("/infill", {"input_prefix": "def f():\n    ", "input_suffix": "\n"}, headers=AUTH)
    assert reply.status == 400 and "no fill-in-the-middle tokens" in reply.json()["error"]["message"]
