"""Tokenizer and chat-template tests on small synthetic vocabularies (the real vocabularies against
transformers: ``tests/slow/test_tokenizer_real.py``)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from nkat_runtime.errors import ChatTemplateError, TokenizerError
from nkat_runtime.text.chat_template import CHATML_TEMPLATE, render_chat
from nkat_runtime.text.tokenizer import BYTE_ENCODER, StreamDecoder, Tokenizer


# --- synthetic vocabularies (fast) ------------------------------------------------------------------------
def _spm_meta(**extra: Any) -> dict[str, Any]:
    tokens = ["<unk>", "<s>", "</s>", "<eot>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3, 3] + [6] * 256
    words = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁hello",
             "▁w", "or", "▁wor", "ld", "▁world"]
    tokens += words + ["<tag>"]
    types += [1] * len(words) + [4]
    scores = [0.0] * 260 + [-float(i) for i in range(len(words))] + [0.0]
    meta = {"general.architecture": "llama", "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": scores, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    meta.update(extra)
    return meta


def _bpe_meta(**extra: Any) -> dict[str, Any]:
    alphabet = [BYTE_ENCODER[b] for b in range(256)]
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]
    tokens = alphabet + [m.replace(" ", "") for m in merges] + ["<|endoftext|>", "<|im_end|>"]
    meta = {"general.architecture": "qwen2", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [1] * (len(tokens) - 2) + [3, 3],
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.eos_token_id": len(tokens) - 1}
    meta.update(extra)
    return meta


def test_spm_synthetic() -> None:
    tok = Tokenizer.from_metadata(_spm_meta())
    assert tok.add_bos and tok.bos_id == 1 and tok.vocab_size == 279
    ids = tok.encode("hello world")  # the dummy prefix makes "▁hello"
    assert [tok.id_to_token(i) for i in ids] == ["<s>", "▁hello", "▁world"]
    assert tok.decode(ids) == "hello world"
    assert tok.encode("é", add_special=False) == [tok.token_to_id("▁"), 4 + 0xC3, 4 + 0xA9]  # byte fallback
    assert tok.token_bytes(tok.token_to_id("▁world")) == b" world"
    stream = StreamDecoder(tok)
    assert [stream.feed(i) for i in tok.encode("hello é")] == ["", "hello", " ", "", "é"]
    assert stream.flush() == ""
    tag, hello = tok.token_to_id("<tag>"), tok.token_to_id("hello")
    assert tok.encode("hello<tag>hello", add_special=False) == [hello + 1, tag, hello]  # user-defined: always cut out
    assert tok.encode("<tag>hello", add_special=False) == [tag, hello]  # no dummy prefix after a leading special
    assert tok.stop_ids == {2}
    no_prefix = Tokenizer.from_metadata(_spm_meta(**{"tokenizer.ggml.add_space_prefix": False}))
    assert [no_prefix.id_to_token(i) for i in no_prefix.encode("hello", add_special=False)] == ["hello"]


def test_bpe_synthetic() -> None:
    tok = Tokenizer.from_metadata(_bpe_meta())
    assert not tok.add_bos and tok.bos_id is None
    ids = tok.encode("hello world")
    assert [tok.id_to_token(i) for i in ids] == ["hello", "Ġworld"]
    assert tok.decode(ids) == "hello world"
    eot = tok.encode("hi<|endoftext|>", parse_special=True)
    assert eot[-1] == tok.token_to_id("<|endoftext|>") and tok.decode(eot) == "hi"
    assert tok.decode(eot, skip_special=False) == "hi<|endoftext|>"
    assert tok.stop_ids == {tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")}
    ids = tok.encode("日本🤗")
    stream = StreamDecoder(tok)
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == "日本🤗" and "\ufffd" not in "".join(pieces)


def test_bpe_unknown_pre_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        tok = Tokenizer.from_metadata(_bpe_meta(**{"tokenizer.ggml.pre": "no-such-pre"}))
    assert "no-such-pre" in caplog.text
    assert tok.decode(tok.encode("hello world")) == "hello world"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tokenizer.ggml.model": "bert"}, "unsupported tokenizer.ggml.model"),
        ({"tokenizer.ggml.model": None}, "no tokenizer.ggml.model"),
        ({"tokenizer.ggml.tokens": []}, "no tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.merges": None}, "needs tokenizer.ggml.merges"),
        ({"tokenizer.ggml.token_type": [1, 1]}, "token_type has 2 entries"),
    ],
)
def test_tokenizer_errors(change: dict[str, Any], message: str) -> None:
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_metadata(_bpe_meta(**change))


def test_out_of_range_id() -> None:
    tok = Tokenizer.from_metadata(_bpe_meta())
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([tok.vocab_size])


# --- chat templates ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ ''.__class__ }}",
        "{{ messages.append(1) }}",
        "{% set ns = namespace(_private=1) %}",
        "{{ raise_exception('no system messages') }}",
        "{% for message in messages %}",
        "{{ 1 // 0 }}",
    ],
)
def test_chat_template_errors(template: str) -> None:
    with pytest.raises(ChatTemplateError):
        render_chat(template, [{"role": "user", "content": "hi"}])


def test_chat_template_features_and_fallback() -> None:
    messages = [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "hi"}]
    assert render_chat(None, messages) == render_chat(CHATML_TEMPLATE, messages) == (
        "<|im_start|>user\nhéllo<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    template = (
        "{{ bos_token }}{% for m in messages %}{% generation %}{{ m | tojson(indent=1) }}{% endgeneration %}\n"
        "{% endfor %}{% if add_generation_prompt %}{{ eos_token }}{{ answer }}{% endif %}"
    )
    out = render_chat(template, messages[:1], bos_token="<s>", eos_token="</s>", answer=42)
    assert out == '<s>{\n "role": "user",\n "content": "héllo"\n}</s>42'
    assert render_chat(template, messages[:1], add_generation_prompt=False).endswith("}")
    assert render_chat("{{ strftime_now('%Y') | length }}", []) == "4"
