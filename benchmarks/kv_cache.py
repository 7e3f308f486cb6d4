"""KV cache types: memory, prefill and decode speed at depth, against llama.cpp's same cache types.

    python benchmarks/kv_cache.py --model gemma3-270m --threads 2 --depth 1024 --llama-cpp /tmp/llama-build/bin

For each type (``f32``, ``bf16``, ``f16``, ``q8_0`` for keys and values alike): the cache's MiB for
the context, the prefill of ``--depth`` tokens (tok/s), then ``--gen`` greedy decode steps with
those ``--depth`` tokens in the cache (median step, as tok/s), medians over ``--reps``. Then
``llama-bench -d DEPTH -p 0 -n GEN -ctk T -ctv T -fa on`` for the same types (llama.cpp needs flash
attention for a quantised V cache; it offers no f32 cache), and the ratio ours / llama.cpp per type. Prints a table and
a JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import find_llama, run_child  # noqa: E402  (the same child-process timing as speed.py)

TYPES = ("f32", "bf16", "f16", "q8_0")
LLAMA_BENCH_TYPES = ("bf16", "f16", "q8_0")  # llama-bench takes no f32 cache


def ours(path: Path, kind: str, args: argparse.Namespace) -> dict:
    import torch

    from nkat_runtime.eval.bench import prompt_tokens, time_decode, time_prefill
    from nkat_runtime.loader import load_model
    from nkat_runtime.theta.convert import BUILTIN_EVAL

    torch.set_num_threads(args.threads)
    ctx = args.depth + args.gen + 1
    lm = load_model(path, device="cpu", context=ctx, progress=False, cache_types=(kind, kind))
    ids = prompt_tokens(lm, BUILTIN_EVAL.read_text(encoding="utf-8"), args.depth)
    time_prefill(lm, ids[:16])  # warm-up
    prefill, steps = [], []
    for _ in range(args.reps):
        seconds, tok = time_prefill(lm, ids)
        prefill.append(seconds)
        steps.extend(time_decode(lm, args.depth, tok, args.gen).step_seconds)
    return {"cache_mib": lm.model.kv_bytes_per_token() * ctx / 2**20, "prefill_tok_s": args.depth / statistics.median(prefill),
            "decode_tok_s": 1.0 / statistics.median(steps)}


def llama(path: Path, bin_dir: Path, kind: str, args: argparse.Namespace) -> dict:
    cmd = [str(bin_dir / "llama-bench"), "-m", str(path), "-t", str(args.threads), "-d", str(args.depth), "-p", "0",
           "-n", str(args.gen), "-r", str(args.reps), "-ctk", kind, "-ctv", kind, "-fa", "on", "-o", "json"]
    _, _, out = run_child(cmd, timeout=3600)
    tests = json.loads(out)
    samples = tests[0].get("samples_ts") or [tests[0]["avg_ts"]]
    return {"decode_tok_s": statistics.median(samples), "command": " ".join(cmd)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--depth", type=int, default=1024, help="tokens in the cache while decoding (llama-bench -d)")
    p.add_argument("--gen", type=int, default=32, help="decode steps (llama-bench -n)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--llama-cpp", default=None, help="folder with llama-bench")
    args = p.parse_args()
    from nkat_runtime.bundled import resolve_model

    path = resolve_model(args.model)
    bin_dir = find_llama(args.llama_cpp)
    rows = {}
    for kind in args.types.split(","):
        row = {"ours": ours(path, kind, args)}
        if bin_dir is not None and kind in LLAMA_BENCH_TYPES:
            row["llama_cpp"] = llama(path, bin_dir, kind, args)
            row["decode_ratio"] = row["ours"]["decode_tok_s"] / row["llama_cpp"]["decode_tok_s"]
        rows[kind] = row
        o = row["ours"]
        theirs = (f", llama.cpp {row['llama_cpp']['decode_tok_s']:.2f} tok/s ({row['decode_ratio']:.2f})"
                  if "llama_cpp" in row else "")
        print(f"{kind:5} cache {o['cache_mib']:7.1f} MiB  prefill {o['prefill_tok_s']:7.1f} tok/s  "
              f"decode at depth {args.depth}: {o['decode_tok_s']:6.2f} tok/s{theirs}", flush=True)
    print(json.dumps({"model": path.name, "threads": args.threads, "depth": args.depth, "gen": args.gen,
                      "reps": args.reps, "types": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
