"""Turn a :class:`GenerationRequest` into token ids and resolved settings, ready to generate.

Tokenises (chat messages through the model's template), fits the prompt to the context, clamps
the requested length (and says so in ``warnings``), and resolves text-level settings to token
ids: banned strings, logit bias given as text, DRY sequence breakers, stop strings that are one
control token. CPU only, no model forward: the HTTP layer runs it in a thread before queueing.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
from dataclasses import dataclass, field
from typing import Sequence

from ..errors import ContextLengthError, InvalidRequestError
from ..loader import LoadedModel
from ..request import ChatOptions, GenerationRequest
from ..sampling.grammar import GrammarCompiler
from ..text.chat_output import OutputFormat
from .chat import chat_prompt
from .sequence import GenerationParams

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 256
MAX_BANNED_STRINGS = 768
MAX_LOGIT_BIAS = 512
MAX_BREAKERS = 128
MAX_STRING_CHARS = 500  # per stop string / banned phrase (matching holds back up to this much text)


@dataclass
class PreparedPrompt:
    ids: list[int]
    text: str  # the prompt as it will be continued (for echo)
    max_new: int


@dataclass
class Prepared:
    request: GenerationRequest
    prompts: list[PreparedPrompt]
    gen: GenerationParams  # sampling with ids resolved (bias, bans, breakers) and the seed set; max_new per prompt
    seed: int
    truncated_tokens: int = 0
    warnings: list[str] = field(default_factory=list)
    output: OutputFormat | None = None  # chat: how to split the reply (reasoning, tool calls)

    @property
    def max_tokens(self) -> int:
        """The largest allowed completion length over the prompts."""
        return self.gen.max_new


class VocabIndex:
    """Lower-cased text of every token, built once, to find the tokens that contain a string."""

    def __init__(self, lm: LoadedModel) -> None:
        self._lm = lm
        self._texts: list[str] | None = None
        self._cache: dict[tuple[str, ...], frozenset[int]] = {}
        self._lock = threading.Lock()

    def containing(self, needles: Sequence[str]) -> frozenset[int]:
        key = tuple(sorted({n.lower() for n in needles if n}))
        if not key:
            return frozenset()
        with self._lock:
            if key in self._cache:
                return self._cache[key]
            if self._texts is None:
                tok = self._lm.tokenizer
                self._texts = [tok.token_bytes(i).decode("utf-8", errors="replace").lower()
                               for i in range(tok.vocab_size)]
            found = frozenset(i for i, t in enumerate(self._texts) if any(n in t for n in key))
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = found
            return found


def random_seed() -> int:
    return secrets.randbelow(2**31 - 1) + 1


MAX_SHIFTED_CONTEXTS = 64  # with context shift, max_tokens may reach this many contexts


class Preparer:
    def __init__(self, lm: LoadedModel, default_max_tokens: int, context_shift: bool = False,
                 chat_defaults: ChatOptions | None = None) -> None:
        self.lm = lm
        self.chat_defaults = chat_defaults or ChatOptions()  # --reasoning-format, --chat-template-kwargs
        rows = lm.gguf.tensors["token_embd.weight"].shape[0]  # the logits' width
        self.grammars = GrammarCompiler(lm.tokenizer, rows)  # llguidance's token table: built on first use
        self.default_max_tokens = default_max_tokens
        self.context_shift = context_shift
        self.vocab = VocabIndex(lm)

    # --- tokens --------------------------------------------------------------------------------
    def _encode(self, text: str, parse_special: bool) -> list[int]:
        return self.lm.tokenizer.encode(text, add_special=False, parse_special=parse_special)

    def _check_ids(self, ids: Sequence[int], what: str) -> list[int]:
        n = self.lm.tokenizer.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise InvalidRequestError(f"{what}: token id {bad[0]} is outside the vocabulary (0..{n - 1})", what)
        return list(ids)

    # --- the whole request ---------------------------------------------------------------------
    def prepare(self, req: GenerationRequest) -> Prepared:
        warnings = list(req.warnings)
        tok = self.lm.tokenizer
        prompts: list[PreparedPrompt] = []
        truncated = 0
        chat = chat_prompt(self.lm, req, self.chat_defaults) if req.messages is not None else None
        grammar = req.grammar
        if chat is not None:
            sources: list[str | list[int]] = [chat.text]
            grammar = chat.grammar or grammar
        else:
            sources = list(req.prompts) or [""]
        for src in sources:
            pp, cut = self._fit(req, src, warnings)
            prompts.append(pp)
            truncated += cut
        seed = req.seed if req.seed is not None else random_seed()
        stop, stop_ids = self._stops(req, warnings)
        banned = set(self._check_ids(req.banned_token_ids, "banned_tokens"))
        phrases: list[str] = []
        for s in req.banned_strings[:MAX_BANNED_STRINGS]:
            if len(s) == 1:
                banned |= self.vocab.containing([s])
            elif len(s) > MAX_STRING_CHARS:
                warnings.append(f"a banned string of {len(s)} characters was ignored (at most {MAX_STRING_CHARS})")
            elif s:
                phrases.append(s)
        if req.ban_eos:
            banned |= set(tok.stop_ids)
        bias = self._bias(req, warnings)
        breakers = frozenset()
        if req.sampling.dry_multiplier > 0 and req.dry_sequence_breakers:
            breakers = self.vocab.containing([b[:40] for b in req.dry_sequence_breakers[:MAX_BREAKERS]])
        params = dataclasses.replace(req.sampling, seed=seed, logit_bias=bias, banned_ids=frozenset(banned),
                                     dry_breakers=breakers)
        try:
            params.validate()
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        for w in warnings:
            log.warning("%s request: %s", req.dialect, w)
        constraint = self.grammars.compile(grammar) if grammar is not None else None
        gen = GenerationParams(max(p.max_new for p in prompts), params, stop, frozenset() if req.bypass_eos else frozenset(stop_ids), phrases,
                               logprobs=req.logprobs, prompt_logprobs=req.echo and req.logprobs is not None,
                               include_stop=not req.trim_stop, skip_special=not req.render_special,
                               cache_prompt=req.cache_prompt, constraint=constraint, min_tokens=req.min_tokens,
                               shown_ids=chat.shown_ids if chat is not None else frozenset())
        return Prepared(req, prompts, gen, seed, truncated, warnings, chat.output if chat is not None else None)

    def _fit(self, req: GenerationRequest, src: str | list[int], warnings: list[str]) -> tuple[PreparedPrompt, int]:
        tok, ctx = self.lm.tokenizer, self.lm.context
        limit = ctx
        if req.max_context_length is not None:
            if req.max_context_length > ctx:
                warnings.append(f"max_context_length {req.max_context_length} is above the server's context "
                                f"({ctx}): using {ctx}")
            elif req.max_context_length < 8:
                raise InvalidRequestError("max_context_length must be at least 8", "max_context_length")
            else:
                limit = req.max_context_length
        if isinstance(src, list):
            memory, body, bos = [], self._check_ids(src, "prompt"), []
        else:
            if not src and not req.memory and req.messages is None:
                raise InvalidRequestError("the prompt is empty", "prompt")
            memory = self._encode(req.memory, req.parse_special) if req.memory else []
            body = self._encode(src, req.parse_special)
            want_bos = req.add_bos and tok.add_bos and tok.bos_id is not None
            first = (memory or body or [None])[0]
            bos = [tok.bos_id] if want_bos and first != tok.bos_id else []
        if not bos + memory + body:
            raise InvalidRequestError("the prompt is empty (no tokens)", "prompt")
        n_prompt = len(bos) + len(memory) + len(body)
        requested = req.max_tokens if req.max_tokens is not None else self.default_max_tokens
        cut = 0
        if req.overflow == "error":
            if n_prompt >= limit:
                raise ContextLengthError(f"the prompt has {n_prompt} tokens; the context holds {limit} "
                                         "(and at least one must be left to generate)", n_prompt, limit)
            room = limit - n_prompt
            if self.context_shift and limit == ctx and requested > room:  # generated past the end by shifting
                room = MAX_SHIFTED_CONTEXTS * ctx
            requested = _clamp(requested, room, warnings, f"max_tokens {requested} clamped to {room}: the prompt "
                               f"has {n_prompt} tokens and the context holds {limit}")
        else:
            cap = limit - max(min(limit - 4, 16), limit // 5)
            cap = max(1, min(cap, limit - len(bos) - 1))
            requested = _clamp(requested, cap, warnings, f"max_length {requested} clamped to {cap} (context "
                               f"{limit}: at least {limit - cap} tokens stay for the prompt)")
            room = limit - requested - len(bos)
            if len(memory) + len(body) > room:
                before = len(memory) + len(body)
                if len(memory) < room:
                    body = body[len(body) - (room - len(memory)):]
                else:
                    memory, body = memory[len(memory) - room:], []
                cut = before - len(memory) - len(body)
                warnings.append(f"prompt truncated: {cut} tokens cut from its start to fit the context "
                                f"({limit} tokens, {requested} kept for the reply)")
        ids = bos + memory + body
        if cut or not isinstance(src, str):
            text = tok.decode(ids)
        else:
            text = req.memory + src
        return PreparedPrompt(ids, text, requested), cut

    def _stops(self, req: GenerationRequest, warnings: list[str]) -> tuple[list[str], set[int]]:
        tok = self.lm.tokenizer
        stops: list[str] = []
        for s in req.stop:
            if len(s) > MAX_STRING_CHARS:
                warnings.append(f"a stop string of {len(s)} characters was ignored (at most {MAX_STRING_CHARS})")
            elif s and s not in stops:
                stops.append(s)
        if len(stops) > MAX_STOP_STRINGS:
            warnings.append(f"only the first {MAX_STOP_STRINGS} of {len(stops)} stop strings are used")
            stops = stops[:MAX_STOP_STRINGS]
        stop_ids = set(tok.stop_ids)
        for s in stops:
            ids = tok.encode(s, add_special=False, parse_special=True)
            if len(ids) == 1 and tok.is_special(ids[0]):
                stop_ids.add(ids[0])  # a control token never shows up as text: match it by id
        return stops, stop_ids

    def _bias(self, req: GenerationRequest, warnings: list[str]) -> dict[int, float]:
        n = self.lm.tokenizer.vocab_size
        bias: dict[int, float] = {}
        dropped = 0
        for tok_id, value in list(req.logit_bias.items())[:MAX_LOGIT_BIAS]:
            if 0 <= tok_id < n:
                bias[tok_id] = max(-100.0, min(100.0, float(value)))
            else:
                dropped += 1
        if dropped:
            warnings.append(f"logit_bias: {dropped} token id(s) outside the vocabulary ignored")
        for text, value in req.logit_bias_text:
            for tok_id in self._encode(text, False):
                bias[tok_id] = -100.0 if value is None else max(-100.0, min(100.0, float(value)))
        return bias


def _clamp(requested: int, cap: int, warnings: list[str], warning: str) -> int:
    """A requested token count within ``cap``: unset (< 0) takes the cap, more is cut with ``warning``."""
    if requested < 0:
        return cap
    if requested > cap:
        warnings.append(warning)
        return cap
    return requested
