"""Tokenizers rebuilt from GGUF metadata, agreeing with llama.cpp and transformers' GGUF loader.

- ``tokenizer.ggml.model = llama``: SentencePiece-style BPE (scores, ``<0xXX>`` byte fallback) run by the C++
  ``SentencePieceProcessor`` on a ``ModelProto`` we build: identity normaliser (no NFKC), spaces escaped to
  ``▁``, dummy prefix per ``add_space_prefix``. Gemma stores multi-space tokens as real spaces; like
  transformers we respell them ``▁▁``... and let merges form them (llama.cpp cuts them out as user-defined
  tokens instead; same ids in practice), and rank Gemma's merges by vocabulary position, as transformers does.
- ``gpt2``: byte-level BPE (vocab + merges) on the Rust ``tokenizers`` library, split by the regexes llama.cpp
  picks from ``tokenizer.ggml.pre``; ``default`` and unknown names get the GPT-2 regex (unknown with a
  warning), as transformers does (llama.cpp has an ad-hoc list for ``default`` and rejects unknown names).

Special tokens are cut out of the text first (llama.cpp's ``tokenizer_st_partition``), leftmost-longest as
in ``tokenizers``: user-defined tokens always, control tokens only with ``parse_special=True``.

Where llama.cpp and transformers (5.x) differ, we follow llama.cpp:

- ``pre = smollm``: llama.cpp splits digits apart before the GPT-2 regex, as SmolLM's own tokenizer.json does;
  transformers' GGUF loader does not know the name and uses the bare GPT-2 regex (``".\n\n2001"``: ``ĊĊ``
  vs ``Ċ Ċ``).
- llama3-style ``pre``: llama.cpp looks whole words up first (``ignore_merges``) and defaults ``add_bos`` on.
- SPM dummy prefix: we add it once, at the start of the text, always (as SentencePiece does); llama.cpp also
  adds it after every special token, transformers skips it when the text starts with a space.
No ``clean_up_tokenization_spaces`` on decode, so ``decode(encode(x)) == x``.
"""

from __future__ import annotations

import codecs
import logging
import re
from typing import Any, Callable, Collection, Iterable, NamedTuple

from ..errors import TokenizerError
from .pretokenizers import FALLBACK, PRE_TOKENIZERS

log = logging.getLogger(__name__)

# GGUF token types; the numbers are those of SentencePiece's ModelProto.SentencePiece.Type.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPACE = "\u2581"  # ▁
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3", "gemma3n", "gemma-embedding")
# Texts llama.cpp treats as end-of-generation (we only take them when typed CONTROL: in Gemma,
# "</s>" is an HTML strike-through tag, not an end token).
_EOG_TEXTS = (
    "<end_of_turn>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "</s>",
    "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>", "<|return|>", "<|call|>",
)

# GPT-2's reversible byte <-> printable character map (the byte-level BPE alphabet)
_PRINTABLE = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
BYTE_ENCODER = {b: chr(b) for b in _PRINTABLE} | {
    b: chr(0x100 + k) for k, b in enumerate(b for b in range(256) if b not in _PRINTABLE)
}
BYTE_DECODER = {c: b for b, c in BYTE_ENCODER.items()}


def _literal_regex(words: Iterable[str]) -> re.Pattern[str] | None:
    """One regex matching any of ``words``, leftmost-longest (a trie, so thousands of words stay fast)."""
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = True
    if not trie:
        return None

    def build(node: dict[str, Any]) -> str:
        alts = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body

    return re.compile(build(trie))


