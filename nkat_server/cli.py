"""``nkat-server``: serve a GGUF / .nkat model over the KoboldCpp, OpenAI and llama.cpp APIs.

Every flag can also be set in the ``[server]`` table of the config file (``--config``, default
``./config.toml`` when present); the ``[model]`` table is read too. Flags win over the file.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

from nkat_runtime.cache_types import CACHE_TYPES
from nkat_runtime.cli import common
from nkat_runtime.text.chat_output import REASONING_FORMATS, reasoning_format

log = logging.getLogger("nkat_server")

DEFAULTS: dict[str, Any] = {"host": "127.0.0.1", "port": 5001, "max_queue": 6, "max_body": 32.0,
                            "default_max_tokens": 512, "no_cuda": False, "no_theta": False, "parallel": 0,
                            "cache_reuse": 32, "noshift": False, "keep": -1, "cache_ram": 1024.0,
                            "body_timeout": 60.0, "deterministic": True, "reasoning_format": "none",
                            "chat_template_kwargs": "{}", "kv_pool": "0", "kv_block_size": 32,
                            "decode_graphs": "auto", "pooling": "mean", "models_max": 4,
                            "metrics": False, "cors_origins": "*"}
# [server] key -> argparse attribute (the flags' own names, plus KoboldCpp's spellings)
SERVER_KEYS = {
    "model": "model", "contextsize": "ctx", "ctx": "ctx", "device": "device", "threads": "threads",
    "no_cuda": "no_cuda", "host": "host", "port": "port", "password": "password", "api_key": "password",
    "theta_gamma": "theta_gamma", "no_theta": "no_theta", "max_queue": "max_queue", "max_body": "max_body",
    "default_max_tokens": "default_max_tokens", "defaultgenamt": "default_max_tokens", "verbose": "verbose",
    "parallel": "parallel", "cache_reuse": "cache_reuse", "noshift": "noshift", "keep": "keep",
    "cache_ram": "cache_ram", "body_timeout": "body_timeout", "deterministic": "deterministic",
    "reasoning_format": "reasoning_format", "chat_template_kwargs": "chat_template_kwargs",
    "cache_type_k": "cache_type_k", "cache_type_v": "cache_type_v", "quantkv": "quantkv",
    "kv_pool": "kv_pool", "kv_block_size": "kv_block_size", "decode_graphs": "decode_graphs",
    "pooling": "pooling", "models_dir": "models_dir", "models_max": "models_max",
    "admin_password": "admin_password", "adminpassword": "admin_password", "slot_save_path": "slot_save_path",
    "metrics": "metrics", "cors_origins": "cors_origins",
}
TYPES: dict[str, tuple[type, ...]] = {
    "host": (str,), "port": (int,), "password": (str,), "theta_gamma": (int, float), "no_theta": (bool,),
    "max_queue": (int,), "max_body": (int, float), "default_max_tokens": (int,), "no_cuda": (bool,),
    "model": (str, list), "ctx": (int,), "device": (str,), "verbose": (bool,), "parallel": (int,),
    "cache_reuse": (int,), "noshift": (bool,), "keep": (int,), "cache_ram": (int, float),
    "body_timeout": (int, float), "deterministic": (bool,), "reasoning_format": (str,),
    "chat_template_kwargs": (str,), "cache_type_k": (str,), "cache_type_v": (str,), "quantkv": (int,),
    "kv_pool": (str, int), "kv_block_size": (int,), "decode_graphs": (str,), "pooling": (str,),
    "models_dir": (str,), "models_max": (int,), "admin_password": (str,), "slot_save_path": (str,),
    "metrics": (bool,), "cors_origins": (str,),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (through common.run)
        raise ValueError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nkat-server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p, many=True)
    p.set_defaults(no_cuda=None, verbose=None)  # None = "not given", so the config file can fill it
    s = p.add_argument_group("server")
    s.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; 0.0.0.0 = all)")
    s.add_argument("--port", type=int, default=None, help="TCP port (default 5001, as KoboldCpp)")
    s.add_argument("--password", "--api-key", dest="password", default=None,
                   help="require 'Authorization: Bearer <key>' on generation and token routes")
    s.add_argument("--metrics", action="store_true", default=None,
                   help="serve Prometheus metrics at /metrics (requests, tokens, latencies, queue, KV blocks)")
    s.add_argument("--cors-origins", default=None, metavar="ORIGINS",
                   help="comma-separated origins browsers may call the API from, e.g. "
                        "'http://localhost:8000,https://my.site' (default '*' = any, as KoboldCpp)")
    s.add_argument("--max-queue", type=int, default=None,
                   help="requests that may wait while one generates (default 6); more get 503")
    s.add_argument("--max-body", type=float, default=None, help="request size limit in MB (default 32)")
    s.add_argument("--body-timeout", type=float, default=None,
                   help="seconds a request body may take to arrive (default 60); slower uploads get 408")
    s.add_argument("--default-max-tokens", "--defaultgenamt", dest="default_max_tokens", type=int, default=None,
                   help="tokens to generate when a request gives no length (default 512)")
    m = p.add_argument_group("several models")
    m.add_argument("--models-dir", default=None, metavar="DIR",
                   help="also offer every .gguf/.nkat file in DIR; a request's 'model' picks one (loaded on first "
                        "use), GET /v1/models lists them")
    m.add_argument("--models-max", type=int, default=None,
                   help="models loaded at once (default 4); loading one more unloads the least recently used idle one")
    m.add_argument("--admin-password", "--adminpassword", dest="admin_password", default=None,
                   help="Bearer key of the admin routes (POST /models/load, /models/unload, /models/reload, "
                        "koboldcpp's /api/admin/*); without it they answer 403")
    m.add_argument("--slot-save-path", default=None, metavar="DIR",
                   help="folder for POST /slots/{id}?action=save|restore files (llama.cpp's); without it refused")
    b = p.add_argument_group("batching and prompt cache")
    b.add_argument("--parallel", "-np", dest="parallel", type=int, default=None,
                   help="sequences decoded together, one KV-cache slot each (default 0 = sized to memory, at most 4)")
    b.add_argument("--cache-reuse", type=int, default=None,
                   help="reuse cached chunks of at least this many tokens that moved in the prompt, re-rotating "
                        "their keys (default 32; 0 = the common prefix only)")
    b.add_argument("--noshift", "--no-context-shift", dest="noshift", action="store_true", default=None,
                   help="end a generation at the context's end instead of dropping the oldest tokens")
    b.add_argument("--keep", type=int, default=None,
                   help="tokens kept at the start on a context shift (default -1 = the BOS token)")
    b.add_argument("--cache-ram", type=float, default=None,
                   help="MiB of RAM for the prompt cache of conversations that left their slot (default 1024; 0 = off)")
    b.add_argument("--kv-pool", default=None, metavar="N|NMiB|NGiB",
                   help="size of the KV block pool that all slots share, in tokens or MiB/GiB (default 0 = every "
                        "slot's full context, at most half the free memory). Memory is used as tokens are cached: "
                        "a token takes layers x 2 x KV heads x head size x the type's bytes (Qwen2.5-1.5B, bf16: "
                        "28 x 2 x 2 x 128 x 2 = 28 KiB), and a prompt prefix several requests share is held once")
    b.add_argument("--kv-block-size", type=int, default=None,
                   help="tokens per KV block (default 32): the unit of allocation and of prefix sharing")
    b.add_argument("--decode-graphs", choices=("auto", "on", "off"), default=None,
                   help="replay decode steps as CUDA graphs, one per batch and table-width bucket (default auto = "
                        "on a CUDA device; 'on' elsewhere runs the same padded step without graphs)")
    b.add_argument("--pooling", choices=("mean", "last"), default=None,
                   help="how /v1/embeddings, /embedding(s) and /api/extra/embeddings pool the final hidden states "
                        "of an input's tokens (default mean; last = the last token's); vectors are L2-normalised")
    c = p.add_argument_group("chat")
    c.add_argument("--reasoning-format", choices=REASONING_FORMATS, default=None,
                   help="where a chat reply's <think>...</think> goes: none = left in the content (default), "
                        "deepseek (or auto) = message.reasoning_content, deepseek-legacy = both; a request's "
                        "'reasoning_format' wins")
    c.add_argument("--chat-template-kwargs", default=None, metavar="JSON",
                   help="extra chat-template variables for every chat request, e.g. '{\"enable_thinking\": false}' "
                        "(a request's 'chat_template_kwargs' wins key by key)")
    t = p.add_argument_group("θ (.nkat files)")
    t.add_argument("--theta-gamma", type=float, default=None, help="override the file's θ strength γ")
    t.add_argument("--no-theta", action="store_true", default=None, help="serve the plain source model")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Defaults for what neither the flags nor the config gave; type-check config values."""
    for key, value in DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key, types in TYPES.items():
        value = getattr(args, key, None)
        if value is not None and (not isinstance(value, types) or (bool not in types and isinstance(value, bool))):
            raise ValueError(f"{key} must be of type {' or '.join(t.__name__ for t in types)}, got {value!r}")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.max_queue < 0:
        raise ValueError("--max-queue must be >= 0")
    if args.max_body <= 0:
        raise ValueError("--max-body must be > 0 (MB)")
    if args.body_timeout <= 0:
        raise ValueError("--body-timeout must be > 0 (seconds)")
    if args.default_max_tokens <= 0:
        raise ValueError("--default-max-tokens must be > 0")
    if args.parallel < 0:
        raise ValueError("--parallel must be >= 0 (0 = sized to memory)")
    if args.cache_reuse < 0:
        raise ValueError("--cache-reuse must be >= 0")
    if args.cache_ram < 0:
        raise ValueError("--cache-ram must be >= 0 (MiB)")
    if args.ctx is not None and args.ctx <= 0:
        raise ValueError("--contextsize must be positive")
    args.kv_pool_size = parse_pool(str(args.kv_pool))
    if not 1 <= args.kv_block_size <= 4096:
        raise ValueError("--kv-block-size must be in 1..4096 tokens")
    if args.pooling not in ("mean", "last"):
        raise ValueError(f"--pooling must be mean or last, got {args.pooling!r}")
    if args.decode_graphs not in ("auto", "on", "off"):
        raise ValueError(f"--decode-graphs must be auto, on or off, got {args.decode_graphs!r}")
    if args.password == "":
        args.password = None
    if args.admin_password == "":
        args.admin_password = None
    args.cors = tuple(o.strip().rstrip("/") for o in args.cors_origins.split(",") if o.strip())
    if not args.cors:
        raise ValueError("--cors-origins must name at least one origin (or '*')")
    if args.models_max < 1:
        raise ValueError("--models-max must be >= 1")
    args.model_paths = model_paths(args)
    for key in ("cache_type_k", "cache_type_v"):
        if getattr(args, key, None) is not None and getattr(args, key) not in CACHE_TYPES:
            raise ValueError(f"{key} must be one of {', '.join(CACHE_TYPES)}")
    if getattr(args, "quantkv", None) not in (None, 0, 1):
        raise ValueError("quantkv must be 0 (f16) or 1 (q8_0)")
    args.chat_defaults = chat_defaults(args)
    return args


