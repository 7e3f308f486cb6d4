"""``nkat-generate``: print a continuation of a prompt (or a chat reply) from a GGUF model."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from . import common


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nkat-generate", description=__doc__)
    common.add_model_args(p)
    p.add_argument("--prompt", "-p", default="The capital of France is", help="the prompt text")
    p.add_argument("--chat", action="store_true", help="treat the prompt as a user message and apply the chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-tokens", "-n", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", "--temp", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--repeat-last-n", type=int, default=64)
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object (text and timings) instead of streaming")
    return p


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup(args)
    from ..sampling.params import SamplingParams
    from ..serve.driver import Driver
    from ..serve.sequence import GenerationParams

    if args.max_tokens < 0:
        raise ValueError("--max-tokens must be >= 0")
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p,
                              args.repeat_penalty, args.repeat_last_n, args.seed)
    sampling.validate()
    lm = common.load_from_args(args, progress=not args.json)
    tok = lm.tokenizer
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        prompt_ids = tok.encode(lm.render_chat(messages), add_special=False, parse_special=True)
    else:
        prompt_ids = tok.encode(args.prompt, add_special=True)
    stream = Driver(lm).stream(prompt_ids, GenerationParams(args.max_tokens, sampling, args.stop))
    res = stream.choice
    if args.json:
        for _ in stream:
            pass
    else:
        if not args.chat:
            sys.stdout.write(args.prompt)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    stats = {
        "model": str(lm.path), "device": str(lm.device), "prompt_tokens": res.prompt_tokens,
        "completion_tokens": res.completion_tokens, "finish_reason": res.finish_reason,
        "load_seconds": round(lm.load_seconds, 3),
        "prefill_tokens_per_second": round(res.prompt_tokens / res.prefill_seconds, 2) if res.prefill_seconds else 0.0,
        "decode_tokens_per_second": round(res.decode_tokens_per_second, 2),
    }
    if args.json:
        print(json.dumps({"text": res.text, **stats}, ensure_ascii=False))
    else:
        print(f"[{res.prompt_tokens} prompt tokens, {res.completion_tokens} generated ({res.finish_reason}); "
              f"load {stats['load_seconds']} s, prefill {stats['prefill_tokens_per_second']} tok/s, "
              f"decode {stats['decode_tokens_per_second']} tok/s on {lm.device}]", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
