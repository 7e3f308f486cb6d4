"""The CUDA path on a real GPU, in one run of a few minutes: ceilings, kernel correctness, kernel
bandwidth and crossovers, and a synthetic 8B-shaped Q4_K_M model end to end.

    python benchmarks/gpu_check.py --out gpu.jsonl          # on a CUDA machine
    python benchmarks/gpu_check.py --dry-run                 # anywhere: every stage at toy size on the CPU
                                                             # (Triton interpreted), CUDA stages "skipped: no GPU"

Writes one JSON line per stage as it ends (stdout, and ``--out``), so a run cut short keeps what it
measured. Stages:

1. ``env``: device, torch, triton, CUDA versions.
2. ``ceilings``: device-to-device copy GB/s and bf16 matmul TFLOP/s (what no kernel can beat).
3. ``correctness``: every GGML type × rows {1, 3, 5, 20, 300} on ``torch.ops.nkat.gguf_mm`` against
   the CPU's gguf-py-exact dequantisation and a float64 product, inside NaN padding.
4. ``bandwidth``: per type at Llama-3-8B shapes, one row: GB/s of the file's bytes and % of the copy
   ceiling, ≥ 4 weight copies rotated so the cache cannot hold them; beside it torch's int4
   tinygemm and dequantise + cuBLAS. ``crossover``: rows 1–512 on each path, the fastest per rows.
5. ``model``: a synthetic Llama-3-8B-shaped Q4_K_M GGUF written on the device's disk (random blocks
   with small scales: timing, not text), loaded with the Triton kernels: VRAM against file size,
   128 decode steps (eager), 8/32/64 streams decoded together, a 512-token prefill.

Every figure is measured here; nothing is estimated. No model file travels to a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: Llama-3-8B: (out, in) of its matrices
SHAPES_8B = {"attn_q": (4096, 4096), "attn_kv": (1024, 4096), "ffn_up": (14336, 4096), "ffn_down": (4096, 14336)}
CROSSOVER_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
#: bytes of weight copies rotated per shape (an H200's L2 is 50 MB)
ROTATE_BYTES = 256 << 20


class Report:
    def __init__(self, out: Path | None) -> None:
        self.out = out.open("a", encoding="utf-8") if out else None

    def __call__(self, stage: str, **fields) -> None:
        line = json.dumps({"stage": stage, **fields})
        print(line, flush=True)
        if self.out:
            self.out.write(line + "\n")
            self.out.flush()


def timed(fn, reps: int, sync) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_blocks(qtype: int, n: int, k: int, device, seed: int = 0):
    """uint8 [n, row_bytes] blocks of ``qtype`` with finite float16 scales (``synthetic_gguf.py``)."""
    import numpy as np
    import torch
    from synthetic_gguf import random_blocks_np

    return torch.from_numpy(random_blocks_np(qtype, n, k, np.random.default_rng(seed))).to(device)


def stage_ceilings(report, dev, sync) -> float | None:
    import torch

    if dev.type != "cuda":
        report("ceilings", skipped="no GPU")
        return None
    a = torch.empty(1 << 28, dtype=torch.uint8, device=dev)  # 256 MiB
    b = torch.empty_like(a)
    s = timed(lambda: b.copy_(a), 20, sync)
    copy_gbs = 2 * a.numel() / s / 1e9  # read + write
    m = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    s = timed(lambda: m @ m, 10, sync)
    report("ceilings", copy_gb_s=round(copy_gbs, 1), bf16_matmul_tflops=round(2 * 8192**3 / s / 1e12, 1))
    return copy_gbs


def stage_correctness(report, dev, dry: bool) -> bool:
    import torch

    from nkat_runtime import quant
    from nkat_runtime.cuda.dequant import TYPES

    ok = True
    for qtype, (qk, _) in TYPES.items():
        n, k = 37, (2 if qk == 256 else 9) * qk
        w = random_blocks(qtype, n + 6, k, "cpu", seed=qtype)
        w[:3] = 0xFF  # NaN rows around the weight
        w[-3:] = 0xFF
        inner = w[3:-3]
        ref = quant.dequantize(inner.contiguous(), qtype, (n, k)).double()
        for rows in (1, 20, 300) if dry else (1, 3, 5, 20, 300):
            x = torch.randn(rows, k)
            want = x.double() @ ref.T
            got = torch.ops.nkat.gguf_mm(x.to(dev), w.to(dev)[3:-3], qtype, n).double().cpu()
            err = float((got - want).abs().max() / want.abs().max())
            good = bool(torch.isfinite(got).all()) and err < (1e-5 if dev.type == "cpu" else 2e-3)  # TF32 on GPU
            ok &= good
            report("correctness", type=quant.type_name(qtype), rows=rows, rel_err=err, ok=good)
    return ok


def stage_bandwidth(report, dev, sync, copy_gbs: float | None, dry: bool, types: set[str]) -> None:
    import torch
    import torch.nn.functional as F

    from nkat_runtime import quant
    from nkat_runtime.cuda import kernels
    from nkat_runtime.cuda.dequant import TYPES
    from nkat_runtime.model import int4

    shapes = {"toy": (64, 512)} if dry else SHAPES_8B
    reps = 1 if dry else 50
    for qtype, (qk, ts) in TYPES.items():
        if types and quant.type_name(qtype) not in types:
            continue
        for name, (n, k) in shapes.items():
            nbytes = n * k // qk * ts
            count = 1 if dry else max(4, -(-ROTATE_BYTES // nbytes))  # together far more than the L2 cache
            copies = [random_blocks(qtype, n, k, dev, seed=i) for i in range(count)]
            xs = {m: torch.randn(m, k, device=dev) for m in ((1,) if dry else CROSSOVER_ROWS)}
            turn = iter(range(1 << 30))

            def run(path: str, m: int):
                w = copies[next(turn) % len(copies)]
                x = xs[m]
                if path == "gemv":
                    return kernels.gemv(x, w, qtype, n)
                if path == "gemm":
                    return kernels.gemm(x, w, qtype, n)
                return F.linear(x, kernels.dequantize(w, qtype, n, k))

            s1 = timed(lambda: run("gemv", 1), reps, sync)
            row = {"type": quant.type_name(qtype), "shape": name, "n": n, "k": k, "file_bytes": nbytes,
                   "gemv_us": round(s1 * 1e6, 1), "gemv_gb_s": round(nbytes / s1 / 1e9, 1)}
            if copy_gbs:
                row["pct_of_copy"] = round(100 * nbytes / s1 / 1e9 / (copy_gbs / 2), 1)  # copy reads half its traffic
            row["dequant_cublas_us"] = round(timed(lambda: run("dense", 1), reps, sync) * 1e6, 1)
            if dev.type == "cuda" and int4.int4_shape_ok(n, k):  # tinygemm on 4-bit codes of the same shape
                try:
                    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
                    packed = int4.pack_int4(codes, dev)
                    sz = int4.scales_zeros(torch.ones(n, k // 32), torch.zeros(n, k // 32), dev)
                    xb = xs[1].bfloat16()
                    row["tinygemm_int4_us"] = round(timed(lambda: int4.int4_mm(xb, packed, sz), reps, sync) * 1e6, 1)
                except Exception as e:  # noqa: BLE001  (a comparison, not the subject: report and go on)
                    row["tinygemm_int4_error"] = f"{type(e).__name__}: {e}"[:200]
            report("bandwidth", **row)
            if dry or name != "ffn_up":
                continue
            best = {}
            for m in CROSSOVER_ROWS:
                paths = (["gemv"] if m <= kernels.GEMV_MAX_ROWS else []) + ["gemm", "dense"]
                t = {p: round(timed(lambda p=p: run(p, m), 20, sync) * 1e6, 1) for p in paths}
                best[m] = min(t, key=t.get)
                report("crossover", type=quant.type_name(qtype), rows=m, **{f"{p}_us": v for p, v in t.items()})
            report("crossover_best", type=quant.type_name(qtype), best=best)


def stage_model(report, dev, sync, dry: bool) -> None:
    import torch
    from synthetic_gguf import write_synthetic

    from nkat_runtime.loader import load_model

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        shape = dict(n_layer=1, n_embd=256, n_ff=256, n_head=4, n_head_kv=2, n_vocab=300) if dry else {}
        path = write_synthetic(Path(tmp) / "synthetic-8b-q4_k_m.gguf", **shape)
        file_bytes = path.stat().st_size
        written = time.perf_counter() - t0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
        max_streams = 2 if dry else 64
        lm = load_model(path, device=dev, context=1024, max_batch=max_streams, progress=False,
                        kernels="triton", layout_cache=False)
        total = (torch.cuda.memory_allocated() - before) if dev.type == "cuda" else None
        pool = lm.model.kv_bytes_per_token() * lm.model.kv.n_blocks * lm.model.kv.block_size
        # the quantised tensors: their bytes in the file, and what holds them on the device
        quantised = sum(t.nbytes for t in lm.gguf.tensors.values() if t.type_name not in ("F32", "F16", "BF16"))
        on_device = sum(m.blocks.numel() for m in lm.model.modules() if hasattr(m, "blocks"))
        embd = getattr(lm.model.token_embd, "table", None)
        on_device += embd.numel() if embd is not None else 0
        report("model_load", file_bytes=file_bytes, write_s=round(written, 1), load_s=round(lm.load_seconds, 1),
               vram_bytes=total, kv_pool_bytes=pool, quantised_file_bytes=quantised,
               quantised_device_bytes=on_device, ratio=round(on_device / quantised, 4))
        steps = 2 if dry else 128
        tok = torch.tensor([[1]], device=dev)
        with torch.no_grad():
            lm.model(tok, torch.tensor([0], device=dev))
            sync()
            t0 = time.perf_counter()
            for i in range(1, steps + 1):
                lm.model(tok, torch.tensor([i], device=dev), kv_len=i + 1, last_only=True)
            sync()
            report("model_decode", streams=1, steps=steps, tok_s=round(steps / (time.perf_counter() - t0), 1))
            for streams in ((2,) if dry else (8, 32, 64)):
                toks = torch.ones(streams, 1, dtype=torch.long, device=dev)
                pos = torch.zeros(streams, 1, dtype=torch.long, device=dev)
                t0 = time.perf_counter()
                steps = 2 if dry else 32
                for i in range(steps):  # the lengths given: no read back from the device
                    lm.model(toks, pos + i, kv_len=i + 1, lengths=[i + 1] * streams, last_only=True)
                sync()
                report("model_decode", streams=streams, steps=steps,
                       aggregate_tok_s=round(streams * steps / (time.perf_counter() - t0), 1))
            decode_graphs(report, lm.model, dev, sync, dry)
            n = 9 if dry else 512
            ids = torch.ones(1, n, dtype=torch.long, device=dev)
            s = timed(lambda: lm.model(ids, torch.arange(n, device=dev), last_only=True), 1 if dry else 3, sync)
            report("model_prefill", tokens=n, tok_s=round(n / s, 1))
        if dev.type == "cuda":
            report("model_memory", peak_allocated_bytes=torch.cuda.max_memory_allocated())


def decode_graphs(report, model, dev, sync, dry: bool) -> None:
    """Decode steps through CUDA graphs (the padded step eagerly on the CPU), 1 to 64 streams, and
    a graph's logits against the eager model's at the same position."""
    import torch

    from nkat_runtime.model.graphs import DecodeGraphs

    graphs = DecodeGraphs(model, model.kv.n_blocks - 1, capture=dev.type == "cuda")  # the pool's spare block
    steps = 2 if dry else 128
    for streams in ((1, 2) if dry else (1, 8, 32, 64)):
        tables = [model.row_table(r) for r in range(streams)]
        t0 = time.perf_counter()
        for i in range(steps):  # the first pass captures each table width it meets
            graphs([1] * streams, [i] * streams, tables)
        sync()
        captured = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(steps):
            graphs([1] * streams, [i] * streams, tables)
        sync()
        report("model_decode_graphs", streams=streams, steps=steps, captured=graphs.capture,
               graphs=len(graphs.steps), first_pass_s=round(captured, 2),
               aggregate_tok_s=round(streams * steps / (time.perf_counter() - t0), 1))
    tok = torch.tensor([[1]], device=dev)
    eager = model(tok, torch.tensor([[steps]], device=dev), kv_len=steps + 1, lengths=[steps + 1], tables=tables[:1])
    replay = graphs([1], [steps], tables[:1])
    report("model_graph_logits", max_abs_diff=float((eager[:, -1] - replay).abs().max()),
           logit_scale=float(eager.abs().max()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (Triton interpreted)")
    p.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file too")
    p.add_argument("--stages", default="ceilings,correctness,bandwidth,model")
    p.add_argument("--types", default="", help="GGML types for the bandwidth stage (default: all), e.g. Q4_K,Q6_K")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before torch imports triton
    import torch
    import triton

    import nkat_runtime.cuda.ops  # noqa: F401  (registers torch.ops.nkat.gguf_mm)

    report = Report(args.out)
    cuda = torch.cuda.is_available() and not args.dry_run
    dev = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    report("env", device=torch.cuda.get_device_name() if cuda else "cpu (dry run)" if args.dry_run else "cpu: no GPU",
           torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda, dry_run=args.dry_run)
    if not cuda and not args.dry_run:
        report("done", skipped="no GPU (use --dry-run to exercise the stages on the CPU)")
        return 0
    stages = set(args.stages.split(","))
    ok, copy_gbs = True, None
    for name in ("ceilings", "correctness", "bandwidth", "model"):
        if name not in stages:
            continue
        t0 = time.perf_counter()
        try:
            if name == "ceilings":
                copy_gbs = stage_ceilings(report, dev, sync)
            elif name == "correctness":
                ok &= stage_correctness(report, dev, args.dry_run)
            elif name == "bandwidth":
                stage_bandwidth(report, dev, sync, copy_gbs, args.dry_run, set(filter(None, args.types.split(","))))
            else:
                stage_model(report, dev, sync, args.dry_run)
        except Exception as e:  # a stage that fails is reported and the next one runs
            ok = False
            report(name, error=f"{type(e).__name__}: {e}")
        report("stage_end", name=name, seconds=round(time.perf_counter() - t0, 1))
    report("done", ok=ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
