"""Load a GGUF (or .nkat) file into a ready model + tokenizer.

The file is memory-mapped; each tensor is dequantised from the map straight into its
final tensor (reference path: float32), so the file is never copied whole into RAM.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from . import quant
from .cache_types import default_cache_types
from .cuda import KERNELS
from .cuda.ops import GGUFLinear, triton_types
from .errors import ModelFormatError, UnsupportedError
from .gguf.reader import GGUFFile, TensorRef, open_gguf
from .model import DecoderModel, ModelConfig, config_for, int4
from .model.checks import check_supported, check_tensors, validate_config
from .model.layout_cache import LayoutCache
from .model.linear import DenseLinear
from .model.packed import (
    INT4_PARTS,
    DenseEmbedding,
    QuantEmbedding,
    from_layout,
    layout_of,
    pack_linear,
    row_slice,
)
from .model.theta_linear import ThetaLinear
from .text.tokenizer import Tokenizer
from .theta.factors import ThetaFactors, theta_tensor_names

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 4096

# Gemma GGUF files often carry no chat template; this is Gemma's turn format (the system
# message is prepended to the first user turn, as Google's template does).
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
BUILTIN_CHAT_TEMPLATES = {"gemma3": GEMMA_TEMPLATE}


class GGUFWeights:
    """``WeightSource`` over a GGUF file.

    Reference math (``fast=False``): every tensor is dequantised to ``dtype`` (float32), as
    gguf-py would. Fast path (``fast=True``): matrices stay packed (``packed.py``), the
    embedding table stays in the memory-mapped file, and each tensor's pages are released
    from the resident set once it is packed. A weight that carries θ factors (a .nkat file)
    becomes a ``ThetaLinear`` unless ``theta_gamma`` is None (θ off: the plain source model).
    """

    def __init__(
        self,
        gguf: GGUFFile,
        device: torch.device,
        dtype: torch.dtype,
        progress: tqdm | None = None,
        theta_gamma: float | None = None,
        fast: bool = False,
        layout_cache: bool = True,
        triton: bool = False,
    ):
        self.gguf, self.device, self.dtype, self.progress = gguf, device, dtype, progress
        self.theta_gamma = theta_gamma
        self.fast = fast
        self.triton = triton_types() if fast and triton else frozenset()
        self.int4 = fast and not triton and int4.int4_available(device)
        self._table: torch.Tensor | None = None
        self._embedding: nn.Module | None = None
        options = f"int4={self.int4}|{sorted(INT4_PARTS.items())}"
        self.layouts = LayoutCache.open(gguf.path, device, options) if fast and layout_cache and not triton else None

    def has(self, name: str) -> bool:
        return self.gguf.has_tensor(name + ".weight")

    def has_bias(self, name: str) -> bool:
        return self.gguf.has_tensor(name + ".bias")

    def _load(self, full_name: str, dtype: torch.dtype) -> torch.Tensor:
        ref = self.gguf.tensor(full_name)
        t = quant.dequantize(ref.raw_tensor(), ref.qtype, ref.shape)
        self._done(ref)
        return t.to(device=self.device, dtype=dtype)

    def _done(self, ref) -> None:
        if self.fast:
            self.gguf.release(ref)
        if self.progress is not None:
            self.progress.update(1)

    def vector(self, name: str) -> torch.Tensor:
        return self._load(name + ".weight", torch.float32)

    def embedding(self, name: str) -> nn.Module:
        if self.fast:
            ref = self.gguf.tensor(name + ".weight")
            if self.progress is not None:
                self.progress.update(1)
            self._embedding = QuantEmbedding(ref, self.device, self.dtype)
            return self._embedding
        self._table = self._load(name + ".weight", self.dtype)
        return DenseEmbedding(self._table)

    def _matrix(self, name: str, bias: torch.Tensor | None, rows: tuple[int, int] | None = None) -> nn.Module:
        """The linear of ``name``'s weight, or of its rows ``start:stop`` (a fused tensor's part)."""
        whole = self._rows_view(name)
        if len(whole.shape) != 2:
            raise ModelFormatError(f"{self.gguf.path}: tensor {name}.weight is not a matrix: {whole.shape}")
        ref, key = whole, name
        if rows is not None:
            ref, key = row_slice(whole, *rows), f"{name}[{rows[0]}:{rows[1]}]"
        last = rows is None or rows[1] == whole.shape[0]  # the tensor counts once in the progress bar
        if ref.qtype in self.triton:  # the CUDA path: the file's blocks on the device, Triton kernels
            layer: nn.Module = GGUFLinear(ref, self.device, bias)
            self.gguf.release(ref)
        elif self.fast:
            stored = self.layouts.get(key) if self.layouts is not None else None
            layer = from_layout(ref, stored, bias, self.gguf.release) if stored else None
            if layer is None:
                layer = pack_linear(ref, self.device, bias, int4=self.int4, release=self.gguf.release)
                tensors = layout_of(layer)
                if tensors is not None and self.layouts is not None:
                    self.layouts.put(key, tensors)
            self.gguf.release(ref)
        else:
            w = quant.dequantize(ref.raw_tensor(), ref.qtype, ref.shape)
            layer = DenseLinear(w.to(device=self.device, dtype=self.dtype), bias)
        if last and self.progress is not None:
            self.progress.update(1)
        return layer

    def _rows_view(self, name: str) -> TensorRef:
        """``name``'s weight as a matrix of rows: a 3-D expert tensor [experts, rows, K] becomes
        [experts·rows, K] (each expert's rows follow each other in the file)."""
        ref = self.gguf.tensor(name + ".weight")
        if len(ref.shape) == 3:
            ref = dataclasses.replace(ref, shape=(ref.shape[0] * ref.shape[1], ref.shape[2]))
        return ref

    def linear_rows(self, name: str, start: int, stop: int) -> nn.Module:
        """Rows ``start:stop`` of a fused weight (phi3's ``attn_qkv``, its gate+up ``ffn_up``, one
        expert of a 3-D expert tensor) as a linear of their own: rows are independent in every
        GGUF type, so no bytes are copied."""
        whole = self._rows_view(name)
        if not 0 <= start < stop <= whole.shape[0]:
            raise ModelFormatError(f"{self.gguf.path}: rows {start}:{stop} of {name}.weight {list(whole.shape)}")
        if self.theta(name + ".weight") is not None:
            raise UnsupportedError(f"{self.gguf.path}: θ on the fused tensor {name}.weight is not supported")
        return self._matrix(name, None, (start, stop))

    def linear(self, name: str, bias: bool = False) -> nn.Module:
        b = self._load(name + ".bias", torch.float32) if bias else None
        layer = self._matrix(name, b)
        factors = self.theta(name + ".weight")
        if factors is not None and self.theta_gamma is not None:
            ref = self.gguf.tensor(name + ".weight")
            factors.validate(ref.shape[0], ref.shape[1], name + ".weight")
            restore = lambda: quant.dequantize(ref.raw_tensor(), ref.qtype, ref.shape)  # noqa: E731
            layer = ThetaLinear(layer, factors, self.theta_gamma, self.dtype, restore=restore)
        return layer

    def theta(self, target: str) -> ThetaFactors | None:
        """The θ factors stored for ``target``, or None."""
        names = theta_tensor_names(target)
        present = [self.gguf.has_tensor(n) for n in names]
        if not any(present):
            return None
        if not all(present):
            raise ModelFormatError(f"{self.gguf.path}: θ of {target} is incomplete (needs {', '.join(names)})")
        u, su, v, sv = (self.gguf.tensor(n) for n in names)
        for ref in (u, v):
            if ref.type_name != "I8":
                raise ModelFormatError(f"{self.gguf.path}: {ref.name} must be I8, not {ref.type_name}")
        as_int8 = lambda ref: ref.raw_tensor().view(torch.int8).reshape(ref.shape)  # noqa: E731
        as_f32 = lambda ref: quant.dequantize(ref.raw_tensor(), ref.qtype, ref.shape).reshape(-1)  # noqa: E731
        return ThetaFactors(as_int8(u), as_f32(su), as_int8(v), as_f32(sv))

    def tied_linear(self, name: str) -> nn.Module:
        """The output head that shares the embedding table ``name``."""
        ref = self.gguf.tensor(name + ".weight")
        table = getattr(self._embedding, "table", None)
        if ref.qtype in self.triton and table is not None and table.device.type == self.device.type:
            return GGUFLinear(ref, self.device, blocks=table)  # one copy of the bytes for both
        if self.fast:
            return self._matrix(name, None)
        assert self._table is not None, "embedding() first"
        return DenseLinear(self._table)


@dataclass
class LoadedModel:
    path: Path
    gguf: GGUFFile
    config: ModelConfig
    model: DecoderModel
    tokenizer: Tokenizer
    context: int
    device: torch.device
    load_seconds: float

    @property
    def name(self) -> str:
        return str(self.gguf.get("general.name") or self.path.stem)

    @property
    def chat_template(self) -> str | None:
        """The file's ``tokenizer.chat_template``, else a built-in one for its architecture."""
        return self.tokenizer.chat_template or BUILTIN_CHAT_TEMPLATES.get(self.config.arch)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render ``messages`` with the model's chat template (sandboxed Jinja); ``extra`` are
        template variables (``tools``, ``enable_thinking``...)."""
        from .text.chat_template import render_chat

        tok = self.tokenizer
        bos = tok.id_to_token(tok.bos_id) if tok.bos_id is not None else ""
        eos = tok.id_to_token(tok.eos_id) if tok.eos_id is not None else ""
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=bos, eos_token=eos, **extra)


def trim_heap() -> None:
    """Return freed heap pages to the OS (glibc keeps load-time temporaries otherwise)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def use_triton(kernels: str, device: torch.device) -> bool:
    """Whether weights take the Triton kernels (``load_model``'s ``kernels``)."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be {', '.join(KERNELS)}, not {kernels!r}")
    if kernels == "cpu" or (kernels == "auto" and device.type != "cuda"):
        return False
    available = bool(triton_types())
    if kernels == "auto":
        return available
    if not available:
        raise UnsupportedError("the Triton kernels need the triton package (pip install triton)")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UnsupportedError(f"the Triton kernels run on CUDA, not on {device.type} (TRITON_INTERPRET=1 "
                               "runs them on the CPU, slowly: for tests)")
    return True


def pick_device(device: str | None = None, no_cuda: bool = False) -> torch.device:
    """``cuda`` when available (and not refused), else ``cpu``; an explicit device wins."""
    if device:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ModelFormatError("device 'cuda' was asked for but torch sees no CUDA device")
        return dev
    if not no_cuda and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def load_model(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    context: int | None = None,
    max_batch: int = 1,
    progress: bool = True,
    theta: bool = True,
    theta_gamma: float | None = None,
    reference: bool = False,
    compile: bool = False,
    batch_invariant: bool = True,
    layout_cache: bool = True,
    cache_types: tuple[str, str] | None = None,
    kernels: str = "auto",
) -> LoadedModel:
    """Open, validate and build the model; allocate the KV cache for ``context`` tokens.

    The fast path (default) keeps weights packed (``packed.py``); ``reference=True``
    dequantises everything to ``dtype`` (float32) and runs plain dense math, the path
    that is checked against gguf-py, transformers and llama.cpp. ``compile`` runs decode
    steps through ``torch.compile`` (see ``DecoderModel.compile_decode``; the commands point
    inductor's cache at the NKAT cache folder, ``cli.common.inductor_cache``).

    ``batch_invariant`` (default) makes a decode step's rows independent of each other, so a
    sequence gets the same bits alone and in a batch (``DecoderModel.set_batch_invariant``).

    For a .nkat file, θ is applied with the file's γ (``nkat.theta.gamma``) unless
    ``theta_gamma`` overrides it; ``theta=False`` loads the plain source model.

    ``cache_types``: the KV cache's types for keys and values (``f32``, ``f16``, ``bf16``, ``q8_0``;
    ``model/kv_cache.py``); default bf16, float32 with ``reference``.

    ``kernels``: ``"triton"`` runs every quantised weight the Triton kernels read from its GGUF
    bytes (``cuda/``; on a CPU only under ``TRITON_INTERPRET=1``, for tests), ``"cpu"`` the CPU
    kernels (``packed.py``), ``"auto"`` (default) Triton on CUDA when triton is installed.

    ``layout_cache`` reads the packed weights back from ``~/.cache/nkat/layouts`` when an
    earlier start stored them, and stores them otherwise (``model/layout_cache.py``).
    """
    t0 = time.perf_counter()
    dev = device if isinstance(device, torch.device) else pick_device(device)
    gguf = open_gguf(path)
    arch = gguf.architecture
    embd = gguf.tensors.get("token_embd.weight")
    cfg = config_for(arch, gguf.metadata, embd.shape[0] if embd is not None else 0)
    unsupported = sorted(gguf.unsupported_types().items())
    if unsupported:
        kind, name = unsupported[0]
        raise UnsupportedError(f"{gguf.path.name}: tensor type {kind} (e.g. tensor {name}) is not supported; "
                               f"supported: {', '.join(quant.type_name(t) for t in sorted(quant.SUPPORTED_TYPES))}")
    validate_config(cfg)
    check_supported(cfg, gguf.metadata, gguf.tensors)
    tokenizer = Tokenizer.from_metadata(gguf.metadata)
    check_tensors(cfg, gguf.tensors, tokenizer.vocab_size)
    n_ctx = min(context or DEFAULT_CONTEXT, cfg.context_length) if not context else context
    if n_ctx <= 0:
        raise ValueError("context size must be positive")
    n_weights = sum(".theta_" not in n for n in gguf.tensors)
    bar = tqdm(total=n_weights, desc="loading tensors", unit="t", disable=not progress, leave=False)
    try:
        gamma = None
        if theta and gguf.get("nkat.version") is not None:
            gamma = float(theta_gamma if theta_gamma is not None else gguf.get("nkat.theta.gamma", 1.0))
        weights = GGUFWeights(gguf, dev, dtype, bar, theta_gamma=gamma, fast=not reference, layout_cache=layout_cache,
                              triton=use_triton(kernels, dev))
        model = DecoderModel(cfg, weights)
    finally:
        bar.close()
    if weights.layouts is not None:
        weights.layouts.save()
    model.eval()
    model.set_batch_invariant(batch_invariant)
    trim_heap()
    model.setup_caches(max_batch, n_ctx, cache_types or default_cache_types(reference))
    if compile:
        model.compile_decode(mode="reduce-overhead" if dev.type == "cuda" else None)
        for pos in (0, 1):  # compile now, not on the first request (the second step: dynamic KV length)
            model(torch.zeros(1, 1, dtype=torch.long, device=dev), torch.tensor([pos], device=dev))
    elapsed = time.perf_counter() - t0
    log.info("loaded %s (%s, %d layers) on %s in %.2f s, context %d, %s math", Path(path).name, arch, cfg.n_layer,
             dev, elapsed, n_ctx, "reference" if reference else "fast")
    return LoadedModel(Path(path), gguf, cfg, model, tokenizer, n_ctx, dev, elapsed)
