"""The Kobold sampler field set (every alias SillyTavern, KoboldAI Lite and llama.cpp clients
send), read into :class:`SamplingParams` and the text-level fields of a GenerationRequest.

All three dialects share this: KoboldCpp honours every Kobold field on ``/v1/*`` too, and
SillyTavern's KoboldCpp mode depends on it. Only the defaults differ per dialect. Out-of-range
values are clamped the way KoboldCpp does; values of the wrong type are a 400.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from nkat_runtime.errors import InvalidRequestError, RequestNotSupportedError
from nkat_runtime.request import GenerationRequest
from nkat_runtime.sampling.params import DEFAULT_ORDER, GrammarSpec, SamplingParams

from .fields import Fields, clamp

MAX_N = 16


@dataclass(frozen=True)
class SamplerDefaults:
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    rep_pen_range: int
    xtc_threshold: float = 0.2


KOBOLD_DEFAULTS = SamplerDefaults(temperature=0.75, top_k=100, top_p=0.92, min_p=0.0, rep_pen_range=320)
# llama.cpp server's defaults: what users of a GGUF server's OpenAI routes expect
LLAMACPP_DEFAULTS = SamplerDefaults(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, rep_pen_range=64,
                                    xtc_threshold=0.1)


def read_sampling(f: Fields, d: SamplerDefaults) -> SamplingParams:
    rep_pens = [v for v in (f.number(n) for n in ("rep_pen", "repetition_penalty", "repeat_penalty")) if v is not None]
    rep_pen = max(rep_pens) if rep_pens else 1.0
    rep_range = f.integer("rep_pen_range", "repeat_last_n", "repetition_penalty_range", default=d.rep_pen_range)
    slope = f.number("rep_pen_slope", default=1.0)
    order = f.int_list("sampler_order")
    if order is not None:
        order = [s for s in order if 0 <= s <= 6]
        order = order if 1 <= len(order) <= 7 else list(DEFAULT_ORDER)
    top_p = f.number("top_p", default=d.top_p)
    typical = f.number("typical", "typical_p", default=1.0)
    tfs = f.number("tfs", "tfs_z", default=1.0)
    mirostat = f.integer("mirostat", "mirostat_mode", default=0)
    dry_base = f.number("dry_base", default=1.75)
    return SamplingParams(
        temperature=max(0.0, f.number("temperature", default=d.temperature)),
        top_k=max(0, f.integer("top_k", default=d.top_k)),
        top_p=1e-9 if top_p <= 0 else min(1.0, top_p),
        min_p=clamp(f.number("min_p", default=d.min_p), 0.0, 1.0),
        repeat_penalty=rep_pen if rep_pen > 0 else 1.0,
        repeat_last_n=rep_range if rep_range >= -1 else -1,
        top_a=clamp(f.number("top_a", default=0.0), 0.0, 1.0),
        typical=typical if 0.0 < typical < 1.0 else 1.0,
        tfs=tfs if 0.0 < tfs < 1.0 else 1.0,
        repeat_slope=slope if 0.0 < slope <= 1.0 else 1.0,
        presence_penalty=f.number("presence_penalty", default=0.0),
        frequency_penalty=f.number("frequency_penalty", default=0.0),
        sampler_order=tuple(order) if order else DEFAULT_ORDER,
        dynatemp_range=max(0.0, f.number("dynatemp_range", default=0.0)),
        dynatemp_exponent=max(0.0, f.number("dynatemp_exponent", default=1.0)),
        smoothing_factor=max(0.0, f.number("smoothing_factor", default=0.0)),
        smoothing_curve=f.number("smoothing_curve", default=1.0),
        mirostat=mirostat if mirostat in (1, 2) else 0,
        mirostat_tau=max(1e-3, f.number("mirostat_tau", default=5.0)),
        mirostat_eta=max(1e-4, f.number("mirostat_eta", default=0.1)),
        dry_multiplier=max(0.0, f.number("dry_multiplier", default=0.0)),
        dry_base=dry_base if dry_base >= 1.0 else 1.75,
        dry_allowed_length=max(1, f.integer("dry_allowed_length", default=2)),
        dry_penalty_last_n=f.integer("dry_penalty_last_n", default=320),
        xtc_threshold=f.number("xtc_threshold", default=d.xtc_threshold),
        xtc_probability=clamp(f.number("xtc_probability", default=0.0), 0.0, 1.0),
        top_n_sigma=max(0.0, f.number("nsigma", "top_n_sigma", default=0.0)),
    )


def read_logit_bias(f: Fields, req: GenerationRequest) -> None:
    """``{"<id>": bias}`` (OpenAI, Kobold) or ``[[id | "text", bias | false], ...]`` (llama.cpp)."""
    found = f.raw("logit_bias")
    if found is None:
        return
    _, v = found
    if isinstance(v, dict):
        for key, bias in v.items():
            try:
                tok = int(key)
            except (TypeError, ValueError):
                raise InvalidRequestError(f"logit_bias: {key!r} is not a token id", "logit_bias") from None
            if isinstance(bias, bool) or not isinstance(bias, (int, float)):
                raise InvalidRequestError(f"logit_bias: the bias of {key} must be a number", "logit_bias")
            req.logit_bias[tok] = float(bias)
        return
    if isinstance(v, list):
        for item in v:
            if not (isinstance(item, list) and len(item) == 2):
                raise InvalidRequestError("logit_bias entries must be [token, bias] pairs", "logit_bias")
            tok, bias = item
            if bias is False:
                bias = None
            elif isinstance(bias, bool) or not isinstance(bias, (int, float)):
                raise InvalidRequestError("logit_bias: a bias must be a number or false", "logit_bias")
            if isinstance(tok, str):
                req.logit_bias_text.append((tok, bias))
            elif isinstance(tok, int) and not isinstance(tok, bool):
                req.logit_bias[tok] = -100.0 if bias is None else float(bias)
            else:
                raise InvalidRequestError("logit_bias: a token must be an id or a string", "logit_bias")
        return
    raise InvalidRequestError("logit_bias must be an object or a list of pairs", "logit_bias")


def read_common(f: Fields, req: GenerationRequest, d: SamplerDefaults) -> None:
    """Everything but the prompt and the length: samplers, stops, bans, bias, keys."""
    req.sampling = read_sampling(f, d)
    stops: list[str] = []
    for name in ("stop_sequence", "stop", "stopping_strings"):
        for s in f.string_list(name):
            if s and s not in stops:
                stops.append(s)
    req.stop = stops
    req.trim_stop = f.boolean("trim_stop", default=True)
    req.ban_eos = f.boolean("ban_eos_token", "use_default_badwordsids", "ignore_eos")
    req.bypass_eos = f.boolean("bypass_eos")
    # vLLM / TabbyAPI / Aphrodite: skip_special_tokens false prints control tokens (our render_special)
    req.render_special = f.boolean("render_special") or not f.boolean("skip_special_tokens", default=True)
    req.min_tokens = max(0, f.integer("min_tokens", default=0) or 0)
    read_ignored(f, req)
    req.banned_strings = f.string_list("banned_tokens") + f.string_list("banned_strings")
    bans = f.string("custom_token_bans")
    if bans.strip():
        try:
            req.banned_token_ids = [int(x) for x in bans.replace(" ", "").split(",") if x]
        except ValueError:
            raise InvalidRequestError("custom_token_bans must be comma-separated token ids",
                                      "custom_token_bans") from None
    read_logit_bias(f, req)
    req.dry_sequence_breakers = f.string_list("dry_sequence_breakers", parse_json=True)
    req.memory = f.string("memory")
    req.genkey = f.string("genkey")
    req.add_bos = f.boolean("add_bos_token", default=True)
    ctx = f.integer("max_context_length")
    req.max_context_length = ctx if ctx is not None and ctx > 0 else None
    read_grammar(f, req)
    images = f.raw("images", "image_data")
    if images is not None and images[1]:
        raise RequestNotSupportedError("images are not supported: this server has no vision model", images[0])


def read_ignored(f: Fields, req: GenerationRequest) -> None:
    """SillyTavern fields with no sampler here: a warning when they ask for something (docs/server.md)."""
    keep = f.integer("min_keep", default=0) or 0
    if keep > 1:
        req.warnings.append(f"min_keep {keep} is not supported: ignored (the samplers keep at least one token)")
    target = f.number("adaptive_target", default=-1.0)
    if target >= 0:
        req.warnings.append("adaptive_target / adaptive_decay (adaptive-p sampling) are not supported: ignored")


def read_length(f: Fields, *names: str, default: int | None = None, allow_unlimited: bool = False) -> int | None:
    """A completion length; negative is an error (llama.cpp's ``-1`` = until EOS when allowed)."""
    value = f.integer(*names)
    if value is None:
        return default
    if value < 0:
        if allow_unlimited and value == -1:
            return -1
        found = f.raw(*names)
        name = found[0] if found else names[0]
        raise InvalidRequestError(f"'{name}' must be >= 0, got {value}", name)
    return value


def read_n(f: Fields) -> int:
    n = f.integer("n", default=1)
    if not 1 <= n <= MAX_N:
        raise InvalidRequestError(f"'n' must be between 1 and {MAX_N}", "n")
    return n


def compact_json(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


def read_grammar(f: Fields, req: GenerationRequest) -> None:
    """Kobold ``grammar`` (SillyTavern: ``grammar_string``) and llama.cpp ``grammar``: GBNF;
    llama.cpp ``json_schema``: a JSON schema. ``grammar_retain_state`` (Kobold) needs nothing:
    every generation starts the grammar afresh."""
    schema = f.raw("json_schema")
    # SillyTavern sends both, one of them empty: the first one that holds a grammar counts
    gbnf = next((g for g in (f.raw("grammar"), f.raw("grammar_string")) if g is not None and g[1] != ""),
                f.raw("grammar"))
    if gbnf is not None and isinstance(gbnf[1], str) and gbnf[1].strip():
        req.grammar = GrammarSpec("gbnf", gbnf[1], gbnf[0])
    elif gbnf is not None and gbnf[1] not in (None, ""):
        raise InvalidRequestError(f"'{gbnf[0]}' must be a GBNF grammar (a string)", gbnf[0])
    if schema is not None and schema[1] not in (None, "", {}):
        if req.grammar is not None:
            raise InvalidRequestError("give either a grammar or a json_schema, not both", schema[0])
        req.grammar = GrammarSpec("json_schema", json_schema_text(schema[1], schema[0]), schema[0])


def json_schema_text(schema: object, field: str) -> str:
    """A request's JSON schema (an object, or JSON text) as JSON text."""
    if isinstance(schema, str):
        try:
            json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"'{field}' is not valid JSON: {exc}", field) from None
        return schema
    if isinstance(schema, dict):
        return json.dumps(schema)
    raise InvalidRequestError(f"'{field}' must be a JSON schema object", field)
