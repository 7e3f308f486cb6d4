"""What every NKAT command shares: model/device flags, logging, and turning errors into
one clear line with exit status 2 (no traceback for a user's mistake)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from .. import bundled
from ..cache_types import CACHE_TYPES, DEFAULT_CACHE_TYPE, REFERENCE_CACHE_TYPE, default_cache_types
from ..cuda import KERNELS
from ..errors import NKATError

EXIT_USAGE = 2


def add_model_args(parser: argparse.ArgumentParser, ctx_default: int | None = None, many: bool = False) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", "-m", default=None, action="append" if many else "store",
                   help=f"a .gguf/.nkat file, or a bundled alias ({', '.join(bundled.ALIASES)}); "
                        "default: the bundled Gemma 3 270M Q4_K_M" + ("; give it again to serve several" if many else ""))
    g.add_argument("--ctx", "--contextsize", dest="ctx", type=int, default=ctx_default,
                   help="context size in tokens (default: 4096, capped at the model's trained context)")
    g.add_argument("--device", default=None, help="torch device (cpu, cuda, cuda:1); default: cuda if available")
    g.add_argument("--no-cuda", action="store_true", help="run on the CPU even when CUDA is available")
    g.add_argument("--threads", "-t", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--reference-math", action="store_true",
                   help="dequantise every weight to float32 and run plain dense math (slow; the path "
                        "checked against gguf-py, transformers and llama.cpp) instead of packed weights")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (CPU, Gemma 3 270M: measured 1.14-1.6x faster decode, "
                        "at 85-140 s of compiling at load; see docs/fast-path.md)")
    g.add_argument("--kernels", choices=KERNELS, default="auto",
                   help="quantised weights' kernels: auto = Triton over the GGUF blocks on CUDA (not yet run on a "
                        "GPU, docs/gpu.md), the CPU kernels elsewhere; triton on a CPU only under TRITON_INTERPRET=1")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="batch-invariant decode (default on): a sequence decoded among others gets the same "
                        "bits, so the same text, as alone; --no-deterministic multiplies a batch's rows in one "
                        "GEMM, faster with large float32 layers (F16/F32 weights), see docs/server.md")
    g.add_argument("--cache-type-k", "-ctk", dest="cache_type_k", choices=CACHE_TYPES, default=None,
                   help=f"KV cache type for keys (default {DEFAULT_CACHE_TYPE}, {REFERENCE_CACHE_TYPE} with --reference-math; q8_0: 8-bit blocks of 32, ~53 %% of bf16)")
    g.add_argument("--cache-type-v", "-ctv", dest="cache_type_v", choices=CACHE_TYPES, default=None,
                   help=f"KV cache type for values (default {DEFAULT_CACHE_TYPE})")
    g.add_argument("--quantkv", type=int, choices=(0, 1), default=None,
                   help="koboldcpp's spelling: 0 = f16 keys and values, 1 = q8_0 (2, q4, is not offered)")
    g.add_argument("--config", default=None,
                   help="TOML settings file ([model] model/ctx/device/threads); default ./config.toml if present")
    g.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def add_calibration_args(parser: argparse.ArgumentParser) -> None:
    """Residual θ's calibration (the converter and the optimiser)."""
    from ..theta.calibrate import DEFAULT_CHUNKS, DEFAULT_STAT, STATS

    parser.add_argument("--calibration", default=None, help="text for activation-aware residual θ (default: built-in)")
    parser.add_argument("--calibration-chunks", type=int, default=DEFAULT_CHUNKS,
                        help=f"chunks of 512 tokens of it (default {DEFAULT_CHUNKS})")
    parser.add_argument("--activation-stats", choices=STATS, default=DEFAULT_STAT,
                        help="residual θ's calibration statistic: second-moment (default) = the inputs' E[x·xᵀ], "
                             "whose whitening minimises each layer's output error (QERA); mean-abs = per-channel "
                             "mean |x| (LQER-style scaling), cheaper on wide layers: as good on Gemma 3 270M, far "
                             "worse on Qwen2.5-Coder (docs/theta-results.md §2f)")


MODEL_KEYS = {"model": "model", "ctx": "ctx", "device": "device", "threads": "threads",
              "cache_type_k": "cache_type_k", "cache_type_v": "cache_type_v"}
ZERO_IS_DEFAULT = {"ctx", "threads"}  # "threads = 0" in a config file means "the default"