def _get(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    value = meta.get(key, default)
    return default if value is None else value


class Tokenizer:
    """Encode / decode text with the vocabulary a GGUF file describes; build with :meth:`from_metadata`."""

    def __init__(self, meta: dict[str, Any]) -> None:
        model = meta.get("tokenizer.ggml.model")
        if model is None:
            raise TokenizerError("GGUF metadata has no tokenizer.ggml.model: the file carries no tokenizer")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise TokenizerError("GGUF metadata has no tokenizer.ggml.tokens (the vocabulary)")
        self.model = str(model)
        self._tokens = tokens = [str(t) for t in tokens]
        n = len(tokens)
        self._types = types = [int(t) for t in _get(meta, "tokenizer.ggml.token_type", [NORMAL] * n)]
        if len(types) != n:
            raise TokenizerError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
        if model == "llama":
            backend = _build_spm(meta, tokens, types)
            self.space_prefix = bool(_get(meta, "tokenizer.ggml.add_space_prefix", True))
        elif model == "gpt2":
            backend = _build_bpe(meta, tokens, types)
            self.space_prefix = False  # SPM only: "▁" before the text, dropped again on decode
        elif model == "gemma4":
            backend = _build_gemma4(meta, tokens, types)
            self.space_prefix = False
        else:
            raise TokenizerError(f"unsupported tokenizer.ggml.model {model!r}: NKAT supports 'llama' "
                                 "(SentencePiece BPE), 'gpt2' (byte-level BPE) and 'gemma4'")
        self._bytes, self._encode_fragments = backend.token_bytes, backend.encode_fragments

        def ident(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            return value if isinstance(value, int) and 0 <= value < n else None

        self._bos_id, self._eos_id = ident("bos_token_id"), ident("eos_token_id")
        add_bos = bool(_get(meta, "tokenizer.ggml.add_bos_token", backend.default_bos))
        add_bos = add_bos or model == "gemma4"  # as llama.cpp, which overrides a false add_bos for Gemma 4
        self._add_bos = add_bos and self._bos_id is not None
        self._add_eos = bool(_get(meta, "tokenizer.ggml.add_eos_token", False)) and self._eos_id is not None
        self._chat_template: str | None = meta.get("tokenizer.chat_template") or None
        ids = (self._bos_id, self._eos_id, ident("unknown_token_id"), ident("padding_token_id"))
        control_ids = {i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)}
        self._special = frozenset(control_ids | {i for i in ids if i is not None})
        stops = {i for i in (self._eos_id, ident("eot_token_id"), ident("eom_token_id")) if i is not None}
        self._stop_ids = frozenset(stops | {i for i, t in enumerate(tokens) if t in _EOG_TEXTS and types[i] == CONTROL})
        # user-defined tokens are always cut out of the text, control tokens only when parsing specials;
        # not SPM's runs of spaces, which merges form (transformers: 40 spaces -> 16+24, llama.cpp: 31+9)
        self._user_ids = {
            t: i for i, t in enumerate(tokens)
            if types[i] == USER_DEFINED and t and not (model == "llama" and " " in t and not t.strip())
        }
        control = {t: i for i, t in enumerate(tokens) if types[i] in (CONTROL, UNKNOWN) and t}
        self._all_special_ids = {**control, **self._user_ids}
        self._user_re = _literal_regex(self._user_ids)
        self._all_re: re.Pattern[str] | None = None  # built on first use (Gemma has ~6000 control tokens)
        self._token_ids: dict[str, int] | None = None

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        """Build from GGUF metadata, ``{field.name: field.contents()}``; :class:`TokenizerError` if unusable."""
        return cls(meta)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def add_bos(self) -> bool:
        return self._add_bos

    @property
    def stop_ids(self) -> frozenset[int]:
        """EOS plus end-of-turn / end-of-generation tokens."""
        return self._stop_ids

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def id_to_token(self, token_id: int) -> str:
        return self._tokens[self._check(token_id)]

    def token_to_id(self, token: str) -> int | None:
        if self._token_ids is None:
            self._token_ids = {t: i for i, t in reversed(list(enumerate(self._tokens)))}
        return self._token_ids.get(token)

    def is_special(self, token_id: int) -> bool:
        """Control / unknown tokens and BOS, EOS, UNK, PAD: what ``skip_special`` drops on decode."""
        return self._check(token_id) in self._special

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (a control token stands for its own text)."""
        return self._bytes[self._check(token_id)]

    def _check(self, token_id: int) -> int:
        if not 0 <= token_id < len(self._tokens):
            raise TokenizerError(f"token id {token_id} is out of range (vocabulary of {len(self._tokens)})")
        return token_id

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        if parse_special and self._all_re is None:
            self._all_re = _literal_regex(self._all_special_ids)
        pattern, ids = (self._all_re, self._all_special_ids) if parse_special else (self._user_re, self._user_ids)
        if pattern is None:
            return [text] if text else []
        out: list[str | int] = []
        pos = 0
        for m in pattern.finditer(text):
            if m.start() > pos:
                out.append(text[pos : m.start()])
            out.append(ids[m.group()])
            pos = m.end()
        if pos < len(text):
            out.append(text[pos:])
        return out

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False,
               space_prefix: bool = True) -> list[int]:
        """Token ids for ``text``. ``add_special`` adds BOS / EOS as the file asks; ``parse_special``
        turns control-token texts (``<start_of_turn>``...) into their ids instead of spelling them out;
        ``space_prefix=False`` encodes text that continues other text (no SentencePiece "▁" added)."""
        fragments = self._partition(text, parse_special)
        if space_prefix and self.space_prefix and fragments and isinstance(fragments[0], str):
            fragments[0] = " " + fragments[0]
        texts = [f for f in fragments if isinstance(f, str)]
        encoded = iter(self._encode_fragments(texts) if texts else [])
        ids: list[int] = [self._bos_id] if add_special and self._add_bos else []  # type: ignore[list-item]
        for fragment in fragments:
            if isinstance(fragment, str):
                ids.extend(next(encoded))
            else:
                ids.append(fragment)
        if add_special and self._add_eos:
            ids.append(self._eos_id)  # type: ignore[arg-type]
        return ids

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = True) -> bytes:
        return b"".join(self._bytes[self._check(i)] for i in ids if not (skip_special and i in self._special))

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        text = self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")
        return text[1:] if self.space_prefix and text.startswith(" ") else text

    def __repr__(self) -> str:
        return f"Tokenizer(model={self.model!r}, vocab_size={self.vocab_size}, bos={self._bos_id}, eos={self._eos_id})"


class StreamDecoder:
    """Turns ids into text one at a time, holding back bytes until they form whole UTF-8 characters.

    The concatenation of every ``feed`` and the final ``flush`` equals ``tokenizer.decode(ids)``,
    including the SPM convention of dropping the dummy-prefix space at the very start.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True, shown: Collection[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.shown = frozenset(shown)  # control tokens printed even when skipping (tool-call markers)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = tokenizer.space_prefix

    def _emit(self, text: str) -> str:
        if self._at_start and text:
            self._at_start = False
            return text[1:] if text.startswith(" ") else text
        return text

    def feed(self, token_id: int) -> str:
        tok = self.tokenizer
        if self.skip_special and tok.is_special(token_id) and token_id not in self.shown:
            return ""
        return self._emit(self._decoder.decode(tok.token_bytes(token_id)))

    def flush(self) -> str:
        """The held-back tail (incomplete bytes become U+FFFD); the decoder is then reset."""
        text = self._emit(self._decoder.decode(b"", final=True))
        self._decoder.reset()
        return text


# --- backends -------------------------------------------------------------------------------------------
class _Backend(NamedTuple):
    token_bytes: list[bytes]
    encode_fragments: Callable[[list[str]], list[list[int]]]
    default_bos: bool = False


def _build_spm(meta: dict[str, Any], tokens: list[str], types: list[int]) -> _Backend:
    """A SentencePiece BPE ``ModelProto`` holding the GGUF vocabulary, ids unchanged."""
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as pb

    n = len(tokens)
    scores = meta.get("tokenizer.ggml.scores")
    by_position = str(meta.get("general.architecture", "")) in _GEMMA_ARCHS or not scores
    if not by_position and len(scores) != n:
        raise TokenizerError(f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
    unk_id = _get(meta, "tokenizer.ggml.unknown_token_id", 0)
    if not isinstance(unk_id, int) or not 0 <= unk_id < n:
        raise TokenizerError(f"tokenizer.ggml.unknown_token_id {unk_id!r} is outside the vocabulary ({n} tokens)")
    proto = pb.ModelProto()
    proto.trainer_spec.MergeFrom(pb.TrainerSpec(model_type=pb.TrainerSpec.BPE, vocab_size=n, unk_id=unk_id,
                                                bos_id=-1, eos_id=-1, pad_id=-1))
    proto.normalizer_spec.MergeFrom(pb.NormalizerSpec(name="identity", add_dummy_prefix=False,
                                                      remove_extra_whitespaces=False, escape_whitespaces=True))
    seen: set[str] = set()
    byte_pieces = 0
    token_bytes: list[bytes] = []
    add = proto.pieces.add
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        piece, kind = tok, ty if NORMAL <= ty <= BYTE else NORMAL
        m = _BYTE_TOKEN.fullmatch(tok) if ty == BYTE else None
        if m:
            byte = int(m.group(1), 16)
            piece, raw = f"<0x{byte:02X}>", bytes([byte])
            byte_pieces += 1
        elif ty in (CONTROL, UNKNOWN):
            raw = tok.encode()
        else:
            raw = tok.replace(SPACE, " ").encode()
            if ty == USER_DEFINED and " " in tok and not tok.strip():
                piece, kind = SPACE * len(tok), NORMAL  # Gemma's "  ": merged from "▁" like transformers
        if kind == BYTE and not m:
            kind = UNUSED
        if i == unk_id:
            kind = UNKNOWN
        elif kind == UNKNOWN:
            kind = CONTROL
        if not piece or piece in seen:  # SentencePiece wants unique, non-empty pieces
            piece, kind = f"<nkat-placeholder-{i}>", CONTROL
        seen.add(piece)
        add(piece=piece, score=-float(i) if by_position else float(scores[i]), type=kind)
        token_bytes.append(raw)
    proto.trainer_spec.byte_fallback = byte_pieces == 256
    if byte_pieces != 256:
        log.warning("SPM vocabulary has %d of 256 <0xXX> byte tokens: byte fallback is off", byte_pieces)
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto.SerializeToString())
    except (RuntimeError, OSError) as exc:
        raise TokenizerError(f"cannot build a SentencePiece model from this vocabulary: {exc}") from exc

    return _Backend(token_bytes, sp.encode, True)


def _build_bpe(meta: dict[str, Any], tokens: list[str], types: list[int]) -> _Backend:
    """Byte-level BPE on the ``tokenizers`` library; the special tokens are cut out by :class:`Tokenizer`."""
    from tokenizers import Regex, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    merges_raw = meta.get("tokenizer.ggml.merges")
    if not merges_raw:
        raise TokenizerError("byte-level BPE (tokenizer.ggml.model = gpt2) needs tokenizer.ggml.merges: missing")
    pre = str(meta.get("tokenizer.ggml.pre") or "default")
    if pre in PRE_TOKENIZERS:
        regexes, ignore_merges, default_bos = PRE_TOKENIZERS[pre]
    else:
        log.warning("unknown tokenizer.ggml.pre %r: falling back to the GPT-2 split regex", pre)
        regexes, ignore_merges, default_bos = FALLBACK, False, False
    alphabet = set(BYTE_DECODER)
    vocab: dict[str, int] = {}
    token_bytes: list[bytes] = []
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if set(tok) <= alphabet:
            spelled, raw = tok, bytes(BYTE_DECODER[c] for c in tok)
        else:  # not written in the byte alphabet: spell its UTF-8 bytes, as transformers does
            raw = tok.encode()
            spelled = "".join(BYTE_ENCODER[b] for b in raw)
        vocab[spelled] = i
        token_bytes.append(tok.encode() if ty in (CONTROL, UNKNOWN, USER_DEFINED) else raw)
    merges = _merge_pairs(merges_raw)
    try:
        tk = RustTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    except Exception as exc:  # tokenizers raises plain Exception subclasses on bad vocab/merges
        raise TokenizerError(f"cannot build the byte-level BPE tokenizer: {exc}") from exc

    return _Backend(token_bytes, _fragments(tk), default_bos)


def _merge_pairs(merges_raw: list[Any]) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    for merge in merges_raw:
        left, sep, right = str(merge).partition(" ")
        if not sep or not left or not right:
            raise TokenizerError(f"malformed merge {merge!r} in tokenizer.ggml.merges")
        merges.append((left, right))
    return merges


def _fragments(tk: Any) -> Callable[[list[str]], list[list[int]]]:
    """Encode pieces of text (the special tokens already cut out) with a ``tokenizers`` model."""

    def encode_fragments(texts: list[str]) -> list[list[int]]:
        if len(texts) == 1:
            return [tk.encode(texts[0], add_special_tokens=False).ids]
        return [e.ids for e in tk.encode_batch(texts, add_special_tokens=False)]

    return encode_fragments


def _build_gemma4(meta: dict[str, Any], tokens: list[str], types: list[int]) -> _Backend:
    """Gemma 4's tokenizer: BPE merges over SentencePiece-style pieces (spaces written "▁", no
    space prefix), the text cut only into lines and runs of newlines, bytes outside the
    vocabulary as ``<0xXX>`` tokens (llama.cpp: LLAMA_VOCAB_PRE_TYPE_GEMMA4)."""
    from tokenizers import Regex, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    merges_raw = meta.get("tokenizer.ggml.merges")
    if not merges_raw:
        raise TokenizerError("tokenizer.ggml.model = gemma4 needs tokenizer.ggml.merges: missing")
    vocab: dict[str, int] = {}
    token_bytes: list[bytes] = []
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        vocab.setdefault(tok, i)
        m = _BYTE_TOKEN.fullmatch(tok) if ty == BYTE else None
        if m:
            token_bytes.append(bytes([int(m.group(1), 16)]))
        elif ty in (CONTROL, UNKNOWN):
            token_bytes.append(tok.encode())
        else:
            token_bytes.append(tok.replace(SPACE, " ").encode())
    merges = _merge_pairs(merges_raw)
    try:
        tk = RustTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
        tk.normalizer = normalizers.Replace(" ", SPACE)
        tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^\n]+|[\n]+"), behavior="isolated")
    except Exception as exc:  # tokenizers raises plain Exception subclasses on bad vocab/merges
        raise TokenizerError(f"cannot build the Gemma 4 tokenizer: {exc}") from exc
    return _Backend(token_bytes, _fragments(tk), True)

