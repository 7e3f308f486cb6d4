"""What θ costs a fast-path decode step: θ off against θ on, interleaved in one process.

    python benchmarks/theta_overhead.py --model /tmp/fth/g_r8.nkat --threads 2 --batch 1 4

Loads a .nkat once on the fast path (packed weights, not the reference math) and times decode
steps in rounds that alternate the modes (the order flips every round): ``off`` (γ = 0: the θ
term is skipped, exactly the base model), ``on`` (the file's γ, θ as the model runs it) and, with
``--compare``, ``unfused`` (γ on, the shared-input fusion off: each target its own two products)
and ``legacy`` (each target as before the fusion: two row-local products with the factors in the
file's layout, re-created by this script). A round's figure is the median of its steps; the table
gives the median over rounds, the spread (min–max of the round medians) and the overhead as the
median of the per-round ratios against ``off`` (paired, so a slow stretch of a shared machine
hits both sides), with their interquartile range; for wall-clock time and for the process's CPU
time (``decode_round``). Prints the CPU, the load average before and after, a table and a JSON
line (``--json FILE`` writes it too); ``--profile N`` adds torch.profiler's table of N steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from machine import cpu_name  # noqa: E402  (benchmarks/, on the path of a script run from it)

if TYPE_CHECKING:
    from torch import nn

    from nkat_runtime.loader import LoadedModel

Fusion = Callable[["nn.Module", bool], int] | None


def fusion_switch() -> Fusion:
    """``set_theta_fusion`` where this checkout has it (None: θ is never fused here)."""
    try:
        from nkat_runtime.model.theta_fused import set_theta_fusion
    except ImportError:
        return None
    return set_theta_fusion


def legacy_theta(model: nn.Module, on: bool) -> None:
    """Each θ target as two row-local products of its own, factors [k, in] and [out, k] (the path before
    the fusion, kept here only to time it against the new one in the same process)."""
    import torch.nn.functional as F

    from nkat_runtime.model.linear import is_decode, row_local_matmul
    from nkat_runtime.model.theta_linear import theta_layers

    def forward(self, x):
        y = self.base(x)
        if self.folded or self.gamma == 0.0:
            return y
        if self.row_local and is_decode(x):
            z = row_local_matmul(row_local_matmul(x.reshape(-1, x.shape[-1]), self.theta_right), self.legacy_left)
            z = z.view(*x.shape[:-1], -1)
        else:
            z = F.linear(F.linear(x, self.theta_right), self.legacy_left)
        return y + (0.5 * self.gamma) * z.to(y.dtype)

    for layer in theta_layers(model):
        if on:
            layer.legacy_left = layer.theta_left.contiguous()
            layer.forward = forward.__get__(layer)
        else:
            layer.__dict__.pop("forward", None)


def set_mode(model: nn.Module, mode: str, gamma: float, fusion: Fusion) -> None:
    from nkat_runtime.model.theta_linear import set_theta_gamma

    set_theta_gamma(model, 0.0 if mode == "off" else gamma)
    if fusion is not None:
        fusion(model, mode == "on")
        legacy_theta(model, mode == "legacy")


def decode_round(lm: LoadedModel, batch: int, start: int, steps: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of ``steps`` decode steps of ``batch`` rows from position ``start``.

    CPU time (the process's, all threads) leaves out the time the process waits for a core, which
    dominates wall time on a shared machine; with one thread it is the work done (with more it
    also counts OpenMP threads spinning at barriers)."""
    import torch

    model = lm.model
    rows = list(range(batch))
    tok = torch.full((batch, 1), 3, dtype=torch.long)
    wall, cpu = [], []
    for i in range(steps):
        pos = start + i
        t0, c0 = time.perf_counter(), time.process_time()
        if batch == 1:
            logits = model(tok, torch.tensor([pos]), kv_len=pos + 1)
        else:
            logits = model(tok, torch.full((batch, 1), pos), rows=rows, lengths=[pos + 1] * batch)
        tok = logits[:, -1].argmax(-1, keepdim=True)  # the host sync a decode loop pays
        int(tok[0, 0])
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def measure(lm: LoadedModel, modes: list[str], gamma: float, batch: int, fusion: Fusion,
            args: argparse.Namespace) -> dict[str, list]:
    import torch

    model = lm.model
    prompt = torch.arange(3, 3 + args.prompt)
    for b in range(batch):  # every row's cache holds the same prompt
        model(prompt[None], torch.arange(args.prompt), rows=[b])
    for mode in modes:  # warm-up: compiled kernels, allocator
        set_mode(model, mode, gamma, fusion)
        decode_round(lm, batch, args.prompt, args.warmup)
    out: dict[str, list] = {m: [] for m in modes}
    for r in range(args.rounds):
        order = modes if r % 2 == 0 else modes[::-1]
        for mode in order:
            set_mode(model, mode, gamma, fusion)
            out[mode].append(decode_round(lm, batch, args.prompt, args.steps))
    set_mode(model, "on", gamma, fusion)
    return out


