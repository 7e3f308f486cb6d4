"""``nkat-perplexity``: perplexity of a text file by llama.cpp's ``llama-perplexity`` method."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from . import common


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nkat-perplexity", description=__doc__)
    common.add_model_args(p)
    p.add_argument("--file", "-f", required=True, help="UTF-8 text file to score")
    p.add_argument("--chunks", type=int, default=None, help="score only the first N chunks (default: all)")
    p.add_argument("--json", dest="json_file", default=None, help="also write the result as JSON to this file")
    return p


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    n_ctx = args.ctx or 512  # llama-perplexity's default; config.toml's ctx is for serving
    common.setup(args)
    args.ctx = n_ctx  # the cache needs exactly one chunk
    from ..eval.perplexity import perplexity

    text_path = Path(args.file)
    if not text_path.is_file():
        raise ValueError(f"text file not found: {text_path}")
    try:
        text = text_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{text_path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    lm = common.load_from_args(args)
    print(f"perplexity: tokenizing {text_path.name} ({len(text)} characters)", file=sys.stderr)

    def on_chunk(i: int, ppl: float) -> None:  # the running figures are the progress display
        print(f"[{i + 1}]{ppl:.4f},", end="", flush=True)

    res = perplexity(lm, text, n_ctx=n_ctx, n_chunks=args.chunks, on_chunk=on_chunk)
    print()
    print(f"Final estimate: PPL = {res.ppl:.4f} +/- {res.ppl_error:.5f}")
    out = {"model": str(lm.path), "file": str(text_path), "device": str(lm.device), **res.as_dict()}
    print(json.dumps(out))
    if args.json_file:
        common.write_json(args.json_file, out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
