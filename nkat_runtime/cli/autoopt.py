"""``nkat-auto-optimizer``: Optuna TPE search of θ rank and γ on measured perplexity and
decode speed; writes the history, the study summary, a plot and the best .nkat file.

Modes: quick (12 trials, 2 perplexity chunks), full (100 trials, 8 chunks), custom
(--trials N). Trial 0 is the baseline (θ off), so the summary says whether θ beat it; with
--reference, trials 1 and 2 are γ = 1 (residual θ's own) at ranks 8 and 32. The
best θ is then trained end to end against the reference for --distill-steps chunks (default
200 in quick and full mode with --reference) and written only if that lowered the trials'
perplexity. The study lives in --storage (default: SQLite in --output-dir): rerun the same command to resume
after a crash; point several workers at one PostgreSQL/MySQL URL to share a study. A worker
that dies mid-trial is noticed by the others (--heartbeat) and its trial rerun.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..theta.storage import GRACE_FACTOR, HEARTBEAT_S, MAX_RETRIES
from . import common

MODES = {"quick": (12, 2, 16), "full": (100, 8, 32)}  # trials, eval chunks, decode steps
DISTILL_STEPS = 200  # quick and full mode's default with --reference (docs/theta-results.md §2g)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nkat-auto-optimizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", default=None, help="source .gguf (or alias); default the bundled Gemma 3 270M")
    p.add_argument("--mode", choices=["quick", "full", "custom"], default="quick")
    p.add_argument("--trials", type=int, default=None, help="finished trials the study should reach (custom mode)")
    p.add_argument("--output-dir", default="output", help="where the results go (default ./output)")
    p.add_argument("--target-rank", type=int, default=None, help="fix θ's rank and search γ only")
    p.add_argument("--reference", default=None, help="a finer GGUF of the same model: residual θ")
    common.add_calibration_args(p)
    p.add_argument("--distill-steps", type=int, default=None, metavar="N",
                   help=f"with --reference: train the best trial's θ for N steps (one chunk of --ctx tokens each) "
                        f"towards the reference's next-token distributions, and write it if it measures better "
                        f"(default {DISTILL_STEPS} in quick and full mode, 0 in custom mode; 0: off)")
    p.add_argument("--distill-text", default=None, metavar="FILE",
                   help="UTF-8 text the distillation trains on (default: the calibration text); at least N + 2 "
                        "chunks, or chunks repeat")
    p.add_argument("--eval-file", default=None, help="text for perplexity (default: a built-in Wikipedia excerpt)")
    p.add_argument("--eval-chunks", type=int, default=None, help="perplexity chunks of --ctx tokens per trial")
    p.add_argument("--ctx", type=int, default=512, help="perplexity chunk size (default 512)")
    p.add_argument("--decode-steps", type=int, default=None, help="timed decode steps per setting and round")
    p.add_argument("--seed", type=int, default=42, help="TPE sampler seed")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL (default sqlite:///OUTPUT_DIR/optuna.db); a study shared by workers on "
                        "several machines: postgresql://user:password@host/database (driver psycopg 3: "
                        "pip install 'nkat[postgres]') or mysql://… (driver PyMySQL: pip install pymysql); a "
                        "SQLAlchemy URL naming its driver (postgresql+psycopg2://…) is used as given")
    p.add_argument("--study-name", default=None, help="default nkat-<model>-<moyal|residual>")
    p.add_argument("--heartbeat", type=int, default=HEARTBEAT_S, metavar="SECONDS",
                   help=f"a running trial beats every SECONDS (default {HEARTBEAT_S}); one silent for "
                        f"{GRACE_FACTOR}×SECONDS is taken for a dead worker's: failed, and rerun with the same "
                        f"parameters by the next worker (at most {MAX_RETRIES} times)")
    p.add_argument("--device", default=None, help="torch device; default cuda when available")
    p.add_argument("--no-cuda", action="store_true", help="run on the CPU even when CUDA is available")
    p.add_argument("--threads", "-t", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verbose", "-v", action="store_true")
    return p


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup_logging_and_threads(args)
    from ..bundled import resolve_model
    from ..loader import pick_device
    from ..theta.autoopt import SearchConfig, ThetaSearch
    from ..theta.convert import read_distill_text, sha256_file
    from ..theta.report import best_theta, finished_trials, mask_url, plot, write_json
    from ..theta.storage import storage_errors
    from ..theta.study import open_study, run_trials, stop_heartbeats

    trials, chunks, steps = MODES.get(args.mode, (args.trials, 4, 16))
    if args.mode == "custom" and not args.trials:
        raise ValueError("--mode custom needs --trials N")
    trials = args.trials or trials
    if (trials < 1 or (args.target_rank is not None and args.target_rank < 1) or args.heartbeat < 1
            or args.calibration_chunks < 1):
        raise ValueError("--trials, --target-rank, --heartbeat and --calibration-chunks must be >= 1")
    distill_steps = args.distill_steps
    if distill_steps is None:
        distill_steps = DISTILL_STEPS if args.mode != "custom" and args.reference else 0
    if distill_steps < 0 or (distill_steps and not args.reference):
        raise ValueError("--distill-steps needs --reference (residual θ) and N >= 0")
    distill_text = read_distill_text(args.distill_text, args.calibration) if distill_steps else None
    model = Path(resolve_model(args.model))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = SearchConfig(
        model=model, reference=Path(args.reference) if args.reference else None,
        calibration=Path(args.calibration) if args.calibration else None,
        eval_file=Path(args.eval_file) if args.eval_file else None, eval_chunks=args.eval_chunks or chunks,
        ctx=args.ctx, decode_steps=args.decode_steps or steps, target_rank=args.target_rank,
        activation=args.activation_stats, calibration_chunks=args.calibration_chunks,
        device=str(pick_device(args.device, args.no_cuda)), progress=not args.quiet)
    if cfg.reference is not None and not cfg.reference.is_file():
        raise ValueError(f"reference not found: {cfg.reference}")
    storage = args.storage or f"sqlite:///{(out / 'optuna.db').resolve()}"
    name = args.study_name or f"nkat-{model.stem}-{cfg.theta_mode}"
    with storage_errors(storage):  # the database going away: one line, not a traceback
        study = open_study(storage, name, args.seed, args.heartbeat)
        settings = {"model_sha256": sha256_file(model), "theta_mode": cfg.theta_mode, "ranks": list(cfg.ranks),
                    "eval_chunks": cfg.eval_chunks, "ctx": cfg.ctx}
        if cfg.theta_mode == "residual":  # θ's calibration too
            settings.update(activation=cfg.activation, calibration_chunks=cfg.calibration_chunks)
        stored = study.user_attrs.get("settings")
        if stored is not None and cfg.theta_mode == "residual":
            stored = {"activation": "mean-abs", "calibration_chunks": 4, **stored}  # a study from before these keys
        if stored not in (None, settings):
            raise ValueError(f"study {name!r} in {mask_url(storage)} was made for other settings "
                             f"({study.user_attrs['settings']}); pick another --study-name")
        study.set_user_attr("settings", settings)

        search = ThetaSearch(cfg)
        if distill_text is not None:
            search.check_distill_text(distill_text)
        interrupted = False
        try:
            run_trials(study, search, trials, progress=cfg.progress)
        except KeyboardInterrupt:
            interrupted = True
            stop_heartbeats()
            print("nkat-auto-optimizer: interrupted; writing the results of the finished trials", file=sys.stderr)

        rows = finished_trials(study)
    write_json(out / "optimization_history.json", {"model": str(model), "theta_mode": cfg.theta_mode,
                                                    "study_name": name, "trials": rows})
    base = next((r for r in rows if r["baseline"]), None)
    best = max(rows, key=lambda r: r["tpe"]) if rows else None
    theta = best_theta(rows)
    summary = {
        "study_name": name, "storage": mask_url(storage), "sampler": "TPESampler", "direction": "maximize",
        "n_trials": len(rows), "target_trials": trials, "interrupted": interrupted,
        "best_params": best["params"] if best else None, "best_value": best["tpe"] if best else None,
        "best_trial": best["number"] if best else None,
        "baseline": base, "baseline_wins": bool(best and base and best["number"] == base["number"]),
        "best_theta_trial": theta,
    }
    if theta is not None:
        rank, gamma = theta["params"]["rank"], theta["params"]["gamma"]
        stem = f"optimal_rank{rank}_gamma{gamma:.3f}"
        thetas, distilled = None, None
        if distill_steps and not interrupted:
            thetas, distilled, interrupted = _distil(search, theta, distill_text, distill_steps)
        search.write(out / f"{stem}.nkat", rank, gamma, thetas, distill_steps if thetas else 0)
        better = base is None or theta["tpe"] > base["tpe"]
        write_json(out / f"{stem}.json", {
            "file": f"{stem}.nkat", "theta_rank": rank, "theta_gamma": gamma, "theta_mode": cfg.theta_mode,
            "measured": theta, "baseline": base, "better_than_baseline": better,
            "source": str(model), "source_sha256": settings["model_sha256"],
            "reference": str(cfg.reference) if cfg.reference else None,
            "reference_sha256": sha256_file(cfg.reference) if cfg.reference else None,
            "eval_file": str(cfg.eval_file) if cfg.eval_file else "built-in", "eval_chunks": cfg.eval_chunks,
            "distill": distilled,
        })
        summary["distill"] = distilled
        summary["best_theta_file"] = f"{stem}.nkat"
    write_json(out / "optuna_study.json", summary)
    if rows:
        plot(rows, out / "optimization_results.png", f"{model.name}: θ {cfg.theta_mode}, {len(rows)} trials")
    _print_summary(base, theta, out)
    return 130 if interrupted else 0


def _distil(search, theta: dict, text: str, steps: int) -> tuple[dict | None, dict | None, bool]:
    """The best trial's θ distilled: (factors to write or None, what was measured, interrupted)."""
    rank, gamma = theta["params"]["rank"], theta["params"]["gamma"]
    try:
        thetas, report, ppl = search.distilled(rank, gamma, text, steps)
    except KeyboardInterrupt:
        print("nkat-auto-optimizer: distillation interrupted; writing the best trial's θ as it was", file=sys.stderr)
        return None, None, True
    used = ppl < theta["perplexity"]
    info = {"steps": steps, "train_chunks": report.train_chunks, "held_out_chunks": report.eval_chunks,
            "held_out_kl_before": report.kl_before, "held_out_kl_after": report.kl_after,
            "perplexity": ppl, "perplexity_before": theta["perplexity"], "written": used}
    print(f"distilled θ ({steps} steps over {report.train_chunks} chunks, held-out KL {report.kl_before:.5f} -> "
          f"{report.kl_after:.5f}): perplexity {ppl:.4f} against {theta['perplexity']:.4f} before — "
          + ("writing the distilled θ" if used else "NOT better: writing the best trial's θ as it was"))
    return (thetas if used else None), info, False


def _print_summary(base: dict | None, theta: dict | None, out: Path) -> None:
    def line(r: dict) -> str:
        return (f"TPE {r['tpe']:.5f} (perplexity {r['perplexity']:.4f}, "
                f"{r['tokens_per_second']:.2f} tok/s, overhead {r['overhead_percentage']:+.1f} %)")

    if base:
        print(f"baseline (θ off): {line(base)}")
    if theta:
        verdict = "beats" if base is None or theta["tpe"] > base["tpe"] else "is WORSE than"
        print(f"best θ: rank {theta['params']['rank']}, γ {theta['params']['gamma']:.3f}: {line(theta)} — "
              f"{verdict} the baseline")
    print(f"results in {out}/")


def main(argv: Sequence[str] | None = None) -> int:
    return common.run(_main, argv, prog="nkat-auto-optimizer")


if __name__ == "__main__":
    sys.exit(main())
