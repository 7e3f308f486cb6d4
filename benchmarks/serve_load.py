"""Load on a running nkat-server: concurrent streams, and a chat replayed turn by turn.

    nkat-server --parallel 8 --threads 2 &
    python benchmarks/serve_load.py --url http://127.0.0.1:5001 --clients 8 --max-tokens 48
    python benchmarks/serve_load.py --replay 10 [--trim]

**Streams**: every client's request runs alone first (the baseline, and its text), then all
together. Prints the aggregate tokens/s of both runs and their ratio, each request's time to
first token (TTFT) and inter-token latency percentiles, and whether each concurrent stream's
text equals its text alone (greedy, same seed: no cross-talk). Prompts go with
``cache_prompt: false``, so both runs compute every prompt token.

**Chat replay**: a conversation grows for N turns (``--trim``: from turn 4 on, the oldest
exchange is dropped and the system prompt kept). Per turn: prompt tokens, tokens the server
actually prefilled, the new tokens, the TTFT, and the TTFT of the new tokens alone (a cold
request of only them): the price of the turn against the price of its new text.

Loopback only, bounded. Uses llama.cpp's ``/completion`` (its final event carries
``timings.prompt_n`` and ``tokens_cached``). Prints a JSON line at the end (``--json FILE``).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import aiohttp

TOPICS = ["a lighthouse keeper", "a clockmaker's apprentice", "a desert caravan", "an orbital greenhouse",
          "a river ferry", "a mountain observatory", "a night bakery", "a library of maps", "a glassblower",
          "a tide-pool biologist", "a train signal box", "a beekeeper", "a violin repair shop", "an ice road",
          "a radio amateur", "a deep-sea cable ship"]
SYSTEM = ("System: You are a helpful, concise assistant. Answer the user's questions about history, science "
          "and daily life in two or three sentences.\n")
QUESTIONS = ["Why is the sky blue?", "Who built the first printing press?", "How do bees make honey?",
             "What causes the seasons?", "Why do we yawn?", "How does a compass work?", "What is a black hole?",
             "How do plants drink water?", "Why is the sea salty?", "How do vaccines work?",
             "What makes thunder?", "Why do leaves change colour?"]


@dataclass
class Stream:
    start: float = 0.0  # perf_counter when sent
    ttft_s: float = 0.0
    total_s: float = 0.0
    tokens: int = 0
    prompt_n: int = 0  # tokens the server prefilled
    prompt_tokens: int = 0
    cached: int = 0
    text: str = ""
    gaps_s: list[float] = field(default_factory=list)  # between text chunks


async def completion(session: aiohttp.ClientSession, url: str, body: dict) -> Stream:
    out = Stream()
    t0 = last = out.start = time.perf_counter()
    async with session.post(url + "/completion", json={**body, "stream": True}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
        buf = b""
        async for chunk in resp.content.iter_any():
            buf += chunk
            while b"\n\n" in buf:
                frame, buf = buf.split(b"\n\n", 1)
                line = frame.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    raise RuntimeError(str(data["error"]))
                now = time.perf_counter()
                if data.get("content"):
                    if not out.text:
                        out.ttft_s = now - t0
                    else:
                        out.gaps_s.append(now - last)
                    last = now
                    out.text += data["content"]
                if data.get("stop"):
                    out.tokens = data["tokens_predicted"]
                    out.prompt_n = data["timings"]["prompt_n"]
                    out.prompt_tokens = data["tokens_evaluated"]
                    out.cached = data["tokens_cached"]
    out.total_s = time.perf_counter() - t0
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


async def streams(session: aiohttp.ClientSession, args: argparse.Namespace) -> dict:
    def body(i: int) -> dict:
        return {"prompt": f"Write a short story about {TOPICS[i % len(TOPICS)]}.", "n_predict": args.max_tokens,
                "temperature": 0, "seed": 1, "ignore_eos": True, "cache_prompt": False}

    await completion(session, args.url, {**body(0), "n_predict": 2})  # warm-up
    t0 = time.perf_counter()
    alone = []
    for i in range(args.clients):
        alone.append(await completion(session, args.url, body(i)))
    alone_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    together = await asyncio.gather(*(completion(session, args.url, body(i)) for i in range(args.clients)))
    wall = time.perf_counter() - t0
    single_rate = statistics.median(s.tokens / s.total_s for s in alone)
    agg = sum(s.tokens for s in together) / wall
    # decode only: tokens after each stream's first, over the time from the first token anywhere to the last
    single_dec = statistics.median((s.tokens - 1) / (s.total_s - s.ttft_s) for s in alone)
    span = max(s.start + s.total_s for s in together) - min(s.start + s.ttft_s for s in together)
    agg_dec = sum(s.tokens - 1 for s in together) / span
    gaps = [g for s in together for g in s.gaps_s]
    same = sum(a.text == b.text for a, b in zip(alone, together))
    print(f"{args.clients} requests of {args.max_tokens} tokens, greedy, prompts not cached")
    print(f"  one at a time: {alone_wall:.1f} s; median single stream {single_rate:.2f} tok/s "
          f"(TTFT median {statistics.median(s.ttft_s for s in alone):.2f} s)")
    print(f"  all together : {wall:.1f} s; aggregate {agg:.2f} tok/s = {agg / single_rate:.2f} x a single stream")
    print(f"  decode only  : single stream {single_dec:.2f} tok/s; together {agg_dec:.2f} tok/s = "
          f"{agg_dec / single_dec:.2f} x")
    print(f"  TTFT together: median {statistics.median(s.ttft_s for s in together):.2f} s, "
          f"max {max(s.ttft_s for s in together):.2f} s")
    print(f"  inter-chunk latency together: p50 {pct(gaps, 50) * 1e3:.0f} ms, p90 {pct(gaps, 90) * 1e3:.0f} ms, "
          f"p99 {pct(gaps, 99) * 1e3:.0f} ms")
    print(f"  same text alone and together: {same}/{args.clients}")
    return {"clients": args.clients, "max_tokens": args.max_tokens, "single_tok_s": round(single_rate, 3),
            "aggregate_tok_s": round(agg, 3), "ratio": round(agg / single_rate, 3), "same_text": same,
            "single_decode_tok_s": round(single_dec, 3), "aggregate_decode_tok_s": round(agg_dec, 3),
            "decode_ratio": round(agg_dec / single_dec, 3),
            "lost": sum(s.tokens != args.max_tokens for s in together),
            "ttft_together_s": [round(s.ttft_s, 3) for s in together],
            "itl_ms": {q: round(pct(gaps, q) * 1e3, 1) for q in (50, 90, 99)}}


async def replay(session: aiohttp.ClientSession, args: argparse.Namespace) -> list[dict]:
    exchanges: list[str] = []
    rows = []
    print(f"chat replay, {args.replay} turns{' (oldest exchange dropped from turn 4 on)' if args.trim else ''}")
    print(" turn  prompt  prefilled  new  TTFT s  new-only TTFT s  ratio")
    prev_reply = ""
    for turn in range(args.replay):
        if args.trim and len(exchanges) >= 3:
            exchanges.pop(0)
        user = f"User: {QUESTIONS[turn % len(QUESTIONS)]}\nAssistant:"
        prompt = SYSTEM + "".join(exchanges) + user
        s = await completion(session, args.url, {"prompt": prompt, "n_predict": args.reply_tokens,
                                                 "temperature": 0, "seed": 1, "stop": ["\nUser:"]})
        new_text = prev_reply + "\n" + user if turn else prompt
        async with session.post(args.url + "/tokenize", json={"content": new_text}) as r:
            new = len((await r.json())["tokens"])
        cold = await completion(session, args.url, {"prompt": new_text, "n_predict": 1, "temperature": 0,
                                                    "cache_prompt": False})
        ratio = s.ttft_s / cold.ttft_s if cold.ttft_s else 0.0
        print(f" {turn + 1:4d}  {s.prompt_tokens:6d}  {s.prompt_n:9d}  {new:3d}  {s.ttft_s:6.2f}  "
              f"{cold.ttft_s:15.2f}  {ratio:5.2f}")
        rows.append({"turn": turn + 1, "prompt_tokens": s.prompt_tokens, "prefilled": s.prompt_n, "new_tokens": new,
                     "ttft_s": round(s.ttft_s, 3), "new_only_ttft_s": round(cold.ttft_s, 3), "reply": s.text})
        prev_reply = s.text
        exchanges.append(user + s.text + "\n")
    later = rows[1:]
    if later:
        ok = sum(r["prefilled"] <= r["new_tokens"] + 16 for r in later)
        print(f"  turns 2-{len(rows)}: prefilled <= new + 16 in {ok}/{len(later)}; median TTFT ratio "
              f"{statistics.median(r['ttft_s'] / r['new_only_ttft_s'] for r in later):.2f}")
    return rows


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    sys.exit(f"serve_load: error: {url} is not a loopback address (this tool only loads a local server)")


async def main_async(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.password}"} if args.password else {}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=args.timeout)) as session:
        async with session.get(args.url + "/props") as r:
            props = await r.json()
        print(f"server: {props['model_path']}, {props['total_slots']} slot(s)")
        res: dict = {"slots": props["total_slots"]}
        if args.clients:
            res["streams"] = await streams(session, args)
        if args.replay:
            res["replay"] = await replay(session, args)
            res["trim"] = args.trim
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:5001")
    p.add_argument("--password", default=None, help="the server's --password, if it has one")
    p.add_argument("--clients", type=int, default=8, help="concurrent streams (0-16; 0 = skip)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per stream (1-512)")
    p.add_argument("--replay", type=int, default=0, help="chat turns to replay (0-30; 0 = skip)")
    p.add_argument("--reply-tokens", type=int, default=48, help="longest reply per turn (1-256)")
    p.add_argument("--trim", action="store_true", help="replay: drop the oldest exchange from turn 4 on")
    p.add_argument("--timeout", type=float, default=1800, help="seconds for one request")
    p.add_argument("--json", default=None, help="also write the JSON result here")
    args = p.parse_args()
    if not (0 <= args.clients <= 16 and 1 <= args.max_tokens <= 512 and 0 <= args.replay <= 30
            and 1 <= args.reply_tokens <= 256):
        p.error("bounds: clients 0-16, max-tokens 1-512, replay 0-30, reply-tokens 1-256")
    args.url = args.url.rstrip("/")
    check_loopback(args.url)
    line = json.dumps(asyncio.run(main_async(args)))
    print(line)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
