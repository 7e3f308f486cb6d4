"""How much of each layer's quantisation error a rank-r θ can remove: the ceiling of residual θ.

    python benchmarks/theta_ceiling.py --reference ref.gguf --coarse q4_0.gguf --layers 0,14,27

For every block weight of the chosen layers, the inputs the coarse model gives it are recorded
on the converter's calibration text (in sample) and on other text (held out). With
ΔW = W_ref − W_coarse, the table gives ‖(ΔW − θ/2)·X‖ / ‖ΔW·X‖ — the share of the layer's output
error (as a norm) that is left — for θ made as the converter makes it (``mean-abs`` scaling, at
each rank) and for θ whitened by the in-sample second-moment matrix (``second-moment``, QERA):
the latter is the best any rank-r correction can do on the calibration inputs, so its in-sample
column is a ceiling. The factors are used unquantised (the file's int8 rows change the figures
by < 0.001, measured on Qwen2.5-Coder-0.5B).

Why θ helps Gemma 3 270M and barely moves Qwen2.5-Coder-1.5B is read off this table:
docs/theta-results.md §2e.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nkat_runtime.errors import NKATError  # noqa: E402
from nkat_runtime.gguf.reader import open_gguf  # noqa: E402
from nkat_runtime.loader import load_model  # noqa: E402
from nkat_runtime.theta.calibrate import calibration_batches, whitening  # noqa: E402
from nkat_runtime.theta.convert import BUILTIN_CALIBRATION, check_reference, dequantized  # noqa: E402
from nkat_runtime.theta.svd import activation_scale, residual_factors, residual_matrix, truncated_svd  # noqa: E402

KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def record_inputs(lm, targets: list[str], text: str, chunks: int, ctx: int) -> dict[str, torch.Tensor]:
    """The rows each target's linear reads over ``chunks`` chunks of ``text`` ([tokens, d_in])."""
    modules = lm.model.linear_modules()
    rows: dict[str, list[torch.Tensor]] = {t: [] for t in targets}
    hooks = [modules[t].register_forward_hook(
        lambda _m, inp, _o, t=t: rows[t].append(inp[0].detach().float().reshape(-1, inp[0].shape[-1])))
        for t in targets]
    try:
        with torch.inference_mode():
            for chunk in calibration_batches(lm.tokenizer, text, chunks, ctx):
                lm.model(torch.tensor([chunk]), torch.arange(len(chunk)), last_only=True)
    finally:
        for h in hooks:
            h.remove()
    return {t: torch.cat(r) for t, r in rows.items()}


def left_share(dw: torch.Tensor, theta: torch.Tensor, x: torch.Tensor) -> float:
    """‖(ΔW − θ/2)·X‖ / ‖ΔW·X‖ (θ/2: γ = 1 in y = W·x + 0.5·γ·θ·x)."""
    return float((x @ (dw - 0.5 * theta).T).norm() / (x @ dw.T).norm())


def ceiling_rows(ref_path: Path, coarse_path: Path, layers: list[int], ranks: list[int], heldout: str,
                 chunks: int, ctx: int, calibration_chunks: int | None = None, damp: float = 0.01) -> list[dict]:
    ref, coarse = open_gguf(ref_path), open_gguf(coarse_path)
    check_reference(coarse, ref)  # the same model: every tensor's shape agrees
    lm = load_model(coarse_path, device="cpu", context=ctx, progress=False, theta=False)
    targets = [f"blk.{i}.{k}.weight" for i in layers for k in KINDS]
    targets = [t for t in targets if t in lm.model.linear_modules()]
    x_in = record_inputs(lm, targets, BUILTIN_CALIBRATION.read_text(encoding="utf-8"), calibration_chunks or chunks,
                         ctx)
    x_out = record_inputs(lm, targets, heldout, chunks, ctx)
    out = []
    for t in targets:
        w_r, w_c = dequantized(ref, t), dequantized(coarse, t)
        dw = (w_r - w_c).float()
        if not bool(dw.any()):
            print(f"{t:28s} the same in both files: skipped", flush=True)
            continue
        scales = {"mean-abs": activation_scale(x_in[t].abs().mean(0)),
                  "second-moment": whitening(x_in[t].T @ x_in[t] / x_in[t].shape[0], damp)}
        row = {"target": t, "ref_type": ref.tensor(t).qtype, "coarse_type": coarse.tensor(t).qtype}
        for mode, scale in scales.items():
            svd = truncated_svd(residual_matrix(w_c, w_r, scale), max(ranks))
            for r in ranks:
                theta = torch.matmul(*residual_factors(svd, r, scale))
                row[f"{mode}/{r}/in"] = left_share(dw, theta, x_in[t])
                row[f"{mode}/{r}/out"] = left_share(dw, theta, x_out[t])
        out.append(row)
        print(f"{t:28s} " + " ".join(f"{v:.3f}" for k, v in row.items() if "/" in k), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", required=True, type=Path)
    p.add_argument("--coarse", required=True, type=Path)
    p.add_argument("--layers", default="0", help="comma-separated block numbers")
    p.add_argument("--ranks", default="8,32")
    p.add_argument("--text", default=str(REPO.parent / "shared" / "data" / "wiki_vital_en.txt"),
                   help="held-out text")
    p.add_argument("--chunks", type=int, default=4, help="chunks of each text (the converter calibrates on 4)")
    p.add_argument("--calibration-chunks", type=int, default=None,
                   help="chunks of the calibration text, when not --chunks (the held-out text keeps --chunks)")
    p.add_argument("--damp", type=float, default=0.01,
                   help="second-moment damping, a share of R's mean eigenvalue (the converter's: 0.01)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    for f in (args.reference, args.coarse, Path(args.text)):
        if not f.is_file():
            p.error(f"not found: {f}")
    ranks = [int(r) for r in args.ranks.split(",")]
    print("share of the output error left (1 = θ removes nothing); columns: "
          + " ".join(f"{m}/{r}/{s}" for m in ("mean-abs", "second-moment") for r in ranks for s in ("in", "out")))
    try:
        rows = ceiling_rows(args.reference, args.coarse, [int(i) for i in args.layers.split(",")], ranks,
                            Path(args.text).read_text(encoding="utf-8"), args.chunks, args.ctx,
                            args.calibration_chunks, args.damp)
    except NKATError as e:
        p.error(str(e))
    if not rows:
        print("no block weight differs between the two files")
        return 0
    for key in rows[0]:
        if "/" in key:
            mid = statistics.median(r[key] for r in rows)
            print(f"median {key:24s} {mid:.3f}  (energy removed {1 - mid ** 2:.0%})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