def model_paths(args: argparse.Namespace) -> list[Path]:
    """The files to serve: each --model (paths or aliases; none = the bundled default unless
    --models-dir gives some), then --models-dir's files. The first is the default model."""
    from nkat_runtime.bundled import resolve_model

    from .models import scan_dir

    given = args.model if isinstance(args.model, list) else [args.model] if args.model else []
    paths = [resolve_model(m) for m in given]
    if args.models_dir:
        found = scan_dir(Path(args.models_dir).expanduser())
        if not found and not paths:
            raise ValueError(f"--models-dir {args.models_dir}: no .gguf or .nkat file in it")
        paths += [f for f in found if all(f.resolve() != p.resolve() for p in paths)]
    return paths or [resolve_model(None)]


POOL_UNITS = {"": 0, "mib": 2**20, "mb": 2**20, "gib": 2**30, "gb": 2**30}


def parse_pool(text: str) -> tuple[float, int]:
    """``--kv-pool``: (amount, bytes per unit; 0 = the amount is tokens)."""
    t = text.strip().lower()
    unit = next((u for u in sorted(POOL_UNITS, key=len, reverse=True) if u and t.endswith(u)), "")
    try:
        amount = float(t[: len(t) - len(unit)]) if unit else int(t)
    except ValueError:
        raise ValueError(f"--kv-pool must be a token count or a size such as 512MiB or 2GiB, got {text!r}") from None
    if amount < 0:
        raise ValueError("--kv-pool must be >= 0")
    return amount, POOL_UNITS[unit]


