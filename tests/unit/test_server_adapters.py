"""The dialect adapters: client JSON → GenerationRequest, and outcomes → client JSON (no model,
no server). Bodies are shaped like the ones SillyTavern, KoboldAI Lite and llama.cpp clients send."""

from __future__ import annotations

import json

import pytest

from adapters import kobold, llamacpp, openai
from adapters.samplers import KOBOLD_DEFAULTS, LLAMACPP_DEFAULTS
from client_bodies import LITE, ST_KOBOLDCPP
from nkat_runtime.errors import InvalidRequestError, RequestNotSupportedError
from nkat_runtime.request import Choice, GenerationOutcome, TokenLogprob
from nkat_runtime.sampling.params import DEFAULT_ORDER
from nkat_runtime.text.chat_output import ParsedMessage, ToolCall


def test_sillytavern_koboldcpp_body_maps_every_kobold_field():
    req, opts = openai.parse_completion(ST_KOBOLDCPP)
    s = req.sampling
    assert opts.stream and not opts.include_usage
    assert req.prompts == ["Hello"] and req.max_tokens == 32  # max_tokens wins over the aliases
    assert req.seed == 1234 and req.overflow == "error"
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.top_a, s.typical, s.tfs) == (0.9, 50, 0.9, 0.05, 0.1, 0.95,
                                                                                        0.97)
    assert s.repeat_penalty == pytest.approx(1.1) and s.repeat_last_n == 360 and s.repeat_slope == 0.7
    assert (s.presence_penalty, s.frequency_penalty) == (0.2, 0.1)
    assert (s.dynatemp_range, s.dynatemp_exponent, s.smoothing_factor, s.smoothing_curve) == (0.2, 1.5, 0.3, 1.2)
    assert (s.dry_multiplier, s.dry_base, s.dry_allowed_length, s.dry_penalty_last_n) == (0.8, 1.75, 2, 0)
    assert req.dry_sequence_breakers == ["\n", ":", '"', "*"]  # a JSON-encoded string, as ST sends it
    assert (s.xtc_threshold, s.xtc_probability) == (0.1, 0.5)
    assert s.sampler_order == DEFAULT_ORDER and s.mirostat == 0
    assert req.stop == ["\nUser:", "\n###"]  # stop + stopping_strings, deduplicated
    assert req.banned_token_ids == [5, 7] and req.banned_strings == ["slop phrase"]
    assert req.trim_stop and not req.ban_eos and req.add_bos and req.logprobs is None


def test_kobold_lite_body():
    req = kobold.parse_generate(LITE)
    assert req.prompts == ["Once"] and req.memory == "[Persona]" and req.genkey == "KCPP4321"
    assert req.max_tokens == 100 and req.max_context_length == 2048 and req.overflow == "truncate"
    assert req.stop == ["You:", "\nYou "] and req.trim_stop and req.seed is None
    assert req.sampling.repeat_penalty == pytest.approx(1.07) and req.sampling.typical == 1.0
    assert req.sampling.xtc_probability == 0.0 and req.logprobs is None


def test_nulls_are_absent_and_unknown_fields_ignored():
    body = {"prompt": "x", "temperature": None, "max_length": None, "sampler_seed": None, "stop_sequence": None,
            "sampler_order": None, "whatever": {"nested": 1}, "stop": ["a", None]}
    req = kobold.parse_generate(body)
    assert req.sampling.temperature == KOBOLD_DEFAULTS.temperature and req.max_tokens is None
    assert req.seed is None and req.stop == ["a"] and req.sampling.sampler_order == DEFAULT_ORDER
    o, _ = openai.parse_completion({"prompt": "x", "seed": None, "stream_options": None, "n": None})
    assert o.seed is None and o.n == 1 and o.sampling.temperature == LLAMACPP_DEFAULTS.temperature


@pytest.mark.parametrize("body", [
    {"prompt": "x", "max_length": -1},
    {"prompt": "x", "max_length": "many"},
    {"prompt": "x", "temperature": True},
    {"prompt": ["a"]},
    {"prompt": "x", "stop_sequence": [1, 2]},
    {"prompt": "x", "logit_bias": {"abc": 1}},
    {"prompt": "x", "grammar": 5},
    {"prompt": "x", "json_schema": "{not json"},
    {"prompt": "x", "images": ["aGVsbG8="]},
    {"prompt": "x", "custom_token_bans": "1,x"},
    [1, 2, 3],
])
def test_kobold_bad_input(body):
    with pytest.raises(InvalidRequestError):
        kobold.parse_generate(body)


def test_numeric_strings_and_seeds():
    req = kobold.parse_generate({"prompt": "x", "max_length": "12", "temperature": "0.5", "sampler_seed": -1})
    assert req.max_tokens == 12 and req.sampling.temperature == 0.5 and req.seed is None
    assert kobold.parse_generate({"prompt": "x", "sampler_seed": 0xFFFFFFFF}).seed is None
    assert openai.parse_completion({"prompt": "x", "seed": 0})[0].seed == 0  # OpenAI: 0 is a real seed
    assert llamacpp.parse_completion({"prompt": "x", "seed": -1})[0].seed is None


