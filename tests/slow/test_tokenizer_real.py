"""The tokenizers of the three bundled models against transformers' own GGUF tokenizer
(``AutoTokenizer.from_pretrained(folder, gguf_file=name)``), the acceptance reference; chat templates
against transformers' rendering. (Synthetic vocabularies: ``tests/unit/test_tokenizer.py``.)
"""

from __future__ import annotations

import codecs
import logging
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from nkat_runtime import bundled
from nkat_runtime.errors import ModelNotFoundError
from nkat_runtime.text.chat_template import render_chat
from nkat_runtime.text.tokenizer import StreamDecoder, Tokenizer
from paths import wiki_text_path

pytestmark = pytest.mark.slow
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


@pytest.fixture(scope="module")
def wiki_bytes() -> bytes:
    path = wiki_text_path()
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
def pair(request: pytest.FixtureRequest, hf_gguf_tokenizer) -> Pair:
    gguf = pytest.importorskip("gguf")
    try:
        path = MODELS[request.param]()
    except ModelNotFoundError as exc:
        pytest.skip(f"{request.param} is not available: {exc}")
    reader = gguf.GGUFReader(path)
    meta = {f.name: f.contents() for f in reader.fields.values() if f.name.startswith(("tokenizer.", "general."))}
    ours = Tokenizer.from_metadata(meta)
    hf = hf_gguf_tokenizer(path)
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


def test_whole_file_matches_and_is_fast(pair: Pair, wiki_bytes: bytes) -> None:
    text = wiki_bytes.decode("utf-8")
    t0 = time.perf_counter()
    ours = pair.ours.encode(text, add_special=False, parse_special=True)
    elapsed = time.perf_counter() - t0
    log.info("%s: %.1f MB -> %d tokens in %.2f s", pair.name, len(wiki_bytes) / 1e6, len(ours), elapsed)
    assert elapsed < 60, f"{pair.name}: encoding the whole file took {elapsed:.1f} s"
    assert ours == pair.reference(text, False)


def test_transformers_gguf_unpatched_without_digits(pair: Pair, wiki_64k: str) -> None:
    """Without any digit (\\p{N}) in the text, even SmolLM matches transformers' unmodified GGUF tokenizer."""
    text = "".join(c for c in wiki_64k if not unicodedata.category(c).startswith("N"))
    assert pair.ours.encode(text, parse_special=True) == pair.hf.encode(text)


def test_round_trip_and_stream(pair: Pair) -> None:
    tok = pair.ours
    for text in SAMPLES:
        ids = tok.encode(text, add_special=pair.specials)
        assert tok.decode(ids) == text, (pair.name, text)
        stream = StreamDecoder(tok)
        pieces = [stream.feed(i) for i in ids] + [stream.flush()]
        assert not any("\ufffd" in p for p in pieces), (pair.name, text, pieces)
        assert "".join(pieces) == tok.decode(ids) == pair.hf.decode(ids, skip_special_tokens=True)
        assert ids == pair.reference(text, pair.specials), (pair.name, text)


def test_stream_on_wiki_text(pair: Pair, wiki_64k: str) -> None:
    tok = pair.ours
    ids = tok.encode(wiki_64k[:8000])
    stream = StreamDecoder(tok)
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) == tok.decode(ids) == wiki_64k[:8000]


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


def test_chat_template_matches_transformers(pair: Pair) -> None:
    if pair.ours.chat_template is None:  # Gemma's file carries none: transformers has none either
        assert not getattr(pair.hf, "chat_template", None)  # (the runtime's fallback: tests/unit)
        return
    messages = [
        {"role": "system", "content": "You answer in one line. Ünïcödé ✓"},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    ref = pair.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    eos = pair.ours.id_to_token(pair.ours.eos_id) if pair.ours.eos_id is not None else ""
    assert render_chat(pair.ours.chat_template, messages, add_generation_prompt=True, eos_token=eos) == ref
