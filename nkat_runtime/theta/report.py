"""The auto-optimiser's files: history and study JSON, the plot, and the best .nkat with
its settings. Every figure in them was measured by a trial; nothing is estimated."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..fsutil import publish, temp_beside


def _write_atomic(path: Path, write) -> None:
    tmp = temp_beside(path)
    try:
        write(tmp)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: object) -> None:
    _write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2), encoding="utf-8"))


def mask_url(url: str) -> str:
    """A storage URL without its password."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def finished_trials(study) -> list[dict]:
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        rows.append({
            "number": t.number, "baseline": bool(a.get("baseline")) or a.get("gamma") == 0.0,
            "params": {"rank": a.get("rank"), "gamma": a.get("gamma")},
            "perplexity": a.get("perplexity"), "tokens_per_second": a.get("tokens_per_second"),
            "baseline_tokens_per_second": a.get("baseline_tokens_per_second"),
            "overhead_percentage": 100.0 * a.get("overhead", 0.0), "tpe": t.value,
            "duration_seconds": a.get("seconds"), "worker": a.get("worker"),
            "retry_of": t.system_attrs.get("failed_trial"),  # the trial this one reruns (its worker died)
        })
    return rows


def pareto_front(rows: list[dict]) -> list[dict]:
    """Trials no other trial beats on both perplexity and overhead."""
    front = []
    for r in rows:
        if not any(o["perplexity"] <= r["perplexity"] and o["overhead_percentage"] <= r["overhead_percentage"]
                   and (o["perplexity"], o["overhead_percentage"]) != (r["perplexity"], r["overhead_percentage"])
                   for o in rows):
            front.append(r)
    return sorted(front, key=lambda r: r["overhead_percentage"])


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.8))
    nums = [r["number"] for r in rows]
    tpe = [r["tpe"] for r in rows]
    best, running = [], float("-inf")
    for v in tpe:
        running = max(running, v)
        best.append(running)
    base = [r for r in rows if r["baseline"]]
    a.scatter(nums, tpe, s=18, label="trial")
    a.step(nums, best, where="post", color="C1", label="best so far")
    if base:
        a.axhline(base[0]["tpe"], color="C2", ls="--", label="baseline (θ off)")
    a.set(xlabel="trial", ylabel="TPE score (higher is better)", title="TPE per trial")
    a.legend(fontsize=8)
    b.scatter([r["overhead_percentage"] for r in rows], [r["perplexity"] for r in rows], s=18, label="trial")
    front = pareto_front(rows)
    b.plot([r["overhead_percentage"] for r in front], [r["perplexity"] for r in front], "C3-o", ms=4,
           label="Pareto front")
    if base:
        b.axhline(base[0]["perplexity"], color="C2", ls="--", label="baseline perplexity")
    b.set(xlabel="decode overhead of θ (%)", ylabel="perplexity (lower is better)", title="perplexity vs overhead")
    b.set_yscale("log")
    b.legend(fontsize=8)
    theta_rows = [r for r in rows if not r["baseline"]]
    if theta_rows:
        sc = c.scatter([r["params"]["gamma"] for r in theta_rows], [r["params"]["rank"] for r in theta_rows],
                       c=[r["tpe"] for r in theta_rows], cmap="viridis", s=40)
        fig.colorbar(sc, ax=c, label="TPE")
    c.set(xlabel="γ", ylabel="rank", title="γ–rank map")
    fig.suptitle(title)
    fig.tight_layout()
    _write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def best_theta(rows: list[dict]) -> dict | None:
    """The best trial with θ on (γ > 0): the file to hand over even when the baseline wins."""
    theta_rows = [r for r in rows if not r["baseline"] and (r["params"]["gamma"] or 0) > 0]
    return max(theta_rows, key=lambda r: r["tpe"]) if theta_rows else None
