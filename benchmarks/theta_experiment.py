"""The θ experiment behind docs/theta-results.md: what θ really does to perplexity.

Part A, the guide's ``moyal`` θ: perplexity versus rank (2, 4, 6, 8) and γ (0.90–0.99,
plus 0 = the plain model and a few small γ). θ is made exactly as the converter makes
it (truncated SVD → antisymmetrisation where square → INT8 factors) and folded into the
dense weights, ``W + 0.5·γ·θ``, which is the star-product's arithmetic; one SVD at the
largest rank serves every smaller rank.

Part B, ``residual`` θ end to end through the converter and the runtime: the source is
requantised coarser (every block weight → Q4_0 with gguf-py's quantiser), the original
file is the reference; perplexity of the coarse model, the reference, and the coarse
model with plain and activation-aware θ at several ranks. "Gap closed" =
(ppl_coarse − ppl_θ) / (ppl_coarse − ppl_reference).

Results are appended to a JSON file as they come (a rerun skips what is there) and
plotted to a PNG. Usage:

    python benchmarks/theta_experiment.py --chunks 40 --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nkat_runtime import bundled  # noqa: E402
from nkat_runtime.eval.perplexity import perplexity_of_tokens  # noqa: E402
from nkat_runtime.gguf.names import BLOCK_WEIGHT  # noqa: E402
from nkat_runtime.gguf.requantize import requantize  # noqa: E402
from nkat_runtime.loader import load_model  # noqa: E402
from nkat_runtime.theta.convert import ConvertOptions, convert  # noqa: E402
from nkat_runtime.theta.factors import ThetaFactors  # noqa: E402
from nkat_runtime.theta.svd import moyal_factors, truncated_svd  # noqa: E402

log = logging.getLogger("theta_experiment")


class Results:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict] = json.loads(path.read_text()) if path.exists() else []

    def has(self, key: str) -> dict | None:
        return next((r for r in self.rows if r["key"] == key), None)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.rows, indent=1))
        tmp.replace(self.path)
        print(json.dumps(row), flush=True)


def measure(results: Results, key: str, lm, ids, chunks: int, **info) -> dict:
    done = results.has(key)
    if done:
        return done
    t0 = time.perf_counter()
    res = perplexity_of_tokens(lm, ids, 512, chunks)
    row = {"key": key, "ppl": res.ppl, "ppl_error": res.ppl_error, "chunks": res.n_chunks,
           "seconds": round(time.perf_counter() - t0, 1), **info}
    results.add(row)
    return row


def part_a(results: Results, model: Path, ids, chunks: int, ranks, gammas, small_gammas, grid_chunks: int) -> None:
    """The guide's default (rank 4, γ 0.97) at ``chunks``; the rest of the grid at ``grid_chunks``."""
    lm = load_model(model, device="cpu", context=512, progress=False)
    measure(results, "moyal/gamma0", lm, ids, chunks, mode="moyal", rank=0, gamma=0.0)
    targets = {n: m for n, m in lm.model.linear_modules().items() if BLOCK_WEIGHT.match(n)}
    original = {n: m.weight.detach().clone() for n, m in targets.items()}
    svds = {n: truncated_svd(w, max(ranks)) for n, w in original.items()}
    thetas = {}
    for rank in ranks:
        thetas[rank] = {n: ThetaFactors.from_dense(*moyal_factors(original[n], svds[n], rank)).matrix()
                        for n in targets}
    configs = [(4, 0.97, chunks)] + [(r, g, grid_chunks) for r in ranks for g in gammas] + [
        (4, g, grid_chunks) for g in small_gammas]
    if grid_chunks != chunks:
        configs.insert(1, (0, 0.0, grid_chunks))  # the γ = 0 baseline at the grid's length too
    for rank, gamma, n_chunks in configs:
        key = f"moyal/r{rank}/g{gamma}/c{n_chunks}"
        if results.has(key):
            continue
        with torch.no_grad():
            for n, m in targets.items():
                m.weight.copy_(original[n] + 0.5 * gamma * thetas[rank][n] if rank else original[n])
        measure(results, key, lm, ids, n_chunks, mode="moyal", rank=rank, gamma=gamma)
    with torch.no_grad():
        for n, m in targets.items():
            m.weight.copy_(original[n])


def part_b(results: Results, model: Path, work: Path, ids, chunks: int, plain_ranks, aware_ranks) -> None:
    coarse = work / "coarse-q4_0.gguf"
    if not coarse.exists():
        requantize(model, coarse, "Q4_0")
    plain = results.has("moyal/gamma0")  # the same model and text: no need to measure it twice
    if plain and not results.has("residual/reference"):
        results.add({**plain, "key": "residual/reference", "mode": "residual"})
    for key, path in (("residual/reference", model), ("residual/coarse", coarse)):
        if not results.has(key):
            lm = load_model(path, device="cpu", context=512, progress=False)
            measure(results, key, lm, ids, chunks, mode="residual", rank=0, gamma=0.0)
            del lm
    runs = [(r, False) for r in plain_ranks] + [(r, True) for r in aware_ranks]
    for rank, aware in runs:
        key = f"residual/{'aware' if aware else 'plain'}/r{rank}"
        if results.has(key):
            continue
        out = work / f"residual-{'aware' if aware else 'plain'}-r{rank}.nkat"
        t0 = time.perf_counter()
        convert(ConvertOptions(input=coarse, output=out, rank=rank, gamma=1.0, reference=model,
                               use_calibration=aware, progress=False))
        conv_s = time.perf_counter() - t0
        lm = load_model(out, device="cpu", context=512, progress=False)
        measure(results, key, lm, ids, chunks, mode="residual", rank=rank, gamma=1.0, activation_aware=aware,
                convert_seconds=round(conv_s, 1), nkat_bytes=out.stat().st_size, coarse_bytes=coarse.stat().st_size)
        del lm
        out.unlink()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--text", default=str(REPO.parent / "shared" / "data" / "wiki_vital_en.txt"))
    p.add_argument("--chunks", type=int, default=40)
    p.add_argument("--grid-chunks", type=int, default=4, help="chunks for the moyal grid beyond the guide's default")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "docs" / "theta-results.json"))
    p.add_argument("--work", default=str(bundled.cache_dir() / "theta-experiment"))
    p.add_argument("--part", choices=("a", "b", "all"), default="all")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    model = bundled.resolve_model(args.model)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = Results(Path(args.out))
    text = Path(args.text).read_text(encoding="utf-8")
    lm = load_model(model, device="cpu", context=512, progress=False)
    ids = lm.tokenizer.encode(text, add_special=True)[: args.chunks * 512]
    del lm
    if args.part in ("b", "all"):
        part_b(results, model, work, ids, args.chunks, plain_ranks=(8,), aware_ranks=(8,))
    if args.part in ("a", "all"):
        part_a(results, model, ids, args.chunks, ranks=(2, 4, 6, 8), gammas=(0.90, 0.95, 0.97, 0.99),
               small_gammas=(0.1, 0.5), grid_chunks=args.grid_chunks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
