"""Latency of a running nkat-server: time to first token and tokens/s of one stream, then what
N concurrent clients each see (one generation runs at a time, so the others queue).

    nkat-server --port 5001 &
    python benchmarks/serve_latency.py --url http://127.0.0.1:5001 --clients 4 --max-tokens 32

Loopback only, and bounded (at most 16 clients x 4 requests x 256 tokens). Prints a table and
one JSON line (``--json FILE`` also writes it).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from urllib.parse import urlparse

import aiohttp

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


@dataclass
class Run:
    client: int
    ttft_s: float  # request sent -> first non-empty text chunk
    total_s: float  # request sent -> stream closed
    completion_tokens: int
    prompt_tokens: int
    decode_tok_s: float  # (tokens - 1) / (total - ttft): the rate once text flows


async def one_stream(session: aiohttp.ClientSession, url: str, client: int, args: argparse.Namespace) -> Run:
    prompt = f"[request {uuid.uuid4().hex[:8]}] {args.prompt}" if args.cold else args.prompt
    body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0.8, "seed": 1000 + client,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    t0 = time.perf_counter()
    ttft = None
    usage = {}
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
        buf = b""
        async for chunk in resp.content.iter_any():
            buf += chunk
            while b"\n\n" in buf:
                frame, buf = buf.split(b"\n\n", 1)
                line = frame.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if data.get("usage"):
                    usage = data["usage"]
                if ttft is None and data.get("choices") and data["choices"][0].get("text"):
                    ttft = time.perf_counter() - t0
    total = time.perf_counter() - t0
    ttft = total if ttft is None else ttft
    n = usage.get("completion_tokens", 0)
    rate = (n - 1) / (total - ttft) if n > 1 and total > ttft else 0.0
    return Run(client, round(ttft, 3), round(total, 3), n, usage.get("prompt_tokens", 0), round(rate, 2))


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    sys.exit(f"serve_latency: error: {url} is not a loopback address (this tool only measures a local server)")


async def main_async(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.password}"} if args.password else {}
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        async with session.get(args.url + "/v1/models") as r:
            model = (await r.json())["data"][0]["id"]
        await one_stream(session, args.url, 0, argparse.Namespace(**{**vars(args), "max_tokens": 2}))  # warm-up
        single = [await one_stream(session, args.url, 0, args) for _ in range(args.repeat)]
        t0 = time.perf_counter()
        tasks = [one_stream(session, args.url, c, args) for c in range(args.clients) for _ in range(args.requests)]
        concurrent = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    total_tokens = sum(r.completion_tokens for r in concurrent)
    return {
        "model": model, "max_tokens": args.max_tokens, "prompt_tokens": single[0].prompt_tokens,
        "single": [asdict(r) for r in single],
        "single_ttft_s": statistics.median(r.ttft_s for r in single),
        "single_decode_tok_s": statistics.median(r.decode_tok_s for r in single),
        "clients": args.clients, "concurrent": [asdict(r) for r in concurrent],
        "concurrent_wall_s": round(wall, 3), "concurrent_aggregate_tok_s": round(total_tokens / wall, 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:5001")
    p.add_argument("--password", default=None, help="the server's --password, if it has one")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (1-16)")
    p.add_argument("--requests", type=int, default=1, help="requests per client in the concurrent run (1-4)")
    p.add_argument("--repeat", type=int, default=2, help="single-stream runs (1-4); the median is reported")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request (1-256)")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--cold", action="store_true",
                   help="start every prompt differently, so no request reuses the KV cache of the last one")
    p.add_argument("--timeout", type=float, default=900, help="seconds for one request")
    p.add_argument("--json", default=None, help="also write the JSON result here")
    args = p.parse_args()
    if not (1 <= args.clients <= 16 and 1 <= args.requests <= 4 and 1 <= args.repeat <= 4
            and 1 <= args.max_tokens <= 256):
        p.error("bounds: clients 1-16, requests 1-4, repeat 1-4, max-tokens 1-256")
    args.url = args.url.rstrip("/")
    check_loopback(args.url)
    res = asyncio.run(main_async(args))
    print(f"model {res['model']}, prompt {res['prompt_tokens']} tokens, {args.max_tokens} tokens per request"
          f"{', cold prompts' if args.cold else ''}")
    print(f"single stream: TTFT {res['single_ttft_s']:.2f} s, decode {res['single_decode_tok_s']:.2f} tok/s")
    print(f"{args.clients} concurrent clients (wall {res['concurrent_wall_s']:.1f} s, "
          f"aggregate {res['concurrent_aggregate_tok_s']:.2f} tok/s):")
    for r in sorted(res["concurrent"], key=lambda r: r["total_s"]):
        print(f"  client {r['client']}: TTFT {r['ttft_s']:6.2f} s  total {r['total_s']:6.2f} s  "
              f"{r['completion_tokens']} tokens  {r['decode_tok_s']:.2f} tok/s")
    line = json.dumps(res)
    print(line)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
