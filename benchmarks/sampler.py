"""The host chain row by row against the batch sampler, on logits of a real vocabulary size.

    python benchmarks/sampler.py                      # V = 262144 (Gemma 3), batches 1, 8, 32
    python benchmarks/sampler.py --vocab 151936 --device cuda

Prints the median milliseconds per decode step's sampling over ``--reps`` interleaved runs, for
llama.cpp's default settings (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, repetition
penalty 1.1 over 64 tokens) and for greedy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nkat_runtime.sampling.batched import Row, sample_batch  # noqa: E402
from nkat_runtime.sampling.chain import make_generator, sample  # noqa: E402
from nkat_runtime.sampling.params import SamplingParams  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, default=262144)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    settings = {"default": SamplingParams(repeat_penalty=1.1), "greedy": SamplingParams.greedy()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {dev}, vocab {args.vocab}")
    for name, params in settings.items():
        for B in map(int, args.batches.split(",")):
            logits = torch.randn(B, args.vocab, device=dev) * 4
            history = [list(range(i, i + 200)) for i in range(B)]
            gens = [make_generator(i, dev) for i in range(B)]
            host_gens = [make_generator(i) for i in range(B)]
            host, batch = [], []
            for _ in range(args.reps):
                sync()
                t0 = time.perf_counter()
                [sample(logits[b], params, history[b], host_gens[b]) for b in range(B)]
                host.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                sample_batch(logits, [Row(params, history[b], gens[b]) for b in range(B)])
                batch.append(time.perf_counter() - t0)
            h, b = statistics.median(host) * 1e3, statistics.median(batch) * 1e3
            print(f"{name:8s} batch {B:3d}: host chain {h:8.2f} ms   batch sampler {b:8.2f} ms   ratio {b / h:.2f}")


if __name__ == "__main__":
    main()
