"""Render a model's Jinja chat template the way transformers' ``apply_chat_template`` does.

Chat templates come from model files, so they are untrusted code. They run in jinja2's
``ImmutableSandboxedEnvironment`` with transformers' settings (``trim_blocks``, ``lstrip_blocks``,
``loopcontrols``, ``{% generation %}`` accepted, ``raise_exception``, ``strftime_now``, a ``tojson`` that
keeps non-ASCII and takes ``indent``), with two hardenings on top:

- reaching for an unsafe attribute (``''.__class__``, ``cycler.__init__``...) raises at once, instead
  of rendering as an empty ``Undefined`` the way the stock sandbox does;
- ``namespace`` refuses underscore-prefixed attributes (as transformers does), and everything the template
  sees is first rebuilt out of plain JSON types (str, int, float, bool, None, dict, list).

Every failure (syntax error, sandbox violation, ``raise_exception``, an error inside the template) becomes
a :class:`~nkat_runtime.errors.ChatTemplateError`.

A model without a template gets :data:`CHATML_TEMPLATE` (``<|im_start|>role\\n...<|im_end|>``), which
is what transformers used as its default before templates were required.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from functools import lru_cache
from typing import Any, Callable

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from ..errors import ChatTemplateError

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class _Sandbox(ImmutableSandboxedEnvironment):
    """An unsafe attribute is an error right away, not a silent empty value."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


class _GenerationTag(Extension):
    """Accepts ``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


def _check_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"chat templates cannot set underscore-prefixed attribute {name!r} on a namespace")


class _SafeNamespace(Namespace):
    def __init__(*args: Any, **kwargs: Any) -> None:  # Namespace's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_name(name)
        Namespace.__setitem__(self, name, value)


class _TemplateDict:
    """``dict(...)`` for templates, without exposing the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(), namespace=_SafeNamespace
    )
    return env.from_string(template)


def _plain(value: Any) -> Any:
    """Rebuild ``value`` from plain JSON types, so no caller object's methods reach the template."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):  # pydantic objects, e.g. OpenAI SDK messages
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def render_chat(
    template: str | None,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """The prompt text for ``messages``. ``extra`` reaches the template as variables (``tools``,
    ``documents``, ``enable_thinking``...); ``template=None`` or ``""`` uses :data:`CHATML_TEMPLATE`."""
    if not template:
        log.info("no chat template: using the ChatML fallback")
        template = CHATML_TEMPLATE
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ChatTemplateError("messages must be a list of dicts with 'role' and 'content'")
    context = {"tools": None, "documents": None, **extra}
    context = _plain(dict(context, messages=messages, add_generation_prompt=add_generation_prompt,
                          bos_token=bos_token, eos_token=eos_token))
    try:
        return _compile(template).render(**context)
    except TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template has a syntax error at line {exc.lineno}: {exc.message}") from None
    except SecurityError as exc:
        raise ChatTemplateError(f"chat template refused by the sandbox: {exc}") from None
    except TemplateError as exc:
        raise ChatTemplateError(f"chat template failed: {exc}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError, RecursionError) as exc:
        raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from None
