"""Size for quality: θ files against llama.cpp's own quantisation types, on one model.

    python benchmarks/size_quality.py --llama-cpp /tmp/llama-build/bin --chunks 40
    python benchmarks/size_quality.py --plot-only          # docs/size-quality.png from the JSON
    python benchmarks/size_quality.py --table              # the Markdown table of the JSON

From one reference GGUF (default: the bundled Qwen2.5-Coder-1.5B Q4_K_M), ``llama-quantize
--allow-requantize`` makes llama.cpp's coarser types (``--types``), and
``nkat-gguf-converter --reference`` adds residual θ to some of them (``--theta
BASE:RANK[:STATS]``). Every file, the reference included, is scored by ``nkat-perplexity``
(llama.cpp's method, ctx 512) on the same text and chunks, one child process per file, and
plotted as perplexity against file size (bytes on disk, θ included). Results are kept in
``--results`` keyed by file name and chunk count, so a rerun only measures what is missing.

The reference is itself a 4-bit file: "quality" here is closeness to it, not to the
model's bf16 weights (none is on these machines).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_name  # noqa: E402  (benchmarks/, on the path of a script run from it)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TYPES = ("Q4_K_S", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "Q4_0")
THETA = ("Q3_K_S:4", "Q3_K_S:8", "Q3_K_S:16", "Q2_K:8", "Q2_K:16", "Q4_0:8")


class Results:
    """Rows of measured files in a JSON list, rewritten whole (temp + rename) after each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict] = json.loads(path.read_text()) if path.exists() else []

    def get(self, name: str, chunks: int) -> dict | None:
        return next((r for r in self.rows if r["name"] == name and r["chunks"] == chunks), None)

    def put(self, row: dict) -> None:
        self.rows = [r for r in self.rows if not (r["name"] == row["name"] and r["chunks"] == row["chunks"])]
        self.rows.append(row)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.rows, indent=1) + "\n")
        os.replace(tmp, self.path)
        print(json.dumps(row), flush=True)


def run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"failed ({rc}): {' '.join(cmd)}; see {log}")


def weight_count(path: Path) -> int:
    import math

    from nkat_runtime.gguf.reader import open_gguf

    g = open_gguf(path)
    return sum(math.prod(t.shape) for n, t in g.tensors.items() if ".theta_" not in n)


def make_files(args, work: Path, log: Path) -> list[tuple[str, Path, dict]]:
    """(name, path, description) of every file to score, made where missing."""
    ref = Path(args.reference)
    files = [("reference " + args.reference_label, ref, {"kind": "reference", "type": args.reference_label})]
    quantize = Path(args.llama_cpp) / "llama-quantize" if args.llama_cpp else None
    for t in args.types:
        out = work / f"{ref.stem}.{t}.gguf"
        if not out.exists():
            if quantize is None:
                raise SystemExit(f"{out} is missing and no --llama-cpp DIR with llama-quantize was given")
            part = out.with_suffix(".part")  # renamed when whole: a killed run leaves no file under the name
            run([str(quantize), "--allow-requantize", str(ref), str(part), t], log)
            os.replace(part, out)
        files.append((f"llama.cpp {t}", out, {"kind": "llama.cpp", "type": t}))
    for spec in args.theta:
        base, rank, *rest = spec.split(":")
        stats = rest[0] if rest else args.activation_stats
        src = work / f"{ref.stem}.{base}.gguf"
        out = work / f"{ref.stem}.{base}.theta{rank}.{stats}.nkat"
        if not out.exists():
            if not src.exists():
                raise SystemExit(f"θ on {base} needs {src}: add {base} to --types")
            run([str(BIN / "nkat-gguf-converter"), "-i", str(src), "-o", str(out), "--reference", str(ref),
                 "--theta-rank", rank, "--theta-gamma", "1", "--activation-stats", stats, "--no-check",
                 "--threads", str(args.threads)], log)
        files.append((f"{base} + θ rank {rank} ({stats})", out,
                      {"kind": "theta", "type": base, "rank": int(rank), "stats": stats}))
    return files


