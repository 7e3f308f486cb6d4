"""Plot docs/theta-results.json (written by theta_experiment.py) to docs/theta-results.png."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", default=str(REPO / "docs" / "theta-results.json"))
    p.add_argument("--out", default=str(REPO / "docs" / "theta-results.png"))
    p.add_argument("--table", action="store_true", help="print the results as Markdown tables instead")
    args = p.parse_args()
    if args.table:
        print(markdown_tables(args.results))
        return 0
    rows = {r["key"]: r for r in json.loads(Path(args.results).read_text())}
    moyal = [r for r in rows.values() if r["mode"] == "moyal" and r["rank"] > 0]
    # plot the grid at the chunk count that covers most of it (the longest on a tie)
    counts = {c: sum(r["chunks"] == c for r in moyal) for c in {r["chunks"] for r in moyal}}
    chunks = max(counts, key=lambda c: (counts[c], c))
    base_row = next(r for r in rows.values() if r["mode"] == "moyal" and r["rank"] == 0 and r["chunks"] == chunks)
    base = base_row["ppl"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))

    for rank in (2, 4, 6, 8):
        pts = sorted((r["gamma"], r["ppl"]) for r in moyal if r["rank"] == rank and r["chunks"] == chunks)
        if pts:
            ax1.plot([g for g, _ in pts], [v for _, v in pts], marker="o", label=f"moyal rank {rank}")
    ax1.axhline(base, color="k", ls="--", label=f"no θ (γ = 0): {base:.2f}")
    ax1.set_yscale("log")
    ax1.set_xlabel("γ")
    ax1.set_ylabel("perplexity (log scale)")
    ax1.set_title(f"Guide's θ ('moyal') on Gemma 3 270M Q4_K_M\nwiki_vital_en.txt, ctx 512, {chunks} chunks")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)

    coarse, ref = rows.get("residual/coarse"), rows.get("residual/reference")
    if coarse and ref:
        gap = coarse["ppl"] - ref["ppl"]
        for kind, color in (("plain", "tab:blue"), ("aware", "tab:red")):
            pts = sorted((r["rank"], r["ppl"]) for k, r in rows.items() if k.startswith(f"residual/{kind}/"))
            if pts:
                ranks = [r for r, _ in pts]
                closed = [100 * (coarse["ppl"] - v) / gap for _, v in pts]
                ax2.plot(ranks, closed, marker="o", color=color,
                         label="activation-aware" if kind == "aware" else "plain SVD")
        ax2.axhline(60, color="gray", ls=":", label="target 60 % at rank 8")
        ax2.set_xscale("log", base=2)
        ax2.set_xlabel("θ rank (γ = 1)")
        ax2.set_ylabel("share of the Q4_0 → Q4_K_M perplexity gap closed (%)")
        ax2.set_title(f"Residual θ: Q4_0 copy ({coarse['ppl']:.2f}) vs Q4_K_M reference ({ref['ppl']:.2f})")
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0



def markdown_tables(results: str | Path) -> str:
    """The results as Markdown tables (for docs/theta-results.md)."""
    rows = {r["key"]: r for r in json.loads(Path(results).read_text())}
    out = ["| θ (moyal) | rank | γ | chunks | perplexity | change vs γ = 0 |", "|---|---|---|---|---|---|"]
    bases = {r["chunks"]: r["ppl"] for r in rows.values() if r["mode"] == "moyal" and r["rank"] == 0}
    for r in sorted((r for r in rows.values() if r["mode"] == "moyal"), key=lambda r: (r["chunks"], r["rank"], r["gamma"])):
        base = bases.get(r["chunks"])
        change = f"{100 * (r['ppl'] / base - 1):+.1f} % (×{r['ppl'] / base:.1f})" if base and r["rank"] else "—"
        out.append(f"| {'none' if not r['rank'] else 'moyal'} | {r['rank'] or '—'} | {r['gamma']:g} | {r['chunks']} | "
                   f"{r['ppl']:.4f} ± {r['ppl_error']:.3f} | {change} |")
    coarse, ref = rows.get("residual/coarse"), rows.get("residual/reference")
    if coarse and ref:
        gap = coarse["ppl"] - ref["ppl"]
        out += ["", "| model | perplexity (40 chunks) | gap closed |", "|---|---|---|",
                f"| reference: original Q4_K_M | {ref['ppl']:.4f} ± {ref['ppl_error']:.3f} | 100 % (by definition) |",
                f"| coarse: block weights → Q4_0 | {coarse['ppl']:.4f} ± {coarse['ppl_error']:.3f} | 0 % |"]
        for k, r in sorted(rows.items()):
            if k.startswith("residual/") and r["rank"]:
                kind = "activation-aware" if r.get("activation_aware") else "plain SVD"
                out.append(f"| coarse + residual θ, {kind}, rank {r['rank']}, γ 1 | {r['ppl']:.4f} ± "
                           f"{r['ppl_error']:.3f} | {100 * (coarse['ppl'] - r['ppl']) / gap:.1f} % |")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
