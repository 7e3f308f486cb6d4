"""The KV block pool on a real server: memory against the tokens actually cached, and a shared
character card's time to first token, beside llama.cpp's server under the same load.

    python benchmarks/kv_pool.py --model qwen2.5-coder-1.5b --parallel 8 --ctx 8192 --cache-type bf16 \\
        --llama-cpp /tmp/llama-build/bin

Starts ``nkat-server`` (then ``llama-server -np P -c P*CTX``, same cache type) on 127.0.0.1 and
runs two loads through llama.cpp's ``/completion``:

1. **Shared card**: a ``--card``-token character card with a different user turn per stream.
   Stream 1 goes alone; when it has ended, streams 2..P go together. Prints each
   stream's time to first token (TTFT), the ratio of streams 2..P's TTFT to stream 1's (the
   target is <= 0.2), the tokens each reused (``tokens_cached``), and the blocks ``/slots``
   reports as shared.
2. **Memory**: P different prompts of ``--tokens`` tokens, generating ``--gen`` each, all at
   once. The server's resident memory (VmRSS, from /proc) is sampled every 0.1 s; at its peak,
   the tokens held by the slots (``n_cached`` in ``/slots``) times the cache's bytes per token
   is "the cache used". Target: peak RSS <= file size + 1.2 x cache used.

Prints a table and a JSON line (``--json FILE`` too). Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402
from serve_load import QUESTIONS, TOPICS, completion  # noqa: E402  (the same streaming client)

TIMEOUT = aiohttp.ClientTimeout(total=3600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    t0 = time.monotonic()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}")
            try:
                async with s.get(url + "/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("the server did not come up")


async def get_json(session: aiohttp.ClientSession, url: str) -> dict | list:
    async with session.get(url) as r:
        return await r.json()


def card_text(n_words: int) -> str:
    """A long, deterministic character card (about 1.3 tokens a word)."""
    parts = ["Character card: Mira, a travelling archivist.\n"]
    i = 0
    while sum(len(p.split()) for p in parts) < n_words:
        topic = TOPICS[i % len(TOPICS)]
        parts.append(f"Mira once spent season {i + 1} with {topic}, learning its routines, its tools and the "
                     f"stories its people told at night; she wrote down everything in notebook {i + 7}. ")
        i += 1
    return "".join(parts) + "\n"


async def tokens_of(session: aiohttp.ClientSession, url: str, text: str) -> int:
    async with session.post(url + "/tokenize", json={"content": text}) as r:
        return len((await r.json())["tokens"])


async def shared_card(url: str, args: argparse.Namespace, is_ours: bool) -> dict:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        words = int(args.card / 1.3)
        card = card_text(words)
        n_card = await tokens_of(s, url, card)
        body = lambda i: {"prompt": card + f"User: {QUESTIONS[i % len(QUESTIONS)]}\nMira:",  # noqa: E731
                          "n_predict": args.gen, "temperature": 0, "cache_prompt": True}
        first = await completion(s, url, body(0))
        rest = await asyncio.gather(*(completion(s, url, body(i)) for i in range(1, args.parallel)))
        slots = await get_json(s, url + "/slots") if is_ours else []
    ttft_rest = [r.ttft_s for r in rest]
    out = {"card_tokens": n_card, "ttft_first_s": first.ttft_s, "ttft_rest_s": ttft_rest,
           "ttft_rest_median_s": statistics.median(ttft_rest), "ttft_rest_max_s": max(ttft_rest),
           "ratio_max": max(ttft_rest) / first.ttft_s, "ratio_median": statistics.median(ttft_rest) / first.ttft_s,
           "cached": [r.cached for r in rest]}
    if is_ours:
        out["blocks_shared_max"] = max(x.get("n_blocks_shared", 0) for x in slots)
        out["blocks_held"] = sum(x.get("n_blocks", 0) for x in slots)
    return out


async def memory(url: str, pid: int, args: argparse.Namespace, bytes_per_token: int) -> dict:
    samples: list[tuple[float, float]] = []
    done = asyncio.Event()

    async def sample(s: aiohttp.ClientSession) -> None:
        while not done.is_set():
            samples.append((time.monotonic(), rss_mib(pid)))
            await asyncio.sleep(0.1)

    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        idle = rss_mib(pid)
        prompts = [card_text(int(args.tokens / 1.3)).replace("Mira", name) for name in
                   ("Ada", "Bram", "Cleo", "Dov", "Esme", "Finn", "Gala", "Hugo", "Ines", "Jun", "Kai", "Lea")]
        sampler = asyncio.create_task(sample(s))
        streams = await asyncio.gather(*(completion(s, url, {"prompt": prompts[i % len(prompts)], "n_predict": args.gen,
                                                             "temperature": 0, "cache_prompt": False})
                                         for i in range(args.parallel)))
        done.set()
        await sampler
    peak = max(r for _, r in samples)
    live = sum(r.prompt_tokens + r.tokens for r in streams)
    used_mib = live * bytes_per_token / 2**20
    return {"rss_idle_mib": idle, "rss_peak_mib": peak, "live_tokens": live, "cache_used_mib": used_mib}


def start(cmd: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_path.open("w"), env=env, text=True)


def run_server(name: str, cmd: list[str], url: str, args: argparse.Namespace, bytes_per_token: int) -> dict:
    env = dict(os.environ)
    log_path = Path(args.logs) / f"kv_pool-{name}.log"
    proc = start(cmd, env, log_path)
    try:
        try:
            asyncio.run(wait_ready(url, proc))
        except RuntimeError:
            raise RuntimeError(f"{name} did not start; its log: {log_path}") from None
        result: dict = {"command": " ".join(cmd)}
        try:
            result["card"] = asyncio.run(shared_card(url, args, name == "nkat"))
            result["memory"] = asyncio.run(memory(url, proc.pid, args, bytes_per_token))
        except (aiohttp.ClientError, RuntimeError) as exc:  # reported, and the other server still runs
            result["error"] = f"{type(exc).__name__}: {exc} (server exit code {proc.poll()}, log {log_path})"
        return result
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--ctx", type=int, default=8192, help="context per slot")
    p.add_argument("--cache-type", default="bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--card", type=int, default=1500, help="tokens in the shared character card (about)")
    p.add_argument("--tokens", type=int, default=600, help="prompt tokens per stream in the memory load (about)")
    p.add_argument("--gen", type=int, default=16)
    p.add_argument("--llama-cpp", default=None, help="folder with llama-server")
    p.add_argument("--json", default=None)
    p.add_argument("--logs", default="/tmp", help="folder for the servers' logs")
    args = p.parse_args()
    from nkat_runtime.bundled import resolve_model
    from nkat_runtime.loader import load_model

    path = Path(resolve_model(args.model))
    lm = load_model(path, context=16, progress=False, cache_types=(args.cache_type, args.cache_type))
    bytes_per_token = lm.model.kv_bytes_per_token()
    del lm
    file_mib = path.stat().st_size / 2**20
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ours_cmd = [sys.executable, "-m", "nkat_server.cli", "--model", str(path), "--port", str(port), "--threads",
                str(args.threads), "--parallel", str(args.parallel), "--contextsize", str(args.ctx), "-ctk",
                args.cache_type, "-ctv", args.cache_type, "--cache-ram", "0", "--max-queue", str(2 * args.parallel)]
    results = {"model": path.name, "file_mib": file_mib, "bytes_per_token": bytes_per_token, "cpu": cpu_name(),
               "args": vars(args), "nkat": run_server("nkat", ours_cmd, url, args, bytes_per_token)}
    llama_dir = Path(args.llama_cpp) if args.llama_cpp else None
    if llama_dir is not None and (llama_dir / "llama-server").is_file():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [str(llama_dir / "llama-server"), "-m", str(path), "--port", str(port), "-t", str(args.threads),
               "-np", str(args.parallel), "-c", str(args.parallel * args.ctx), "-ctk", args.cache_type, "-ctv",
               args.cache_type, "--no-warmup"]
        results["llama_cpp"] = run_server("llama.cpp", cmd, url, args, bytes_per_token)
    report(results)
    line = json.dumps(results)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n", encoding="utf-8")
    return 0


def report(r: dict) -> None:
    print(f"{r['model']}: file {r['file_mib']:.0f} MiB, cache {r['bytes_per_token'] / 1024:.1f} KiB/token, {r['cpu']}")
    for name in ("nkat", "llama_cpp"):
        if name not in r:
            continue
        if "error" in r[name]:
            print(f"  {name}: failed: {r[name]['error']}")
            continue
        c, m = r[name]["card"], r[name]["memory"]
        limit = r["file_mib"] + 1.2 * m["cache_used_mib"]
        print(f"  {name}: card {c['card_tokens']} tokens: TTFT first {c['ttft_first_s']:.2f} s, others median "
              f"{c['ttft_rest_median_s']:.2f} s / max {c['ttft_rest_max_s']:.2f} s (ratio max {c['ratio_max']:.3f}, "
              f"target <= 0.2), cached {c['cached']}" + (f", blocks shared {c['blocks_shared_max']}"
                                                          if "blocks_shared_max" in c else ""))
        print(f"  {name}: memory: RSS idle {m['rss_idle_mib']:.0f} MiB, peak {m['rss_peak_mib']:.0f} MiB with "
              f"{m['live_tokens']} live tokens ({m['cache_used_mib']:.0f} MiB of cache); file + 1.2 x cache = "
              f"{limit:.0f} MiB -> {'met' if m['rss_peak_mib'] <= limit else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
