"""The official ``openai`` client, unchanged, against a real nkat-server started with --password."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from serverproc import Server

KEY = "sekrit-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("openai-server"), "--password", KEY, "--parallel", "3")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=600)


def test_models_list(client):
    models = list(client.models.list())
    assert [m.id for m in models] == ["koboldcpp/gemma-3-270m-q4_k_m"]


def test_completion_stream_and_not_agree(client):
    kw = dict(model="any", prompt="The capital of France is", max_tokens=5, temperature=0)
    done = client.completions.create(**kw)
    assert done.object == "text_completion" and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.prompt_tokens == 6 and done.usage.completion_tokens <= 5
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason
    assert len({c.id for c in chunks}) == 1 and chunks[0].id != done.id  # one id per response, unique


def test_chat_completion_stream_and_not(client):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Say hello."}]
    done = client.chat.completions.create(model="any", messages=messages, max_tokens=5, temperature=0)
    msg = done.choices[0].message
    assert done.object == "chat.completion" and msg.role == "assistant" and isinstance(msg.content, str)
    assert done.usage.prompt_tokens > 5 and done.usage.completion_tokens <= 5
    stream = client.chat.completions.create(model="any", messages=messages, max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == done.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == done.choices[0].finish_reason


def test_stop_sequence(client):
    r = client.completions.create(model="any", prompt="One, two, three,", max_tokens=8, temperature=0, stop=[","])
    assert "," not in r.choices[0].text and r.choices[0].finish_reason == "stop"
    assert r.choices[0].text.strip()  # " four": what the greedy model says before the comma


def test_n_choices_and_seed(client):
    kw = dict(model="any", prompt="My favourite colour is", max_tokens=3, temperature=1.0, n=2, seed=11)
    r = client.completions.create(**kw)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert 0 < r.usage.completion_tokens <= 6
    again = client.completions.create(**kw)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    chat = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                          n=2, seed=3)
    assert sorted(c.index for c in chat.choices) == [0, 1]


def test_logprobs_and_echo(client):
    r = client.completions.create(model="any", prompt="Paris is in", max_tokens=2, temperature=0, logprobs=2,
                                  echo=True)
    c = r.choices[0]
    assert c.text.startswith("Paris is in")
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == r.usage.prompt_tokens + 2
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert all(len(t) == 2 for t in lp.top_logprobs[-2:])


def test_auth(server, client):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.completions.create(model="any", prompt="x", max_tokens=1)
    assert err.value.status_code == 401 and "invalid" in str(err.value.body)
    assert [m.id for m in bad.models.list()]  # /v1/models is not protected (as KoboldCpp)
    assert server.post("/api/v1/generate", {"prompt": "x"}).status == 401
    assert server.get("/api/v1/model").json() == {"result": "koboldcpp/protected-model"}
    assert server.get("/api/v1/model", headers={"Authorization": f"Bearer {KEY}"}).json()["result"].endswith("q4_k_m")
    assert server.get("/api/extra/version").json()["protected"] is True
    r = server.post("/api/extra/tokencount", {"prompt": "hi"}, headers={"Authorization": f"bearer {KEY}"})
    assert r.status == 200


def test_openai_errors_are_openai_shaped(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="any", prompt="x", max_tokens=-1)
    assert err.value.body["param"] == "max_tokens" and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="any", prompt="word " * 5000, max_tokens=1)
    assert err.value.body["code"] == "context_length_exceeded"


def test_concurrent_streams_each_get_their_own_text(server, client):
    """Three streams decoded together (--parallel 3) give what each gives alone (greedy, same seed)."""
    prompts = ["The capital of France is", "def add(a, b):", "My favourite fruit is"]

    def text(prompt: str) -> str:
        chunks = client.completions.create(model="any", prompt=prompt, max_tokens=16, temperature=0, seed=3,
                                           stream=True)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    alone = [text(p) for p in prompts]
    before = server.get("/props").json()["nkat"]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(text, prompts))
    after = server.get("/props").json()["nkat"]
    assert together == alone and len(set(alone)) == 3
    # they really shared decode steps: 3 in one step, and far fewer steps than 3 x 16 one at a time
    assert after["batch_invariant"] and after["peak_batch"] == 3
    assert after["decode_steps"] - before["decode_steps"] < 2 * 16
    auth = {"Authorization": f"Bearer {KEY}"}
    slots = server.get("/slots", headers=auth).json()
    assert [s["id"] for s in slots] == [0, 1, 2] and not any(s["is_processing"] for s in slots)
    assert server.get("/props", headers=auth).json()["total_slots"] == 3
