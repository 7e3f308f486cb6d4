"""Fill-in-the-middle prompts (llama.cpp's ``/infill``): the model's FIM tokens, from the GGUF's
``tokenizer.ggml.fim_*_token_id`` keys or, where an older converter wrote none, found by their
text in the vocabulary (as llama.cpp's ``llama-vocab.cpp`` does: Qwen2.5-Coder's ``<|fim_prefix|>``,
CodeLlama's ``<PRE>``, StarCoder's ``<fim_prefix>``, …), and the prompt laid out as llama.cpp's
``format_infill`` lays it out::

    [BOS] [FIM_REP] "myproject\\n" ([FIM_SEP] filename "\\n" text)* [FIM_SEP] "filename\\n"
    [FIM_PRE] prefix [FIM_SUF] suffix [FIM_MID] prompt

(the repository part only with ``input_extra`` and a model that has FIM_REP / FIM_SEP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .tokenizer import Tokenizer

_TEXTS = {
    "pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<PRE>", "▁<PRE>", "<|fim▁begin|>"),
    "suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<SUF>", "▁<SUF>", "<|fim▁hole|>"),
    "mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<MID>", "▁<MID>", "<|fim▁end|>"),
    "rep": ("<|repo_name|>", "<repo_name>", "<reponame>"),
    "sep": ("<|file_sep|>", "<file_sep>"),
}


@dataclass(frozen=True)
class FimTokens:
    pre: int
    suf: int
    mid: int
    rep: int | None = None
    sep: int | None = None


def fim_tokens(meta: Any, tok: Tokenizer) -> FimTokens | None:
    """The model's FIM tokens (``meta.get(key)`` reads GGUF metadata); None when it has none."""
    found: dict[str, int | None] = {}
    for part, texts in _TEXTS.items():
        value = meta.get(f"tokenizer.ggml.fim_{part}_token_id")
        if value is None:
            value = next((i for i in map(tok.token_to_id, texts) if i is not None), None)
        found[part] = int(value) if value is not None and 0 <= int(value) < tok.vocab_size else None
    if found["pre"] is None or found["suf"] is None or found["mid"] is None:
        return None
    return FimTokens(found["pre"], found["suf"], found["mid"], found["rep"], found["sep"])  # type: ignore[arg-type]


def infill_prompt(tok: Tokenizer, fim: FimTokens, prefix: str, suffix: str, extra: Sequence[tuple[str, str]] = (),
                  prompt: str = "") -> list[int]:
    """Token ids of a FIM prompt (see the module docstring); ``extra``: (filename, text) chunks."""
    def text(s: str) -> list[int]:
        return tok.encode(s, add_special=False, parse_special=False) if s else []

    out: list[int] = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    if extra and fim.rep is not None and fim.sep is not None:
        out += [fim.rep] + text("myproject\n")
        for name, body in extra:
            out += [fim.sep] + text(name + "\n") + text(body)
        out += [fim.sep] + text("filename\n")
    return out + [fim.pre] + text(prefix) + [fim.suf] + text(suffix) + [fim.mid] + text(prompt)
