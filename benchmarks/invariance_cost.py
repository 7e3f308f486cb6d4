"""What batch-invariant decode costs: ``serve_load.py`` against servers that differ only in it.

    python benchmarks/invariance_cost.py --model gemma3-270m --clients 8 --max-tokens 128 --rounds 2
    python benchmarks/invariance_cost.py --before /tmp/nkat-old   # also an older checkout of NKAT

For each round, each configuration in turn (interleaved, so a noisy machine hurts them alike):
start ``nkat-server --parallel CLIENTS`` on a free loopback port, run ``serve_load.py --clients
CLIENTS``, stop it. Configurations: this tree with ``--deterministic`` (the default) and with
``--no-deterministic``, and with ``--before DIR`` that checkout's server (as it was: its own
default). Prints per configuration the median over rounds of the 8-stream aggregate tokens/s, the
decode-only aggregate, the single-stream rate and how many streams gave their text alone; the
ratios to ``--no-deterministic``; and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/model", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the server did not come up")


def one_run(tree: Path, flags: list[str], args: argparse.Namespace) -> dict:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "nkat_server.cli", "--model", args.model, "--port", str(port),
           "--parallel", str(args.clients), "--threads", str(args.threads), "--contextsize", "1024", *flags]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=tree, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(port, proc)
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                subprocess.run([sys.executable, str(HERE / "serve_load.py"), "--url", f"http://127.0.0.1:{port}",
                                "--clients", str(args.clients), "--max-tokens", str(args.max_tokens),
                                "--json", out.name], check=True, stdout=subprocess.DEVNULL)
                return json.loads(Path(out.name).read_text())["streams"]
        finally:
            proc.terminate()
            proc.wait(60)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--before", default=None, help="an older NKAT checkout to measure too (its own default)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    configs = {"deterministic": (REPO, ["--deterministic"]), "no-deterministic": (REPO, ["--no-deterministic"])}
    if args.before:
        configs["before"] = (Path(args.before).resolve(), [])
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for r in range(args.rounds):
        for name, (tree, flags) in configs.items():
            res = one_run(tree, flags, args)
            runs[name].append(res)
            print(f"round {r + 1} {name:17} aggregate {res['aggregate_tok_s']:7.2f} tok/s, decode-only "
                  f"{res['aggregate_decode_tok_s']:7.2f}, single {res['single_tok_s']:6.2f}, "
                  f"same text {res['same_text']}/{res['clients']}", flush=True)
    med = {name: {k: statistics.median(x[k] for x in rs) for k in ("aggregate_tok_s", "aggregate_decode_tok_s",
                                                                   "single_tok_s")}
           for name, rs in runs.items()}
    base = med["no-deterministic"]
    print(f"\nmedians over {args.rounds} round(s), {args.clients} streams x {args.max_tokens} tokens, "
          f"{args.model}, {args.threads} threads:")
    for name, m in med.items():
        same = [x["same_text"] for x in runs[name]]
        print(f"  {name:17} aggregate {m['aggregate_tok_s']:7.2f} tok/s ({m['aggregate_tok_s'] / base['aggregate_tok_s']:.3f}"
              f" x no-deterministic), decode-only {m['aggregate_decode_tok_s']:7.2f} "
              f"({m['aggregate_decode_tok_s'] / base['aggregate_decode_tok_s']:.3f} x), single {m['single_tok_s']:.2f}, "
              f"same text {same}")
    line = json.dumps({"model": args.model, "clients": args.clients, "max_tokens": args.max_tokens,
                       "threads": args.threads, "medians": med, "runs": runs})
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
