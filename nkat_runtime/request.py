"""The one request type every API dialect is turned into, and what comes back.

Adapters (``adapters/``) build a :class:`GenerationRequest` from a dialect's JSON and turn
:class:`GenerationEvent` / :class:`GenerationOutcome` back into that dialect's JSON. The engine
(:mod:`nkat_runtime.serve.engine`) consumes requests and produces events; it never builds JSON, and
adapters never touch tensors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from .sampling.params import GrammarSpec, SamplingParams

Prompt = str | list[int]  # text, or token ids


@dataclass
class ChatOptions:
    """What a chat request adds to its messages: tools, how to read the reply, template variables."""

    tools: list[dict] | None = None  # OpenAI function tools (checked by ``tool_syntax.check_tools``)
    tool_choice: str = "auto"  # "auto" | "none" | "required" | "function" (then ``tool_name``)
    tool_name: str | None = None
    parallel_tool_calls: bool = False  # a forced call may be followed by more (llama.cpp's default: off)
    reasoning_format: str | None = None  # "none" | "deepseek" | "deepseek-legacy"; None: the server's
    template_kwargs: dict = field(default_factory=dict)  # extra chat-template variables (enable_thinking...)


@dataclass
class GenerationRequest:
    """One generation, in dialect-neutral terms.

    ``prompts`` holds one entry per prompt (OpenAI may batch several); each yields ``n``
    choices. ``messages`` (chat) replaces ``prompts``: the engine renders them with the model's
    chat template.
    """

    prompts: list[Prompt] = field(default_factory=lambda: [""])
    messages: list[dict] | None = None
    chat: ChatOptions | None = None  # chat requests: tools, reasoning, template variables
    memory: str = ""  # Kobold: kept in preference to the prompt when cutting to fit
    max_tokens: int | None = None  # None: the server default; -1: until EOS or the context end
    max_context_length: int | None = None  # the client's own context budget (clamped to the server's)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None  # None: a fresh random seed (reported back)
    stop: list[str] = field(default_factory=list)
    trim_stop: bool = True  # False: the matched stop string stays in the text
    ban_eos: bool = False  # EOS / end-of-turn can never be sampled
    bypass_eos: bool = False  # EOS may be sampled but does not end the generation
    render_special: bool = False  # print control tokens as text
    min_tokens: int = 0  # end-of-generation tokens cannot be sampled before this many tokens
    banned_strings: list[str] = field(default_factory=list)  # case-insensitive; 1 char: every token holding it
    banned_token_ids: list[int] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    logit_bias_text: list[tuple[str, float | None]] = field(default_factory=list)  # llama.cpp: text -> bias/ban
    dry_sequence_breakers: list[str] = field(default_factory=list)
    grammar: GrammarSpec | None = None  # GBNF / JSON schema the output must follow
    logprobs: int | None = None  # None: off; N: the chosen token's logprob plus N alternatives
    echo: bool = False  # return the prompt before the completion (with its logprobs when asked)
    n: int = 1
    add_bos: bool = True
    parse_special: bool = True  # control-token texts in the prompt become their ids
    overflow: Literal["truncate", "error"] = "truncate"  # prompt too long: cut its head, or refuse
    genkey: str = ""  # Kobold's request key for check / abort
    cache_prompt: bool = True  # False: compute the whole prompt, reusing no cached entries (llama.cpp)
    dialect: str = "kobold"
    warnings: list[str] = field(default_factory=list)  # things the adapter ignored or changed


@dataclass
class TokenLogprob:
    """One token's log-probability, with the most likely alternatives at that position."""

    token_id: int
    token: str
    logprob: float | None  # None for the first prompt token (nothing predicts it)
    bytes: list[int]
    top: list["TokenLogprob"] = field(default_factory=list)
    text_offset: int = 0  # character offset of the token in the returned text


@dataclass
class Choice:
    """One generated sequence: its text and tokens, why it ended, and what it cost.

    ``stop_kind`` is the one account of the end: "eos" (an end-of-generation token), "stop_string",
    "length" (``max_tokens`` or the context's end) or "abort"; ``finish_reason`` is derived from it.
    """

    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    stop_kind: str = "length"  # "eos" | "stop_string" | "length" | "abort"
    stop_string: str | None = None  # the stop string that matched, or the end token's text
    prompt_text: str = ""  # the prompt as text (for echo)
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the KV cache
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids, when asked
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token, when asked

    @property
    def finish_reason(self) -> str:
        """"stop" (end token or stop string), "length" or "abort"."""
        return "stop" if self.stop_kind in ("eos", "stop_string") else self.stop_kind

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(0, len(self.token_ids) - 1)  # the first token comes from the prefill
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


@dataclass
class GenerationOutcome:
    id: str
    created: int = field(default_factory=lambda: int(time.time()))
    choices: list[Choice] = field(default_factory=list)
    prompt_tokens: int = 0  # summed over distinct prompts
    completion_tokens: int = 0
    max_tokens: int = 0  # what was actually allowed (after clamping)
    truncated_tokens: int = 0  # prompt tokens cut from the head to fit
    seed: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


@dataclass
class GenerationEvent:
    """What the engine streams: text pieces per choice, each choice's end, then the outcome.

    ``kind``: "text" (``index``, ``text``, ``logprobs`` of the tokens behind it), "choice"
    (``choice`` finished), "done" (``outcome``), or "error" (``error``).
    """

    kind: Literal["text", "choice", "done", "error"]
    index: int = 0
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    choice: Choice | None = None
    outcome: GenerationOutcome | None = None
    error: BaseException | None = None


STOP_REASON_CODES = {"length": 0, "eos": 1, "stop_string": 2, "abort": -1}


@dataclass
class EngineStats:
    """Counters behind Kobold's ``/api/extra/perf`` and llama.cpp's ``/props``."""

    started: float = field(default_factory=time.time)
    total_gens: int = 0
    last_process_seconds: float = 0.0
    last_eval_seconds: float = 0.0
    last_input_count: int = 0
    last_token_count: int = 0
    last_seed: int = 0
    last_stop_kind: str = ""
    last_end: float = field(default_factory=time.time)
    queued: int = 0
    busy: bool = False

    @property
    def stop_reason_code(self) -> int:
        return STOP_REASON_CODES.get(self.last_stop_kind, -1)