def apply_config(
    args: argparse.Namespace,
    tables: dict[str, dict[str, str]] | None = None,
    strict: Sequence[str] = (),
) -> None:
    """Fill flags the user did not give (still None) from the config file.

    ``tables`` maps a TOML table to ``{key in the file: attribute of args}``; the first table
    that sets a value wins (default: the [model] table alone). A table named in ``strict``
    may only hold known keys: a typo there is an error, not a silently ignored setting.
    """
    import tomllib

    path = Path(args.config) if getattr(args, "config", None) else Path("config.toml")
    if not path.is_file():
        if getattr(args, "config", None):
            raise ValueError(f"config file not found: {path}")
        return
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: invalid TOML: {exc}") from None
    for name, keys in (tables or {"model": MODEL_KEYS}).items():
        table = doc.get(name, {})
        if not isinstance(table, dict):
            raise ValueError(f"{path}: [{name}] must be a table")
        if name in strict:
            unknown = sorted(set(table) - set(keys))
            if unknown:
                raise ValueError(f"{path}: unknown key(s) in [{name}]: {', '.join(unknown)} "
                                 f"(known: {', '.join(sorted(keys))})")
        for key, attr in keys.items():
            value = table.get(key)
            unset = value is None or value == "" or (attr in ZERO_IS_DEFAULT and value == 0)
            if getattr(args, attr, None) is None and not unset:
                setattr(args, attr, value)


def setup(
    args: argparse.Namespace,
    tables: dict[str, dict[str, str]] | None = None,
    strict: Sequence[str] = (),
    level: int = logging.WARNING,
) -> None:
    apply_config(args, tables, strict)
    setup_logging_and_threads(args, level)


def setup_logging_and_threads(args: argparse.Namespace, level: int = logging.WARNING) -> None:
    """Logging (``--verbose``) and torch's CPU threads (``--threads``), without a config file."""
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else level,
                        format="%(levelname)s %(name)s: %(message)s")
    threads = getattr(args, "threads", None)
    if threads is not None:
        import torch

        if not isinstance(threads, int) or isinstance(threads, bool) or threads <= 0:
            raise ValueError("--threads must be a positive integer")
        torch.set_num_threads(threads)


def load_from_args(args: argparse.Namespace, path: Path | None = None, **kwargs):
    """Resolve --model (path or alias) unless ``path`` is given, pick the device, load; kwargs go
    to ``load_model``."""
    from ..bundled import resolve_model
    from ..loader import load_model, pick_device

    path = path or resolve_model(args.model)
    device = pick_device(args.device, no_cuda=args.no_cuda)
    kwargs.setdefault("reference", bool(getattr(args, "reference_math", False)))
    kwargs.setdefault("compile", bool(getattr(args, "compile", False)))
    if kwargs["compile"]:
        inductor_cache()
    kwargs.setdefault("batch_invariant", getattr(args, "deterministic", None) is not False)
    kwargs.setdefault("cache_types", cache_types(args))
    kwargs.setdefault("kernels", getattr(args, "kernels", "auto"))
    return load_model(path, device=device, context=args.ctx, **kwargs)


def cache_types(args: argparse.Namespace) -> tuple[str, str]:
    """(keys, values) from --cache-type-k / -v, else koboldcpp's --quantkv, else the default
    (float32 with --reference-math)."""
    quantkv = getattr(args, "quantkv", None)
    default = default_cache_types(bool(getattr(args, "reference_math", False)))
    k, v = default if quantkv is None else (("f16", "q8_0")[quantkv],) * 2
    return getattr(args, "cache_type_k", None) or k, getattr(args, "cache_type_v", None) or v


def inductor_cache() -> None:
    """Compiled kernels persist across runs in ``~/.cache/nkat/inductor/<cpu>`` (unless
    ``TORCHINDUCTOR_CACHE_DIR`` names another folder)."""
    from ..model.fused import use_kernel_cache

    use_kernel_cache()


def write_json(path: str | Path, obj: object) -> None:
    """Write JSON to a temp file beside ``path``, then rename it into place."""
    import json

    from ..fsutil import publish, temp_beside

    tmp = temp_beside(path)
    try:
        tmp.write_text(json.dumps(obj, indent=2))
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run ``main``; a user-facing error prints one line and returns 2."""
    prog = prog or "nkat-" + main.__module__.rsplit(".", 1)[-1]
    try:
        return main(argv)
    except (NKATError, ValueError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
