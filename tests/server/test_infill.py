"""llama.cpp's ``/infill`` on Qwen2.5-Coder-0.5B (whose GGUF names no FIM token ids: they are found
by their text, as llama.cpp finds them): the prompt is laid out with the model's FIM tokens, and
the greedy middle fits between the prefix and the suffix."""

from __future__ import annotations

import json

import pytest

from nkat_runtime.text.fim import FimTokens, fim_tokens, infill_prompt
from serverproc import Server, sse_data

pytestmark = pytest.mark.slow  # Qwen2.5-Coder-0.5B in a server of its own: the slow tier


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("infill-server"), "--model", "qwen2.5-coder-0.5b", "--contextsize", "1024",
                 "--parallel", "1")
    yield srv
    srv.stop()


PREFIX = "def add(a, b):\n    "
SUFFIX = "\n\nprint(add(2, 3))\n"


def test_the_middle_fits(server):
    got = server.post("/infill", {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 16,
                                  "temperature": 0}).json()
    middle = got["content"]
    # the body first; then this small instruct model goes on (it emits no end of the middle) with more
    # lines of the same script, as llama.cpp's /infill would let it until n_predict
    assert middle.startswith("return a + b"), middle
    code = PREFIX + middle + SUFFIX
    compile(code, "<infill>", "exec")  # the filled-in program parses
    streamed = server.post("/infill", {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 16,
                                       "temperature": 0, "stream": True})
    assert streamed.status == 200
    pieces = [json.loads(d)["content"] for d in sse_data(streamed.body)]
    assert "".join(pieces) == middle


def test_the_prompt_layout(model_path):
    from nkat_runtime.loader import load_model

    lm = load_model(model_path("qwen2.5-coder-0.5b"), context=64, progress=False)
    tok = lm.tokenizer
    fim = fim_tokens(lm.gguf, tok)
    assert fim == FimTokens(*(tok.token_to_id(t) for t in ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>",
                                                            "<|repo_name|>", "<|file_sep|>")))
    ids = infill_prompt(tok, fim, "a", "b", [("util.py", "x = 1\n")], prompt="c")
    assert ids[0] == fim.rep and ids.count(fim.sep) == 2  # Qwen adds no BOS
    assert ids.index(fim.pre) < ids.index(fim.suf) < ids.index(fim.mid) == len(ids) - 2
    text = tok.decode(ids, skip_special=False)
    assert text.endswith("<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>c") and "util.py\nx = 1\n" in text
