"""Decode speed with a float32 against a bf16 KV cache, interleaved in one process (the noise of a
shared machine hits both alike): ``--rounds`` rounds alternating the order, each the median of
``--gen`` greedy steps with ``--depth`` tokens cached; the medians over rounds and their ratio.

    python benchmarks/kv_cache_ab.py --model gemma3-270m --depth 1024
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/kv_cache_ab.py --model qwen2.5-coder-0.5b --depth 4096

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--depth", type=int, default=1024)
    p.add_argument("--gen", type=int, default=16)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--types", default="f32,bf16", help="two cache types, the first the baseline")
    args = p.parse_args()
    import torch

    from nkat_runtime.bundled import resolve_model
    from nkat_runtime.eval.bench import prompt_tokens, time_decode, time_prefill
    from nkat_runtime.loader import load_model
    from nkat_runtime.theta.convert import BUILTIN_EVAL

    torch.set_num_threads(args.threads)
    kinds = args.types.split(",")
    path = resolve_model(args.model)
    lms = {k: load_model(path, device="cpu", context=args.depth + args.gen + 1, progress=False, cache_types=(k, k))
           for k in kinds}
    text = BUILTIN_EVAL.read_text(encoding="utf-8")
    while len(text) < args.depth * 8:
        text += text
    ids = prompt_tokens(lms[kinds[0]], text, args.depth)
    for lm in lms.values():
        time_prefill(lm, ids)
    res: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        for k in (kinds if r % 2 == 0 else kinds[::-1]):
            res[k].append(statistics.median(time_decode(lms[k], args.depth, 100, args.gen).step_seconds))
    tok_s = {k: round(1 / statistics.median(v), 2) for k, v in res.items()}
    isa = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS") if k in os.environ}
    print(json.dumps({"model": args.model, "depth": args.depth, "decode_tok_s": tok_s,
                      "ratio": round(tok_s[kinds[1]] / tok_s[kinds[0]], 3), "isa": isa or "default",
                      "cpu": torch.backends.cpu.get_cpu_capability()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
