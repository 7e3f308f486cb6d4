"""``nkat-gguf-converter``: add θ tensors to a GGUF model and write a .nkat file.

After writing, it measures perplexity with and without θ on a short built-in text and
prints the change; a change for the worse is printed as a warning with what to try.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from . import common

CHECK_CHUNKS = 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nkat-gguf-converter", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", "-i", required=True, help="source .gguf (or a bundled alias, e.g. gemma3-270m)")
    p.add_argument("--output", "-o", required=True, help="target .nkat (never the input)")
    p.add_argument("--theta-rank", type=int, default=4, help="θ rank r (default 4)")
    p.add_argument("--theta-gamma", type=float, default=0.97, help="default γ stored in the file (default 0.97)")
    p.add_argument("--mode", choices=("moyal", "residual"), default=None,
                   help="moyal: the guide's recipe (θ from W itself); residual: quantisation-error "
                        "compensation against --reference (default: residual when --reference is given)")
    p.add_argument("--reference", default=None, help="a finer GGUF of the same model (residual mode)")
    common.add_calibration_args(p)
    p.add_argument("--no-calibration", action="store_true", help="plain SVD of the residual (no activation scaling)")
    p.add_argument("--distill-steps", type=int, default=0, metavar="N",
                   help="then train every θ factor for N steps (one chunk of 512 tokens each) to bring the "
                        "model's next-token distributions to --reference's (KL distillation; default 0: off)")
    p.add_argument("--distill-text", default=None, metavar="FILE",
                   help="UTF-8 text the distillation trains on (default: the calibration text); at least "
                        "N + 2 chunks of 512 tokens, or chunks repeat")
    p.add_argument("--selective-layers", nargs="+", default=None, metavar="NAME",
                   help="θ only on these weights: GGUF, Meta or Hugging Face names, or globs")
    p.add_argument("--optimize-rank", action="store_true",
                   help="per weight, the smallest rank whose θ captures --energy of the target's energy")
    p.add_argument("--energy", type=float, default=0.5, help="energy share for --optimize-rank (default 0.5)")
    p.add_argument("--theta-budget", type=float, default=None, metavar="MIB",
                   help="residual θ: choose each weight's rank (up to --max-rank) so θ adds at most MIB MiB, "
                        "greedily where a rank removes the most residual energy per byte (theta/ranks.py)")
    p.add_argument("--max-rank", type=int, default=32, help="largest rank --optimize-rank may pick (default 32)")
    p.add_argument("--target-size", type=int, default=1024,
                   help="largest side a full SVD may take; beyond it a randomised SVD (default 1024)")
    p.add_argument("--dry-run", action="store_true", help="print targets, ranks and bytes; write nothing")
    p.add_argument("--no-check", action="store_true", help="skip the perplexity check after writing")
    p.add_argument("--check-chunks", type=int, default=CHECK_CHUNKS, help="chunks of 512 tokens for the check")
    p.add_argument("--json", dest="json_file", default=None, help="write the summary as JSON here")
    p.add_argument("--threads", "-t", type=int, default=None)
    p.add_argument("--verbose", "-v", action="store_true")
    return p


def measure_change(path: Path, chunks: int) -> dict:
    """Perplexity on the built-in eval text with θ at the file's γ and with θ off."""
    from ..eval.perplexity import perplexity
    from ..loader import load_model
    from ..model.theta_linear import set_theta_gamma
    from ..theta.convert import BUILTIN_EVAL

    lm = load_model(path, device="cpu", context=512, progress=False)
    gamma = float(lm.gguf.get("nkat.theta.gamma", 1.0))
    text = BUILTIN_EVAL.read_text(encoding="utf-8")
    with_theta = perplexity(lm, text, 512, chunks).ppl
    set_theta_gamma(lm.model, 0.0)
    without = perplexity(lm, text, 512, chunks).ppl
    return {"perplexity_without_theta": without, "perplexity_with_theta": with_theta, "gamma": gamma,
            "change_percentage": (with_theta / without - 1.0) * 100.0, "chunks": chunks}


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.config = None
    common.setup(args)
    from ..bundled import ALIASES
    from ..theta.convert import ConvertOptions, convert

    alias = lambda name: ALIASES[name]() if name in ALIASES else Path(name)  # noqa: E731
    opts = ConvertOptions(
        input=alias(args.input), output=Path(args.output), rank=args.theta_rank, gamma=args.theta_gamma,
        mode=args.mode, reference=alias(args.reference) if args.reference else None,
        calibration=Path(args.calibration) if args.calibration else None, use_calibration=not args.no_calibration,
        selective_layers=args.selective_layers, target_size=args.target_size, optimize_rank=args.optimize_rank,
        energy_target=args.energy, max_rank=args.max_rank, dry_run=args.dry_run, activation=args.activation_stats,
        calibration_chunks=args.calibration_chunks, distill_steps=args.distill_steps,
        distill_text=Path(args.distill_text) if args.distill_text else None,
        budget_bytes=int(args.theta_budget * 2**20) if args.theta_budget is not None else None,
    )
    res = convert(opts)
    aware = " (activation-aware)" if res.activation_aware else ""
    print(f"mode {res.mode}{aware}, {len(res.targets)} target weights, "
          f"{res.bytes_added / 1e6:.2f} MB of θ, {res.seconds:.1f} s")
    for t in res.targets:
        print(f"  {t.name:32s} {str(t.shape):14s} k={t.rank:<3d} energy {t.energy_share * 100:5.1f} %  "
              f"{t.bytes_added / 1e3:8.1f} kB")
    summary = {"output": str(res.output) if res.output else None, "mode": res.mode,
               "activation_aware": res.activation_aware, "targets": len(res.targets),
               "bytes_added": res.bytes_added, "seconds": res.seconds, "dry_run": args.dry_run}
    if res.distill is not None:
        d = res.distill
        summary["distill"] = {"steps": d.steps, "train_chunks": d.train_chunks,
                              "eval_chunks": d.eval_chunks, "held_out_kl_before": d.kl_before,
                              "held_out_kl_after": d.kl_after}
        print(f"distillation: {d.steps} steps over {d.train_chunks} chunks; KL to the reference on the text's "
              f"last {d.eval_chunks} chunks (held out) {d.kl_before:.5f} -> {d.kl_after:.5f}")
    if args.dry_run:
        print("dry run: nothing written")
    else:
        print(f"wrote {res.output}")
        if not args.no_check:
            check = measure_change(res.output, args.check_chunks)
            summary["check"] = check
            print(f"check on the built-in text ({check['chunks']} chunks of 512): perplexity "
                  f"{check['perplexity_without_theta']:.4f} without θ, {check['perplexity_with_theta']:.4f} "
                  f"with θ (γ={check['gamma']:g}): {check['change_percentage']:+.2f} %")
            if check["change_percentage"] > 0:
                advice = ("a smaller γ (--theta-gamma 0.1), or residual mode: --reference a finer GGUF "
                          "of the same model" if res.mode == "moyal" else
                          "another γ (nkat-inference-engine --theta-gamma), a higher rank, or --calibration")
                print(f"WARNING: θ makes this model WORSE (perplexity {check['change_percentage']:+.2f} %). "
                      f"Try {advice}.", file=sys.stderr)
    if args.json_file:
        common.write_json(args.json_file, summary)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run(_main, argv, prog="nkat-gguf-converter")


if __name__ == "__main__":
    sys.exit(main())