def summarise(times: dict[str, list]) -> dict[str, dict[str, float]]:
    res = {}
    for mode, rounds in times.items():
        r: dict[str, float] = {}
        for k, kind in enumerate(("wall", "cpu")):
            ts = [t[k] for t in rounds]
            ratios = sorted(t[k] / o[k] for t, o in zip(rounds, times["off"]))
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            r |= {f"{kind}_median_ms": 1000 * statistics.median(ts), f"{kind}_min_ms": 1000 * min(ts),
                  f"{kind}_max_ms": 1000 * max(ts), f"{kind}_overhead_pct": 100 * (statistics.median(ratios) - 1),
                  f"{kind}_overhead_q1_pct": 100 * (q[0] - 1), f"{kind}_overhead_q3_pct": 100 * (q[2] - 1)}
        r["tok_s"] = 1000 / r["wall_median_ms"]
        res[mode] = r
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="a .nkat file (θ on its block weights)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--steps", type=int, default=4, help="decode steps per mode and round")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=32, help="tokens cached before the timed steps")
    ap.add_argument("--compare", action="store_true", help="also time θ unfused and as before the fusion")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="afterwards, profile STEPS θ-on steps at batch 1 (torch.profiler table)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    from nkat_runtime.loader import load_model
    from nkat_runtime.model.theta_linear import theta_layers

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    ctx = args.prompt + args.warmup + args.steps + 1
    lm = load_model(args.model, device="cpu", context=ctx, max_batch=max(args.batch), progress=False,
                    compile=args.compile)
    layers = theta_layers(lm.model)
    if not layers:
        raise SystemExit(f"{args.model} has no θ layers")
    gamma = layers[0].gamma or 1.0
    ranks = sorted({t.rank for t in layers})
    fusion = fusion_switch()
    if args.compare and fusion is None:
        raise SystemExit("--compare: this checkout has no θ fusion to turn off")
    modes = ["off", "on"] + (["unfused", "legacy"] if args.compare else [])
    results = {}
    for batch in args.batch:
        results[batch] = summarise(measure(lm, modes, gamma, batch, fusion, args))
    load_after = os.getloadavg()

    print(f"{args.model.name}: {len(layers)} θ layers, ranks {ranks}, γ {gamma:g}; {cpu_name()}, "
          f"{args.threads} threads, torch {torch.__version__}, compile {args.compile}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
          f"{args.rounds} rounds × {args.steps} steps")
    print(f"{'batch':>5} {'mode':>8} {'wall ms':>8} {'min':>7} {'max':>7} {'tok/s':>7} {'overhead (IQR)':>22}"
          f" {'CPU ms':>8} {'overhead (IQR)':>22}")
    for batch, res in results.items():
        for mode, r in res.items():
            cols = [f"{r[k + '_median_ms']:>8.2f}" + (f" {r['wall_min_ms']:>7.2f} {r['wall_max_ms']:>7.2f} "
                    f"{r['tok_s'] * batch:>7.1f}" if k == "wall" else "") +
                    f" {r[k + '_overhead_pct']:>6.2f}% ({r[k + '_overhead_q1_pct']:.2f}..{r[k + '_overhead_q3_pct']:.2f})"
                    for k in ("wall", "cpu")]
            print(f"{batch:>5} {mode:>8} " + " ".join(cols))
    record = {"model": str(args.model), "cpu": cpu_name(), "threads": args.threads, "theta_layers": len(layers),
              "ranks": ranks, "gamma": gamma, "rounds": args.rounds, "steps": args.steps, "compile": args.compile,
              "loadavg_before": load_before[0], "loadavg_after": load_after[0],
              "results": {str(b): r for b, r in results.items()}}
    line = json.dumps(record)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")
    if args.profile:
        profile(lm, gamma, args)


def profile(lm: LoadedModel, gamma: float, args: argparse.Namespace) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    set_mode(lm.model, "on", gamma, fusion_switch())
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        decode_round(lm, 1, args.prompt, args.profile)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