def ours(args, path: Path, log: Path) -> tuple[float, float]:
    tmp = log.parent / (path.name + ".ppl.json")
    run([str(BIN / "nkat-perplexity"), "--model", str(path), "--file", args.text, "--ctx", str(args.ctx),
         "--chunks", str(args.chunks), "--no-cuda", "--threads", str(args.threads), "--json", str(tmp)], log)
    ppl = json.loads(tmp.read_text())
    tmp.unlink()
    return ppl["perplexity"], ppl["perplexity_error"]


def llama_cpp(args, path: Path, log: Path) -> tuple[float, float]:
    """llama.cpp's own llama-perplexity on the same text, ctx and chunks (its last 'Final estimate')."""
    cmd = [str(Path(args.llama_cpp) / "llama-perplexity"), "-m", str(path), "-f", args.text, "-c", str(args.ctx),
           "--chunks", str(args.chunks), "-t", str(args.threads)]
    before = log.stat().st_size if log.exists() else 0
    run(cmd, log)
    text = log.read_bytes()[before:].decode(errors="replace")
    m = re.findall(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", text)
    if not m:
        raise SystemExit(f"no 'Final estimate' from llama-perplexity; see {log}")
    return float(m[-1][0]), float(m[-1][1])


def score(args, name: str, path: Path, desc: dict, results: Results, log: Path, tool: str = "nkat") -> None:
    key = name if tool == "nkat" else f"{name} [llama-perplexity]"
    if results.get(key, args.chunks) is not None:
        return
    start = time.time()
    ppl, err = (ours if tool == "nkat" else llama_cpp)(args, path, log)
    size = path.stat().st_size
    results.put({**desc, "name": key, "tool": tool, "model": args.model_name, "file": path.name, "bytes": size,
                 "bits_per_weight": 8 * size / weight_count(path), "chunks": args.chunks, "ctx": args.ctx,
                 "perplexity": ppl, "perplexity_error": err,
                 "text": Path(args.text).name, "seconds": round(time.time() - start, 1), "cpu": cpu_name(),
                 "threads": args.threads, "date": time.strftime("%Y-%m-%d")})


def rows_at(results: list[dict], chunks: int | None) -> tuple[int, list[dict]]:
    counts = {r["chunks"] for r in results}
    chunks = chunks or max(counts, key=lambda c: (sum(r["chunks"] == c for r in results), c))
    return chunks, sorted((r for r in results if r["chunks"] == chunks), key=lambda r: r["bytes"])


def table(results: list[dict], chunks: int | None) -> str:
    chunks, rows = rows_at(results, chunks)
    refs = {r.get("tool", "nkat"): r for r in rows if r["kind"] == "reference"}
    out = [f"| file | MiB | bits/weight | scored by | perplexity ({chunks} chunks) | vs reference (same tool) |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        tool = r.get("tool", "nkat")
        ref = refs.get(tool)
        rel = f"{100 * (r['perplexity'] / ref['perplexity'] - 1):+.2f} %" if ref else ""
        name = r["name"].removesuffix(" [llama-perplexity]")
        out.append(f"| {name} | {r['bytes'] / 2**20:.1f} | {r['bits_per_weight']:.3f} | "
                   f"{'llama-perplexity' if tool == 'llama.cpp' else 'nkat-perplexity'} | "
                   f"{r['perplexity']:.4f} ± {r['perplexity_error']:.3f} | {rel} |")
    return "\n".join(out)


def plotted(rows: list[dict]) -> list[dict]:
    """One point per file: ours where we scored it, else llama.cpp's figure."""
    best: dict[str, dict] = {}
    for r in rows:
        if r["file"] not in best or r.get("tool", "nkat") == "nkat":
            best[r["file"]] = r
    return sorted(best.values(), key=lambda r: r["bytes"])


def plot(results: list[dict], chunks: int | None, out: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chunks, rows = rows_at(results, chunks)
    rows = plotted(rows)
    fig, ax = plt.subplots(figsize=(10, 6))
    series = {"reference": ("k", "*"), "llama.cpp": ("tab:blue", "o")}
    llama = [r for r in rows if r["kind"] == "llama.cpp"]
    ax.plot([r["bytes"] / 2**20 for r in llama], [r["perplexity"] for r in llama], color="tab:blue", alpha=0.4)
    for r in rows:
        color, marker = series.get(r["kind"], ("tab:red", "s"))
        hollow = r.get("tool", "nkat") != "nkat"
        ax.errorbar(r["bytes"] / 2**20, r["perplexity"], yerr=r["perplexity_error"], color=color, marker=marker,
                    capsize=3, ls="none", mfc="white" if hollow else color)
        label = r["type"] if r["kind"] != "theta" else f"{r['type']}+θ{r['rank']}"
        ax.annotate(label, (r["bytes"] / 2**20, r["perplexity"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8, color=color)
    for base in sorted({r["type"] for r in rows if r["kind"] == "theta"}):
        line = sorted([r for r in rows if r["type"] == base and r["kind"] in ("theta", "llama.cpp")],
                      key=lambda r: r["bytes"])
        ax.plot([r["bytes"] / 2**20 for r in line], [r["perplexity"] for r in line], color="tab:red", alpha=0.4)
    ax.set_xlabel("file size (MiB, θ included)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(f"{model}: llama.cpp types (blue) and residual θ on them (red), reference Q4_K_M (black)\n"
                 f"ctx 512, {chunks} chunks; filled: nkat-perplexity, hollow: llama.cpp's llama-perplexity")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", default=None, help="reference GGUF (default: the bundled Qwen2.5-Coder-1.5B)")
    p.add_argument("--reference-label", default="Q4_K_M")
    p.add_argument("--model-name", default="Qwen2.5-Coder-1.5B-Instruct", help="the model's name in the plot")
    p.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_BIN"), help="folder with llama-quantize")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "nkat" / "size-quality"))
    p.add_argument("--types", nargs="*", default=list(TYPES))
    p.add_argument("--theta", nargs="*", default=list(THETA), help="BASE:RANK[:STATS] θ files to make and score")
    p.add_argument("--activation-stats", default="second-moment", choices=("second-moment", "mean-abs"),
                   help="for θ files whose spec names none (default: the converter's, second-moment)")
    p.add_argument("--text", default=str(REPO.parent / "shared" / "data" / "wiki_vital_en.txt"))
    p.add_argument("--chunks", type=int, default=40)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--results", default=str(REPO / "docs" / "size-quality.json"))
    p.add_argument("--png", default=str(REPO / "docs" / "size-quality.png"))
    p.add_argument("--llama-cpp-scores", action="store_true",
                   help="score llama.cpp's types with its llama-perplexity (θ files and the reference: ours)")
    p.add_argument("--both", nargs="*", default=["Q3_K_S"], help="types scored by both tools, besides the reference")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    results = Results(Path(args.results))
    if args.table:
        print(table(results.rows, None))
        return 0
    if not args.plot_only:
        if args.reference is None:
            from nkat_runtime.bundled import resolve_model

            args.reference = str(resolve_model("qwen2.5-coder-1.5b"))
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        log = work / "size_quality.log"
        files = make_files(args, work, log)
        for name, path, desc in files:  # llama.cpp's types by llama.cpp's tool when asked (faster on a CPU)
            llama_side = desc["kind"] == "llama.cpp" and args.llama_cpp_scores
            score(args, name, path, desc, results, log, "llama.cpp" if llama_side else "nkat")
        for name, path, desc in files:  # the files both tools score: how far the two agree
            if args.llama_cpp and desc["kind"] != "theta" and (desc["kind"] == "reference" or desc["type"] in args.both):
                llama_side = desc["kind"] == "llama.cpp" and args.llama_cpp_scores
                score(args, name, path, desc, results, log, "nkat" if llama_side else "llama.cpp")
    plot(results.rows, None, Path(args.png), args.model_name)
    print(table(results.rows, None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
