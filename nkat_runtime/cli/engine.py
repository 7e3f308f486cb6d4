"""``nkat-inference-engine``: benchmark a .gguf/.nkat model, or compare θ off and on.

Every figure is measured in this run: tokens/s from timed decode steps (median), prefill
tokens/s from a timed prefill, memory from the OS, perplexity on a real text. Nothing is
estimated; ``estimated_perplexity_improvement`` keeps the guide's key name but holds the
measured perplexity change in percent (negative = better).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from . import common


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nkat-inference-engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--benchmark", action="store_true", help="time prefill and decode (default action)")
    mode.add_argument("--compare", action="store_true", help="θ off vs θ on, interleaved, with measured perplexity")
    p.add_argument("--seq-len", type=int, default=512, help="prompt tokens to prefill (default 512)")
    p.add_argument("--iterations", type=int, default=100, help="decode steps (default 100)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per setting (default 3)")
    p.add_argument("--theta-gamma", type=float, default=None, help="override the file's γ")
    p.add_argument("--no-theta", action="store_true", help="run the plain source model")
    p.add_argument("--eval-file", default=None, help="text for perplexity (default: a built-in Wikipedia excerpt)")
    p.add_argument("--eval-chunks", type=int, default=4, help="perplexity chunks of 512 tokens (default 4)")
    p.add_argument("--json", dest="json_file", default=None, help="also write the result JSON here")
    return p


def _timed_rounds(lm, ids, iterations: int, rounds: int, gammas: list[float | None]) -> dict:
    """Interleave settings over rounds; per setting: prefill seconds and decode step times."""
    from ..eval.bench import time_decode, time_prefill
    from ..model.theta_linear import set_theta_gamma

    rounds = max(1, rounds)
    per_round = max(1, iterations // rounds)
    out: dict = {g: {"prefill": [], "steps": []} for g in gammas}
    time_prefill(lm, ids[: min(len(ids), 16)])  # warm-up
    for _ in range(rounds):
        for g in gammas:
            if g is not None:
                set_theta_gamma(lm.model, g)
            seconds, tok = time_prefill(lm, ids)
            out[g]["prefill"].append(seconds)
            out[g]["steps"].extend(time_decode(lm, len(ids), tok, per_round).step_seconds)
    return out


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup(args)
    import torch

    from ..eval.bench import DecodeTiming, peak_memory_mb, prompt_tokens, tpe_score
    from ..eval.perplexity import perplexity
    from ..model.theta_linear import set_theta_gamma, theta_layers
    from ..theta.convert import BUILTIN_EVAL

    if args.seq_len < 1 or args.iterations < 1:
        raise ValueError("--seq-len and --iterations must be >= 1")
    eval_path = Path(args.eval_file) if args.eval_file else BUILTIN_EVAL
    if not eval_path.is_file():
        raise ValueError(f"eval file not found: {eval_path}")
    eval_text = eval_path.read_text(encoding="utf-8")
    need = max(args.seq_len + args.iterations + 1, 512 if args.compare else 0)
    args.ctx = max(args.ctx or 0, need)
    lm = common.load_from_args(args, theta=not args.no_theta, theta_gamma=args.theta_gamma)
    has_theta = bool(theta_layers(lm.model))
    gamma = theta_layers(lm.model)[0].gamma if has_theta else 0.0
    ids = prompt_tokens(lm, eval_text, args.seq_len)
    base = {"model": str(lm.path), "device": str(lm.device), "seq_len": args.seq_len,
            "math": "reference" if args.reference_math else "fast", "compiled": bool(args.compile),
            "threads": torch.get_num_threads(),
            "iterations": args.iterations, "load_seconds": round(lm.load_seconds, 3)}

    if args.compare:
        if not has_theta:
            raise ValueError(f"{lm.path.name} carries no θ: --compare needs a .nkat file (nkat-gguf-converter)")
        runs = _timed_rounds(lm, ids, args.iterations, args.rounds, [0.0, gamma])
        t_base, t_nkat = DecodeTiming(runs[0.0]["steps"]), DecodeTiming(runs[gamma]["steps"])
        overhead = (t_base.tokens_per_second - t_nkat.tokens_per_second) / t_base.tokens_per_second
        set_theta_gamma(lm.model, 0.0)
        ppl_base = perplexity(lm, eval_text, 512, args.eval_chunks).ppl
        set_theta_gamma(lm.model, gamma)
        ppl_nkat = perplexity(lm, eval_text, 512, args.eval_chunks).ppl
        change = (ppl_nkat / ppl_base - 1.0) * 100.0
        result = {
            "nkat_tokens_per_second": round(t_nkat.tokens_per_second, 3),
            "baseline_tokens_per_second": round(t_base.tokens_per_second, 3),
            "overhead_percentage": round(overhead * 100.0, 2),
            "estimated_perplexity_improvement": round(change, 3),
            "perplexity_baseline": round(ppl_base, 4),
            "perplexity_nkat": round(ppl_nkat, 4),
            "perplexity_change_percentage": round(change, 3),
            "tpe_baseline": round(tpe_score(ppl_base, 0.0), 6),
            "tpe_nkat": round(tpe_score(ppl_nkat, overhead), 6),
            "theta_gamma": gamma, "eval_file": str(eval_path), "eval_chunks": args.eval_chunks,
            "peak_memory_mb": round(peak_memory_mb(lm.device), 1), **base,
        }
        verdict = "better" if change < 0 else "WORSE"
        print(f"θ (γ={gamma:g}) makes perplexity {verdict}: {ppl_base:.4f} → {ppl_nkat:.4f} ({change:+.2f} %), "
              f"decode {t_base.tokens_per_second:.2f} → {t_nkat.tokens_per_second:.2f} tok/s "
              f"({overhead * 100:+.2f} % overhead)", file=sys.stderr)
    else:
        gammas = [0.0, gamma] if has_theta and gamma != 0.0 else [None]
        runs = _timed_rounds(lm, ids, args.iterations, args.rounds, gammas)
        main_g = gammas[-1]
        timing = DecodeTiming(runs[main_g]["steps"])
        prefill = sorted(runs[main_g]["prefill"])[len(runs[main_g]["prefill"]) // 2]
        overhead = 0.0
        if len(gammas) == 2:
            t_base = DecodeTiming(runs[0.0]["steps"])
            overhead = (t_base.tokens_per_second - timing.tokens_per_second) / t_base.tokens_per_second
        result = {
            "tokens_per_second": round(timing.tokens_per_second, 3),
            "avg_latency_ms": round(timing.mean_ms, 3),
            "median_latency_ms": round(timing.median_ms, 3),
            "device": str(lm.device),
            "theta_enabled": has_theta and gamma != 0.0,
            "overhead_percentage": round(overhead * 100.0, 2),
            "prefill_tokens_per_second": round(len(ids) / prefill, 3),
            "peak_memory_mb": round(peak_memory_mb(lm.device), 1),
            **base,
        }
    print(json.dumps(result))
    if args.json_file:
        common.write_json(args.json_file, result)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run(_main, argv, prog="nkat-inference-engine")


if __name__ == "__main__":
    sys.exit(main())
