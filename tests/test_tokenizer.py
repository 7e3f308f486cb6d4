"""Tokenizer and chat-template tests.

The ``slow`` tests load the three bundled models and compare with transformers' own GGUF tokenizer
(``AutoTokenizer.from_pretrained(folder, gguf_file=name)``), the acceptance reference. The others use
small synthetic vocabularies and run in a second.
"""

from __future__ import annotations

import codecs
import logging
import os
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from nkat_runtime import bundled
from nkat_runtime.errors import ChatTemplateError, ModelNotFoundError, TokenizerError
from nkat_runtime.text.chat_template import CHATML_TEMPLATE, render_chat
from nkat_runtime.text.tokenizer import BYTE_ENCODER, StreamDecoder, Tokenizer

log = logging.getLogger(__name__)

MODELS: dict[str, Callable[[], Path]] = {
    "gemma3-270m": bundled.gemma3_270m,
    "qwen2.5-coder-0.5b": bundled.qwen25_coder_05b,
    "smollm2-135m": bundled.smollm2_135m,
}

SAMPLES = [
    "Hello world",
    "  two leading, then   three   spaces, and a trailing one ",
    "emoji 🤗🎉👩‍👩‍👧 and CJK 日本語の文章、中文句子 한국어 𓀀𓁐",
    "accents: café déjà vu naïve Ångström Łódź Ελληνικά",
    "line1\nline2\n\n\ttabbed\r\nlast line\n\n\n",
    "numbers 1945, 3.14159 and 1,000,000 ½ ²",
    "forty spaces:" + " " * 40 + "end, code:\n        return  x",
]


def _shared_data() -> Path:
    root = os.environ.get("NKAT_SHARED_DIR")
    base = Path(root) if root else Path(__file__).resolve().parents[2] / "shared"
    return base / "data" / "wiki_vital_en.txt"


@pytest.fixture(scope="module")
def wiki_bytes() -> bytes:
    path = _shared_data()
    if not path.is_file():
        pytest.skip(f"reference text not found at {path} (set NKAT_SHARED_DIR to the folder holding data/)")
    return path.read_bytes()


@pytest.fixture(scope="module")
def wiki_64k(wiki_bytes: bytes) -> str:
    # an incremental decoder keeps back a character cut in half: the text ends at a UTF-8 boundary
    return codecs.getincrementaldecoder("utf-8")().decode(wiki_bytes[:65536])


@dataclass
class Pair:
    name: str
    ours: Tokenizer
    hf: Any  # transformers tokenizer
    reference: Callable[[str, bool], list[int]]  # (text, add_special) -> ids we must produce
    specials: bool  # compare with BOS/EOS added (False where the two BOS policies differ)


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request: pytest.FixtureRequest) -> Pair:
    transformers = pytest.importorskip("transformers")
    gguf = pytest.importorskip("gguf")
    try:
        path = MODELS[request.param]()
    except ModelNotFoundError as exc:
        pytest.skip(f"{request.param} is not available: {exc}")
    reader = gguf.GGUFReader(path)
    meta = {f.name: f.contents() for f in reader.fields.values() if f.name.startswith(("tokenizer.", "general."))}
    ours = Tokenizer.from_metadata(meta)
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    encode = hf.encode
    if meta.get("tokenizer.ggml.pre") == "smollm":
        # transformers' GGUF loader does not know pre "smollm" and splits with the bare GPT-2 regex;
        # llama.cpp (and we) first split every digit apart, as SmolLM2's own tokenizer.json does. So the
        # reference is transformers' tokenizer with that tokenizer.json's pre-tokenizer put back.
        # test_transformers_gguf_unpatched_without_digits checks that digits are the only difference.
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers import pre_tokenizers

        backend = RustTokenizer.from_str(hf.backend_tokenizer.to_str())
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )

        def encode(text: str, add_special_tokens: bool = True) -> list[int]:
            return backend.encode(text, add_special_tokens=add_special_tokens).ids

    # transformers adds BOS per its own config, which it takes from tokenizer.ggml.add_bos_token and, like
    # llama.cpp, defaults on for SPM vocabularies. Both policies agree for the three models (Gemma: BOS;
    # Qwen, SmolLM: none), so ids are compared with specials added; were they to differ, without.
    specials = bool(getattr(hf, "add_bos_token", False)) == ours.add_bos
    if not specials:
        log.warning("%s: transformers and GGUF disagree on BOS; comparing without special tokens", request.param)

    def reference(text: str, add_special: bool) -> list[int]:
        return list(encode(text, add_special_tokens=add_special))

    return Pair(request.param, ours, hf, reference, specials)