def test_openai_prompts_logprobs_and_limits():
    assert openai.parse_completion({"prompt": [1, 2, 3]})[0].prompts == [[1, 2, 3]]
    assert openai.parse_completion({"prompt": ["a", "b"]})[0].prompts == ["a", "b"]
    assert openai.parse_completion({"prompt": [[1], [2, 3]]})[0].prompts == [[1], [2, 3]]
    assert openai.parse_completion({"prompt": "a", "logprobs": 10})[0].logprobs == 5  # capped like OpenAI
    req, opts = openai.parse_completion({"prompt": "a", "stream": True, "stream_options": {"include_usage": True},
                                         "stop": "\n", "max_tokens": 0, "echo": True, "n": 3})
    assert opts.include_usage and req.stop == ["\n"] and req.max_tokens == 0 and req.echo and req.n == 3
    for bad in ({"prompt": "a", "n": 0}, {"prompt": "a", "n": 99}, {}, {"prompt": []}, {"prompt": [1, "a"]},
                {"prompt": "a", "max_tokens": -3}, {"prompt": "a", "logprobs": -1}):
        with pytest.raises(InvalidRequestError):
            openai.parse_completion(bad)


def test_openai_chat_messages():
    req, _ = openai.parse_chat({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
    ], "max_completion_tokens": 7, "logprobs": True, "top_logprobs": 3,
        "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"})
    assert [m["role"] for m in req.messages] == ["system", "user", "assistant"]
    assert req.messages[1]["content"] == "a\nb" and req.messages[2]["content"] == ""
    assert req.max_tokens == 7 and req.logprobs == 3 and not req.warnings
    assert req.chat.tools[0]["function"]["parameters"] == {"type": "object", "properties": {}}
    assert req.chat.tool_choice == "required" and not req.chat.parallel_tool_calls
    with pytest.raises(InvalidRequestError, match="tool_calls"):
        openai.parse_chat({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]})
    with pytest.raises(RequestNotSupportedError):
        openai.parse_chat({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    req, _ = openai.parse_chat({"messages": [{"role": "user", "content": "x"}],
                                "response_format": {"type": "json_object"}})
    assert req.grammar is not None and req.grammar.kind == "json_schema"
    with pytest.raises(InvalidRequestError):
        openai.parse_chat({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}})
    for bad in ({"messages": []}, {"messages": "hi"}, {"messages": [{"content": "x"}]},
                {"messages": [{"role": "user", "content": 5}]}):
        with pytest.raises(InvalidRequestError):
            openai.parse_chat(bad)


def test_llamacpp_body():
    req, stream, tokens = llamacpp.parse_completion({
        "prompt": "x", "n_predict": -1, "stream": True, "samplers": ["top_k", "temperature"], "repeat_last_n": -1,
        "logit_bias": [[15, False], ["hello", -2.5], [7, 1.0]], "n_probs": 3, "ignore_eos": True,
        "return_tokens": True})
    assert stream and tokens and req.max_tokens == -1 and req.logprobs == 3 and req.ban_eos
    assert req.sampling.sampler_order == (6, 0, 5) and req.sampling.repeat_last_n == -1
    assert req.logit_bias == {15: -100.0, 7: 1.0} and req.logit_bias_text == [("hello", -2.5)]
    assert llamacpp.parse_completion({"prompt": "x"})[0].max_tokens == -1
    assert llamacpp.parse_tokenize({"content": "hi", "with_pieces": True}) == ("hi", False, True, True)
    assert llamacpp.token_piece(3, b"\xe2\x82") == {"id": 3, "piece": [0xE2, 0x82]}


def _outcome() -> GenerationOutcome:
    lp = [TokenLogprob(5, " hi", -0.5, [32, 104, 105], [TokenLogprob(5, " hi", -0.5, [32, 104, 105]),
                                                        TokenLogprob(6, " yo", -1.5, [32, 121, 111])], 0)]
    choices = [Choice(0, " hi", [5], "eos", None, "Say", 2, 0, logprobs=lp),
               Choice(1, " hello there", [5, 6, 7], "length", None, "Say", 2, 1)]
    return GenerationOutcome(id="abc", created=1, choices=choices, prompt_tokens=2, completion_tokens=4,
                             warnings=["max_tokens 9 clamped to 3"])


def test_response_shapes():
    out = _outcome()
    k = kobold.generate_response(out)
    assert k["results"][0]["text"] == " hi" and k["results"][0]["finish_reason"] == "stop"
    assert k["results"][0]["logprobs"]["top_logprobs"] == [{" hi": -0.5, " yo": -1.5}] and k["warnings"]
    stopped = Choice(0, "x", [], "stop_string", "##")
    assert kobold.finish_reason(stopped) == "stop" and openai.finish_reason(stopped) == "stop"
    c = openai.completion_response(out, "m", echo=True)
    assert c["id"] == "cmpl-abc" and c["object"] == "text_completion" and c["choices"][0]["text"] == "Say hi"
    assert c["choices"][0]["logprobs"]["text_offset"] == [3]  # shifted past the echoed prompt
    assert c["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6,
                          "prompt_tokens_details": {"cached_tokens": 0}}
    ch = openai.chat_response(out, "m", [ParsedMessage(c.text) for c in out.choices])
    assert ch["choices"][1]["message"] == {"role": "assistant", "content": " hello there", "refusal": None}
    called = openai.chat_response(out, "m", [ParsedMessage("", "why", [ToolCall("call_x", "f", "{}")]),
                                             ParsedMessage("")])
    assert called["choices"][0]["finish_reason"] == "tool_calls"  # the first ended on its end token
    assert called["choices"][0]["message"] == {"role": "assistant", "content": None, "refusal": None,
                                               "reasoning_content": "why", "tool_calls": [
                                                   {"id": "call_x", "type": "function",
                                                    "function": {"name": "f", "arguments": "{}"}}]}
    assert ch["choices"][0]["logprobs"]["content"][0]["top_logprobs"][1]["token"] == " yo"
    assert ch["choices"][1]["finish_reason"] == "length"
    lc = llamacpp.completion_result(out.choices[0], out, "m", {}, True)
    assert lc["stop"] is True and lc["stop_type"] == "eos" and lc["tokens"] == [5]
    assert lc["completion_probabilities"][0]["top_logprobs"][0]["id"] == 5
    json.dumps([k, c, ch, lc])  # all plain JSON


def test_stream_chunks():
    out = _outcome()
    m = openai.ChunkMaker("abc", 1, "m", chat=True, include_usage=True)
    start = m.start(0)
    assert start["choices"][0]["delta"] == {"role": "assistant", "content": ""} and start["usage"] is None
    assert m.text(0, "x")["choices"][0]["delta"] == {"content": "x"}
    end = m.end(out.choices[1])
    assert end["choices"][0]["delta"] == {} and end["choices"][0]["finish_reason"] == "length"
    u = m.usage(out)
    assert u["choices"] == [] and u["usage"]["total_tokens"] == 6 and u["id"] == "chatcmpl-abc"
    t = openai.ChunkMaker("abc", 1, "m", chat=False, include_usage=False)
    assert t.start(0) is None and "usage" not in t.text(0, "y") and t.text(0, "y")["choices"][0]["text"] == "y"
    assert kobold.stream_piece("a") == {"token": "a", "finish_reason": None}
    assert kobold.stream_end(out.choices[1]) == {"token": "", "finish_reason": "length"}


def test_kobold_small_bodies():
    assert kobold.parse_genkey(None) == "" and kobold.parse_genkey({}) == ""
    assert kobold.parse_genkey({"genkey": "KCPP1"}) == "KCPP1"
    assert kobold.parse_tokencount({"prompt": "a b"}) == ("a b", True)
    assert kobold.parse_tokencount({"prompt": "a", "special": False}) == ("a", False)
    assert kobold.parse_detokenize({"ids": [1, 2]}) == [1, 2]
    with pytest.raises(InvalidRequestError):
        kobold.parse_detokenize({"ids": "1,2"})
    assert kobold.abort_response(True, False) == {"success": "true", "done": "false"}
    v = kobold.version_info(True, "0.1.0")
    assert v["result"] == "KoboldCpp" and v["protected"] is True
    assert tuple(int(x) for x in v["version"].split(".")) >= (1, 76)


def test_sillytavern_sends_grammar_and_grammar_string_one_empty():
    from client_bodies import ST_KOBOLDCPP

    req, _ = openai.parse_completion(dict(ST_KOBOLDCPP, grammar_string='root ::= "a"'))
    assert req.grammar is not None and req.grammar.text == 'root ::= "a"' and req.grammar.field == "grammar_string"
    req, _ = openai.parse_completion(dict(ST_KOBOLDCPP, grammar='root ::= "b"'))
    assert req.grammar.text == 'root ::= "b"' and req.grammar.field == "grammar"
    req, _ = openai.parse_completion(ST_KOBOLDCPP)  # both empty: no grammar
    assert req.grammar is None


def test_sillytavern_fields_beyond_the_kobold_set():
    """min_tokens and skip_special_tokens are honoured, nsigma / top_n_sigma too; min_keep and
    adaptive-p have no sampler here and say so in a warning (docs/server.md lists them)."""
    req, _ = openai.parse_completion({"prompt": "x", "min_tokens": 7, "skip_special_tokens": False, "nsigma": 1.5})
    assert req.min_tokens == 7 and req.render_special and req.sampling.top_n_sigma == 1.5 and not req.warnings
    req, _ = openai.parse_completion({"prompt": "x", "min_keep": 0, "adaptive_target": -1, "top_n_sigma": 2})
    assert req.min_tokens == 0 and not req.render_special and req.sampling.top_n_sigma == 2 and not req.warnings
    req = kobold.parse_generate({"prompt": "x", "min_keep": 5, "adaptive_target": 0.7, "adaptive_decay": 0.9})
    assert len(req.warnings) == 2 and "min_keep" in req.warnings[0] and "adaptive" in req.warnings[1]