def pool_tokens(size: tuple[float, int], bytes_per_token: int) -> int:
    amount, unit = size
    return int(amount) if unit == 0 else int(amount * unit // bytes_per_token)


def chat_defaults(args: argparse.Namespace) -> Any:
    """``--reasoning-format`` and ``--chat-template-kwargs``, checked, as the preparer's defaults."""
    from nkat_runtime.request import ChatOptions

    fmt = reasoning_format(args.reasoning_format)  # a ValueError names the allowed values
    try:
        kwargs = json.loads(args.chat_template_kwargs)
    except ValueError as exc:
        raise ValueError(f"--chat-template-kwargs is not JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise ValueError("--chat-template-kwargs must be a JSON object")
    return ChatOptions(reasoning_format=fmt, template_kwargs=kwargs)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, password: str | None) -> str | None:
    """The warning for a server others can reach without a key (None when there is nothing to say)."""
    if password or is_loopback(host):
        return None
    return (f"listening on {host} without --password: anyone who can reach this machine can generate text and "
            "read the queue; set --password (clients then send 'Authorization: Bearer <key>')")


def theta_state(lm: Any, args: argparse.Namespace) -> str:
    if lm.gguf.get("nkat.version") is None:
        return "θ: none (plain GGUF)"
    if args.no_theta:
        return "θ: off (--no-theta)"
    gamma = args.theta_gamma if args.theta_gamma is not None else lm.gguf.get("nkat.theta.gamma", 1.0)
    return f"θ: on (γ={float(gamma):g})"


async def serve(app: Any, host: str, port: int, banner: str) -> None:
    from aiohttp import web

    runner = web.AppRunner(app, handler_cancellation=True, access_log=logging.getLogger("nkat_server.access"))
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        shown = f"[{host}]" if ":" in host else host
        log.info("%s; listening on http://%s:%d (Kobold API /api, OpenAI API /v1)", banner, shown, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # pragma: no cover - non-main thread / Windows
                pass
        await stop.wait()
        log.info("shutting down")
    finally:
        await runner.cleanup()


def build_engine(args: argparse.Namespace, path: Path, observer: Any = None):
    """Load one model file and wrap it in an engine (the server's settings apply to every model)."""
    from nkat_runtime.serve.engine import Engine
    from nkat_runtime.serve.scheduler import SchedulerConfig, auto_slots

    lm = common.load_from_args(args, path, progress=sys.stderr.isatty(), theta=not args.no_theta,
                               theta_gamma=args.theta_gamma)
    sched = SchedulerConfig(slots=args.parallel or auto_slots(lm), cache_reuse=args.cache_reuse,
                            context_shift=not args.noshift, n_keep=args.keep,
                            cache_ram_bytes=int(args.cache_ram * 2**20),
                            pool_tokens=pool_tokens(args.kv_pool_size, lm.model.kv_bytes_per_token()),
                            block_size=args.kv_block_size,
                            decode_graphs={"auto": None, "on": True, "off": False}[args.decode_graphs])
    return Engine(lm, max_queue=args.max_queue, default_max_tokens=args.default_max_tokens, config=sched,
                  chat_defaults=args.chat_defaults, observer=observer)


def build_state(args: argparse.Namespace):
    """Load the default model (the others load once the server runs, or on first use) and wrap
    the set in the server state (no socket yet)."""
    import time

    from .framework import ServerConfig, ServerState
    from .metrics import Metrics
    from .models import ModelSet

    metrics = Metrics() if args.metrics else None

    def build(path: Path):
        return build_engine(args, path, metrics.observer(path.stem) if metrics is not None else None)

    models = ModelSet(args.model_paths, build, args.models_max)
    if metrics is not None:
        metrics.watch(models)
    start = time.perf_counter()
    engine = build(args.model_paths[0])
    models.adopt(models.default, engine, time.perf_counter() - start)
    slot_dir = Path(args.slot_save_path).expanduser() if args.slot_save_path else None
    if slot_dir is not None and not slot_dir.is_dir():
        raise ValueError(f"--slot-save-path: not a folder: {slot_dir}")
    config = ServerConfig(pooling=args.pooling, password=args.password, max_body_bytes=int(args.max_body * 1024 * 1024),
                          body_timeout_seconds=args.body_timeout, admin_password=args.admin_password,
                          slot_save_path=slot_dir, cors_origins=args.cors)
    given = len(args.model) if isinstance(args.model, list) else 1
    preload = list(models.entries)[1:min(given, args.models_max)]
    return engine, ServerState(models, config, metrics=metrics), preload


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup(args, tables={"server": SERVER_KEYS, "model": common.MODEL_KEYS}, strict=("server",),
                 level=logging.INFO)
    resolve(args)
    logging.getLogger("nkat_server.access").setLevel(logging.INFO if args.verbose else logging.WARNING)
    from .app import create_app

    warning = exposure_warning(args.host, args.password)
    if warning:
        log.warning("%s", warning)
    engine, state, preload = build_state(args)
    lm = engine.lm
    banner = (f"model {lm.path.name} ({lm.name}, {lm.config.arch}) on {lm.device}, context {lm.context}, "
              f"{theta_state(lm, args)}, {engine.config.slots} slot(s), KV cache "
              f"{'/'.join(lm.model.cache_types)} (a pool of {engine.cache_stats()['bytes_total'] / 2**20:.0f} MiB "
              f"at most, used as tokens are cached), "
              f"context shift {'off' if args.noshift else 'on'}, batch-invariant decode "
              f"{'on' if args.deterministic else 'off'}, auth {'on' if args.password else 'off'}")
    if state.models.several:
        banner += f"; {len(state.models.entries)} models offered (--models-max {args.models_max})"
    asyncio.run(serve(create_app(state, preload), args.host, args.port, banner))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run(_main, argv, prog="nkat-server")


if __name__ == "__main__":
    sys.exit(main())