# --- real models ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ids_match_transformers_64k(pair: Pair, wiki_64k: str) -> None:
    t0 = time.perf_counter()
    # transformers' encode() matches special-token texts: the same as our parse_special=True
    ours = pair.ours.encode(wiki_64k, add_special=pair.specials, parse_special=True)
    elapsed = time.perf_counter() - t0
    ref = pair.reference(wiki_64k, pair.specials)
    log.info("%s: 64 KB -> %d tokens in %.3f s", pair.name, len(ours), elapsed)
    if ours != ref:
        k = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
        pytest.fail(
            f"{pair.name}: first difference at token {k}: ours {[pair.ours.id_to_token(i) for i in ours[k:k + 6]]} "
            f"vs transformers {[pair.ours.id_to_token(i) for i in ref[k:k + 6]]}"
        )
    assert pair.ours.decode(ours) == wiki_64k


@pytest.mark.slow
def test_whole_file_matches_and_is_fast(pair: Pair, wiki_bytes: bytes) -> None:
    text = wiki_bytes.decode("utf-8")
    t0 = time.perf_counter()
    ours = pair.ours.encode(text, add_special=False, parse_special=True)
    elapsed = time.perf_counter() - t0
    log.info("%s: %.1f MB -> %d tokens in %.2f s", pair.name, len(wiki_bytes) / 1e6, len(ours), elapsed)
    assert elapsed < 60, f"{pair.name}: encoding the whole file took {elapsed:.1f} s"
    assert ours == pair.reference(text, False)


@pytest.mark.slow
def test_transformers_gguf_unpatched_without_digits(pair: Pair, wiki_64k: str) -> None:
    """Without any digit (\\p{N}) in the text, even SmolLM matches transformers' unmodified GGUF tokenizer."""
    text = "".join(c for c in wiki_64k if not unicodedata.category(c).startswith("N"))
    assert pair.ours.encode(text, parse_special=True) == pair.hf.encode(text)


@pytest.mark.slow
def test_round_trip_and_stream(pair: Pair) -> None:
    tok = pair.ours
    for text in SAMPLES:
        ids = tok.encode(text, add_special=pair.specials)
        assert tok.decode(ids) == text, (pair.name, text)
        stream = tok.stream_decoder()
        pieces = [stream.feed(i) for i in ids] + [stream.flush()]
        assert not any("\ufffd" in p for p in pieces), (pair.name, text, pieces)
        assert "".join(pieces) == tok.decode(ids) == pair.hf.decode(ids, skip_special_tokens=True)
        assert ids == pair.reference(text, pair.specials), (pair.name, text)


@pytest.mark.slow
def test_stream_on_wiki_text(pair: Pair, wiki_64k: str) -> None:
    tok = pair.ours
    ids = tok.encode(wiki_64k[:8000])
    stream = StreamDecoder(tok)
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) == tok.decode(ids) == wiki_64k[:8000]


@pytest.mark.slow
def test_specials_and_stop_ids(pair: Pair) -> None:
    tok = pair.ours
    assert tok.eos_id in tok.stop_ids
    expected = {"gemma3-270m": {"<eos>", "<end_of_turn>"}, "qwen2.5-coder-0.5b": {"<|im_end|>", "<|endoftext|>"},
                "smollm2-135m": {"<|im_end|>", "<|endoftext|>"}}[pair.name]
    assert {tok.id_to_token(i) for i in tok.stop_ids} == expected
    if pair.name == "gemma3-270m":
        text = "<start_of_turn>user\nhi<end_of_turn>\n"
        ids = tok.encode(text, parse_special=True)
        assert ids == pair.hf.encode(text)
        assert tok.id_to_token(ids[1]) == "<start_of_turn>" and tok.is_special(ids[1])
        assert tok.decode(ids) == "user\nhi\n" and tok.decode(ids, skip_special=False) == "<bos>" + text
        assert len(tok.encode("<end_of_turn>", add_special=False)) > 1  # spelled out when not parsing specials
    else:
        ids = tok.encode("<|im_start|>user\nhi<|im_end|>", parse_special=True)
        assert ids[0] == tok.token_to_id("<|im_start|>") and ids[-1] == tok.token_to_id("<|im_end|>")


@pytest.mark.slow
def test_chat_template_matches_transformers(pair: Pair) -> None:
    if pair.ours.chat_template is None:
        pytest.skip(f"{pair.name} has no chat template in its GGUF")
    messages = [
        {"role": "system", "content": "You answer in one line. Ünïcödé ✓"},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    ref = pair.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    eos = pair.ours.id_to_token(pair.ours.eos_id) if pair.ours.eos_id is not None else ""
    assert render_chat(pair.ours.chat_template, messages, add_generation_prompt=True, eos_token=eos) == ref


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
    stream = tok.stream_decoder()
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
    stream = tok.stream_decoder()
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
