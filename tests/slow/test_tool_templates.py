"""Tool calls against the chat templates of real models (llama.cpp's ``models/templates/``, the
files its own chat tests use: Qwen2.5, Qwen3, Hermes 2/3, Llama 3.1-3.3, Mistral Nemo, Mistral
Small 3.2, Devstral, Gemma 2, DeepSeek-R1).

A template renders a past call in the syntax its model was trained to write, so it is the
reference for our parser: a conversation holding a call is rendered, the assistant's part is
cut out and parsed, and the same call must come back. The prompt with tools must be the one
transformers renders (``render_jinja_template``, what ``apply_chat_template`` uses). The grammar
that forces a call must accept the template's own text for that call, token by token (Qwen's
vocabulary)."""

from __future__ import annotations

import functools
import json

import pytest

import hfconvert
from nkat_runtime.serve.chat import render_messages
from nkat_runtime.text.chat_output import OutputFormat, OutputParser, opens_reasoning, reasoning_tags
from nkat_runtime.text.chat_template import render_chat
from nkat_runtime.text.tool_syntax import check_tools, detect_syntax, forced_call_grammar, messages_for_template

pytestmark = pytest.mark.slow

TEMPLATES = {
    "Qwen-Qwen2.5-7B-Instruct.jinja": "hermes",
    "Qwen-Qwen3-0.6B.jinja": "hermes",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja": "hermes",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja": "hermes",
    "meta-llama-Llama-3.1-8B-Instruct.jinja": "llama3",
    "meta-llama-Llama-3.2-3B-Instruct.jinja": "llama3",
    "meta-llama-Llama-3.3-70B-Instruct.jinja": "llama3",
    "mistralai-Mistral-Nemo-Instruct-2407.jinja": "mistral",
    "Mistral-Small-3.2-24B-Instruct-2506.jinja": "mistral-v11",
    "unsloth-mistral-Devstral-Small-2507.jinja": "mistral-v11",
    "google-gemma-2-2b-it.jinja": "generic",  # no tools in the template, and no system turn
    "llama-cpp-deepseek-r1.jinja": "generic",
    "Qwen3-Coder.jinja": "generic",  # its calls are XML, not JSON: offered the generic way
}
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "</s>", "<end_of_turn>", "<｜end▁of▁sentence｜>")
TOOLS = check_tools([{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}])
ARGS = {"city": "Paris", "unit": "celsius"}
CALL = {"id": "abcdefghi", "type": "function",  # nine characters: Mistral's templates insist
        "function": {"name": "get_weather", "arguments": json.dumps(ARGS)}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def _template(name: str) -> str:
    try:
        root = hfconvert.converter_dir()
    except hfconvert.Unavailable as exc:
        pytest.skip(str(exc))
    return (root / "models" / "templates" / name).read_text(encoding="utf-8")


def _render(template: str):
    return functools.partial(render_chat, template, bos_token="<s>", eos_token="</s>")


def _reply(template: str) -> str:
    """The assistant's turn holding ``CALL``, as the template writes it (its end-of-turn cut off)."""
    syntax = detect_syntax(template)
    before = render_messages(_render(template), USER, syntax, TOOLS, {})
    whole = render_messages(_render(template), USER + [{"role": "assistant", "content": "", "tool_calls": [CALL]}],
                            syntax, TOOLS, {}, add_generation_prompt=False)
    opener = reasoning_tags(template)[0]
    if opens_reasoning(before, (opener, "")) and not whole.startswith(before):  # R1 drops past reasoning
        before = before.rstrip()[: -len(opener)]
    assert whole.startswith(before), "the conversation so far must be a prefix of the whole one"
    reply = whole[len(before):]
    cut = min((reply.find(m) for m in END_OF_TURN if m in reply), default=len(reply))
    return reply[:cut]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_syntax_and_round_trip(name):
    template = _template(name)
    syntax = detect_syntax(template)
    assert syntax.name == TEMPLATES[name]
    reply = _reply(template)
    fmt = OutputFormat(syntax, "deepseek", reasoning_tags(template), tool_names=frozenset({"get_weather"}))
    msg = OutputParser(fmt).parse(reply)
    assert [(c.name, json.loads(c.arguments)) for c in msg.calls] == [("get_weather", ARGS)], reply
    assert msg.content.strip() == "" and msg.reasoning.strip() == "", reply


@pytest.mark.parametrize("name", [n for n, s in sorted(TEMPLATES.items()) if s != "generic"])
def test_prompt_with_tools_matches_transformers(name):
    from transformers.utils.chat_template_utils import render_jinja_template

    template = _template(name)
    syntax = detect_syntax(template)
    history = USER + [{"role": "assistant", "content": "", "tool_calls": [CALL]},
                      {"role": "tool", "tool_call_id": "abcdefghi", "content": '{"temperature": 14}'}]
    for messages in (USER, history):
        ours = render_messages(_render(template), messages, syntax, TOOLS, {})
        theirs, _ = render_jinja_template(conversations=[messages_for_template(messages, syntax, TOOLS)], tools=TOOLS,
                                          chat_template=template, add_generation_prompt=True, bos_token="<s>",
                                          eos_token="</s>")
        assert ours == theirs[0]
        assert "get_weather" in ours and "Current weather in a city" in ours


@pytest.mark.parametrize("name", ["Qwen-Qwen2.5-7B-Instruct.jinja", "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja",
                                  "meta-llama-Llama-3.1-8B-Instruct.jinja", "unsloth-mistral-Devstral-Small-2507.jinja",
                                  "google-gemma-2-2b-it.jinja"])
def test_forced_call_grammar_accepts_the_templates_text(name, model_path):
    from nkat_runtime.gguf.reader import open_gguf
    from nkat_runtime.sampling.grammar import GrammarCompiler
    from nkat_runtime.sampling.params import GrammarSpec
    from nkat_runtime.text.tokenizer import Tokenizer

    template = _template(name)
    reply = _reply(template).strip()
    tok = Tokenizer.from_metadata(open_gguf(model_path("qwen2.5-coder-0.5b")).metadata)
    lark = forced_call_grammar(detect_syntax(template), TOOLS, parallel=False, special_id=lambda text: None)
    constraint = GrammarCompiler(tok, tok.vocab_size).compile(GrammarSpec("lark", lark))()
    for token in tok.encode(reply, add_special=False):
        constraint.accept(token)  # raises if the grammar refuses it
    assert constraint.matcher.is_accepting(), reply


def test_templates_that_open_the_reasoning():
    r1 = _template("llama-cpp-deepseek-r1.jinja")
    prompt = _render(r1)(USER, add_generation_prompt=True)
    assert opens_reasoning(prompt, reasoning_tags(r1))
    qwen3 = _template("Qwen-Qwen3-0.6B.jinja")
    assert not opens_reasoning(_render(qwen3)(USER, add_generation_prompt=True), reasoning_tags(qwen3))
    closed = _render(qwen3)(USER, add_generation_prompt=True, enable_thinking=False)
    assert closed.rstrip().endswith("</think>") and not opens_reasoning(closed, reasoning_tags(qwen3))
