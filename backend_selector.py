"""Pick this runtime (NKAT) or a stock Kobold.cpp for this machine and model, then launch it.

    python backend_selector.py                       # default model, decide, launch, wait for "ready"
    python backend_selector.py --model m.gguf --dry-run --json
    python backend_selector.py --check               # environment checklist (the guide's step 1)

Decisions are printed with their reasons (rules in ``nkat_selector/rules.py``); settings come from
flags, then ``config.toml`` ([selector], [server], [model]). Exit status: 0 served and
stopped cleanly (or --check/--dry-run succeeded), 1 the server failed to start, 2 no backend
can serve this model here or a bad argument.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Sequence

# [selector] koboldcpp goes to its own attribute: the --koboldcpp flag is looked for first
SELECTOR_KEYS = {"prefer": "prefer", "koboldcpp": "koboldcpp_cfg", "vram_factor": "vram_factor",
                 "vram_headroom_mb": "vram_headroom_mb", "ready_timeout": "ready_timeout"}
SERVER_KEYS = {"host": "host", "port": "port", "password": "password", "api_key": "password"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="backend_selector.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", default=None, help="a .gguf/.nkat file or a bundled alias (default gemma3-270m)")
    p.add_argument("--prefer", choices=["nkat", "koboldcpp"], default=None, help="when both can serve (default nkat)")
    p.add_argument("--koboldcpp", default=None, help="path of the koboldcpp binary or koboldcpp.py")
    p.add_argument("--host", default=None, help="default 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default 5001")
    p.add_argument("--ctx", "--contextsize", dest="ctx", type=int, default=None, help="context tokens (default 4096)")
    p.add_argument("--password", "--api-key", dest="password", default=None, help="API key both servers require")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the server")
    p.add_argument("--vram-factor", dest="vram_factor", type=float, default=None)
    p.add_argument("--vram-headroom-mb", dest="vram_headroom_mb", type=int, default=None)
    p.add_argument("--ready-timeout", dest="ready_timeout", type=float, default=None,
                   help="seconds to wait for /api/v1/model (default 600)")
    p.add_argument("--dry-run", action="store_true", help="print the decision and the exact command; start nothing")
    p.add_argument("--json", action="store_true", help="print the probe and decision as JSON")
    p.add_argument("--check", action="store_true", help="print the environment checklist; exit 0 when it can start")
    p.add_argument("--config", default=None, help="TOML settings file (default ./config.toml if present)")
    return p


def _main(argv: Sequence[str] | None) -> int:
    from nkat_runtime.bundled import resolve_model
    from nkat_runtime.cli import common
    from nkat_selector.check import checklist, checklist_lines, passed
    from nkat_selector.launch import LaunchError, LaunchOptions, command, run, shown
    from nkat_selector.probe import probe
    from nkat_selector.rules import SelectionError, Settings, decide

    args = build_parser().parse_args(argv)
    args.koboldcpp_cfg = None
    common.apply_config(args, {"selector": SELECTOR_KEYS, "server": SERVER_KEYS,
                               "model": common.MODEL_KEYS}, strict=("selector",))
    defaults = Settings()
    settings = Settings(prefer=args.prefer or defaults.prefer,
                        vram_factor=float(args.vram_factor or defaults.vram_factor),
                        vram_headroom_mb=int(args.vram_headroom_mb if args.vram_headroom_mb is not None
                                             else defaults.vram_headroom_mb))
    model = str(resolve_model(args.model))
    opts = LaunchOptions(model, args.host or "127.0.0.1", int(args.port or 5001), int(args.ctx or 4096),
                         args.password or "", int(args.threads or 0), float(args.ready_timeout or 600.0))
    found = probe(model, args.koboldcpp, args.koboldcpp_cfg)
    decision, error = None, ""
    try:
        decision = decide(found, settings)
    except SelectionError as exc:
        error = str(exc)
    cmd = command(decision, found, opts) if decision else []
    if args.json:
        print(json.dumps({"probe": asdict(found), "decision": asdict(decision) if decision else None,
                          "error": error or None, "command": shown(cmd).split(" ") if cmd else None}, indent=2))
    if args.check:
        items = checklist(found, decision, error, opts)
        print("\n".join(checklist_lines(items)))
        return 0 if passed(items) else 2
    if decision is None:
        print(f"backend_selector: error: {error}", file=sys.stderr)
        return 2
    if not args.json:
        print(f"backend_selector: {decision.backend} on {decision.device}", file=sys.stderr)
        for reason in decision.reasons:
            print(f"  - {reason}", file=sys.stderr)
        print(f"  command: {shown(cmd)}", file=sys.stderr)
    if args.dry_run:
        return 0
    try:
        return run(cmd, opts)
    except LaunchError as exc:
        print(f"backend_selector: error: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    from nkat_runtime.cli import common

    return common.run(_main, argv, prog="backend_selector")


if __name__ == "__main__":
    sys.exit(main())
