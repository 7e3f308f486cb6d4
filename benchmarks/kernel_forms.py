"""The fast path's matrix kernels, one by one: time per call, weights/s and bytes/s read.

    python benchmarks/kernel_forms.py --threads 2
    python benchmarks/kernel_forms.py --threads 1 --rows 1,8 --json kernels.json

For each GGUF type, on the shapes that dominate real models (Qwen2.5-1.5B's Q6_K head and
ffn_down, Gemma 3's tied Q8_0 head, Q4_K and Q5_0 blocks), random blocks are packed into the
form the loader gives them (``packed.pack_linear``: int4 kernel for 4-, 5- and 8-bit codes,
fused kernels over planes for Q6_K, Q3_K), the planes form for the types int4 took (the
candidate it was chosen over), and, as the baseline, a dense float32 weight multiplied row
by row (``linear.row_local_matmul``). Each call is timed as a decode step of
``--rows`` sequences (``x`` [M, 1, K]); medians of ``--reps`` calls after a warm-up (which
compiles the fused kernels). Bytes are what the form holds for the weight, and the file's
bytes for comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

SHAPES = [("Q6_K", 151936, 1536, "Qwen2.5-1.5B output"), ("Q6_K", 1536, 8960, "Qwen2.5-1.5B ffn_down"),
          ("Q8_0", 262144, 640, "Gemma 3 output (tied)"), ("Q4_K", 8960, 1536, "Qwen2.5-1.5B ffn_up"),
          ("Q5_0", 2048, 640, "Gemma 3 ffn_up"), ("Q5_K", 8960, 1536, "a Q5_K_M ffn_up"),
          ("Q3_K", 8960, 1536, "a Q3_K_M ffn_up")]
F16_FIELDS = {"Q4_K": (0, 2), "Q5_0": (0,), "Q5_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,), "Q3_K": (108,)}


def random_ref(name: str, n: int, k: int):
    from nkat_runtime.gguf.reader import TensorRef

    block, size = GGML_QUANT_SIZES[T[name]]
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    for off in F16_FIELDS[name]:
        data[..., off : off + 2] = np.full((n, k // block), 0.01, np.float16).view(np.uint8).reshape(n, -1, 2)
    return TensorRef(name=name, qtype=int(T[name]), shape=(n, k), offset=0, raw=data.reshape(-1))


def timed(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", "-t", type=int, default=2)
    p.add_argument("--rows", default="1,4,8", help="decode batch sizes M")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--no-float32", action="store_true", help="skip the float32 baseline")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from nkat_runtime.model import packed
    from nkat_runtime.model.linear import row_local_matmul
    from nkat_runtime.quant import dequantize

    rows = [int(r) for r in args.rows.split(",")]
    results = []
    print(f"{torch.backends.cpu.get_cpu_capability()}, {args.threads} thread(s), medians of {args.reps}")
    print(f"{'type':5} {'shape':>13} {'form':>8} {'B/w':>5} {'file':>5} " + " ".join(f"{'M=' + str(m):>17}" for m in rows))
    for name, n, k, what in SHAPES:
        ref = random_ref(name, n, k)
        layer = packed.pack_linear(ref, torch.device("cpu"))
        forms = [(type(layer).__name__.replace("Linear", ""), layer, layer.weight_bytes())]
        if isinstance(layer, packed.Int4Linear):  # the candidate it won against: planes, byte codes
            planes = packed.plane_linear(ref, torch.device("cpu"))
            forms.append(("Fused", planes, planes.weight_bytes()))
        if not args.no_float32:
            w = dequantize(ref.raw_tensor(), ref.qtype, ref.shape)
            forms.append(("float32", lambda x, w=w: row_local_matmul(x.view(x.shape[0], -1), w), w.numel() * 4))
        for form, fn, nbytes in forms:
            cells = []
            for m in rows:
                x = torch.randn(m, 1, k)
                sec = timed(lambda: fn(x), args.reps)
                results.append({"type": name, "shape": [n, k], "what": what, "form": form, "rows": m, "ms": sec * 1e3,
                                "gweights_s": n * k / sec / 1e9, "gb_s": nbytes / sec / 1e9,
                                "bytes_per_weight": nbytes / (n * k), "file_bytes_per_weight": ref.nbytes / (n * k)})
                cells.append(f"{sec * 1e3:6.2f} ms {nbytes / sec / 1e9:5.1f}GB/s")
            print(f"{name:5} {n:>6}×{k:<6} {form:>8} {nbytes / (n * k):5.2f} {ref.nbytes / (n * k):5.2f} " + " ".join(cells))
        del layer, forms
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
