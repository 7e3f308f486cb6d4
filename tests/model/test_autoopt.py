"""nkat-auto-optimizer on a tiny generated model: the five outputs, resuming a study, two
workers sharing one SQLite study, Ctrl-C, and bad arguments."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nkat_runtime.cli.autoopt import main
from nkat_runtime.gguf.reader import open_gguf
from nkat_runtime.loader import load_model
from nkat_runtime.model.theta_linear import theta_layers

FAST = ["--ctx", "64", "--eval-chunks", "2", "--decode-steps", "4", "--quiet"]


def _run(model: Path, out: Path, *extra: str) -> int:
    return main(["--model", str(model), "--output-dir", str(out), "--mode", "custom", *FAST, *extra])


def _cli(model: Path, out: Path, *extra: str) -> subprocess.Popen:
    # SIGINT back to its default: a test run started in the background by a shell inherits it ignored
    return subprocess.Popen([sys.executable, "-m", "nkat_runtime.cli.autoopt", "--model", str(model),
                             "--output-dir", str(out), "--mode", "custom", *FAST, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _complete(storage: str, name: str) -> list[int]:
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=name, storage=storage)
    return sorted(t.number for t in study.get_trials(states=(TrialState.COMPLETE,)))


@pytest.mark.slow  # 35 s: the fast tier keeps the Ctrl-C study
def test_three_trials_write_all_outputs(tiny_model, tmp_path):
    from PIL import Image, ImageStat

    model = tiny_model("llama")
    assert _run(model, tmp_path, "--trials", "3") == 0
    history = json.loads((tmp_path / "optimization_history.json").read_text())
    trials = history["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2] and trials[0]["baseline"]
    assert trials[0]["params"]["gamma"] == 0.0 and trials[0]["overhead_percentage"] == 0.0
    for t in trials:
        assert t["perplexity"] > 1 and t["tokens_per_second"] > 0 and t["tpe"] > 0 and t["duration_seconds"] > 0
    study = json.loads((tmp_path / "optuna_study.json").read_text())
    assert study["sampler"] == "TPESampler" and study["direction"] == "maximize" and study["n_trials"] == 3
    assert study["best_value"] == max(t["tpe"] for t in trials)
    with Image.open(tmp_path / "optimization_results.png") as img:
        assert img.size[0] > 800 and max(ImageStat.Stat(img.convert("L")).stddev) > 10  # not blank
    best = study["best_theta_trial"]
    stem = f"optimal_rank{best['params']['rank']}_gamma{best['params']['gamma']:.3f}"
    meta = json.loads((tmp_path / f"{stem}.json").read_text())
    assert meta["file"] == f"{stem}.nkat" and meta["measured"] == best and len(meta["source_sha256"]) == 64
    assert meta["better_than_baseline"] == (best["tpe"] > trials[0]["tpe"])
    g = open_gguf(tmp_path / f"{stem}.nkat")
    assert g.get("nkat.theta.rank") == best["params"]["rank"]
    assert g.get("nkat.theta.gamma") == pytest.approx(best["params"]["gamma"], rel=1e-6)
    lm = load_model(tmp_path / f"{stem}.nkat", context=64, progress=False)
    layers = theta_layers(lm.model)
    assert layers and all(layer.gamma == pytest.approx(best["params"]["gamma"], rel=1e-6) for layer in layers)


def test_residual_study_tries_gamma_one_first(tiny_model, tmp_path):
    """With a reference, the trials after the baseline are residual θ's own γ = 1 at ranks 8 and 32,
    then the sampler's: quick mode's 12 trials did not find them alone (docs/auto-optimizer.md)."""
    from nkat_runtime.gguf.requantize import requantize

    fine = tiny_model("llama", seed=0)
    coarse = tmp_path / "coarse.gguf"
    requantize(fine, coarse, "Q4_0", progress=False)
    assert _run(coarse, tmp_path / "out", "--trials", "4", "--reference", str(fine)) == 0
    trials = json.loads((tmp_path / "out" / "optimization_history.json").read_text())["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3] and trials[0]["baseline"]
    assert [t["params"] for t in trials[:3]] == [{"rank": 2, "gamma": 0.0}, {"rank": 8, "gamma": 1.0},
                                                 {"rank": 32, "gamma": 1.0}]
    assert trials[1]["perplexity"] != trials[0]["perplexity"]  # θ was on (random weights: better or worse)
    assert not any(t["baseline"] for t in trials[1:])


def test_distilled_best_theta_is_written_only_if_it_measures_better(tiny_model, tmp_path, capsys):
    """--distill-steps: the best trial's θ trained end to end; the file holds the distilled factors
    exactly when they scored lower on the trials' chunks, and its perplexity is the one recorded."""
    from nkat_runtime.eval.perplexity import perplexity_of_tokens
    from nkat_runtime.gguf.requantize import requantize
    from nkat_runtime.theta.convert import BUILTIN_EVAL

    fine = tiny_model("llama", seed=3)
    coarse = tmp_path / "coarse.gguf"
    requantize(fine, coarse, "Q4_0", progress=False)
    out = tmp_path / "out"
    assert _run(coarse, out, "--trials", "2", "--reference", str(fine), "--distill-steps", "6") == 0
    printed = capsys.readouterr().out
    study = json.loads((out / "optuna_study.json").read_text())
    d = study["distill"]
    assert d["steps"] == 6 and d["train_chunks"] >= 1 and d["held_out_chunks"] == 2
    assert d["held_out_kl_after"] != d["held_out_kl_before"]  # the factors moved
    assert d["perplexity_before"] == study["best_theta_trial"]["perplexity"]
    assert d["written"] == (d["perplexity"] < d["perplexity_before"])
    assert "distilled θ (6 steps" in printed
    g = open_gguf(out / study["best_theta_file"])
    assert g.get("nkat.theta.distill_steps") == (6 if d["written"] else None)
    lm = load_model(out / study["best_theta_file"], context=64, progress=False)
    ids = lm.tokenizer.encode(BUILTIN_EVAL.read_text(encoding="utf-8"), add_special=True)
    got = perplexity_of_tokens(lm, ids, 64, 2).ppl
    assert got == pytest.approx(d["perplexity"] if d["written"] else d["perplexity_before"], rel=1e-4)


def test_distillation_arguments_are_checked_before_any_trial(tiny_model, tmp_path, capsys):
    model = tiny_model("llama")
    assert _run(model, tmp_path / "a", "--trials", "2", "--distill-steps", "5") == 2
    assert "--distill-steps needs --reference" in capsys.readouterr().err
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café ".encode("latin-1") * 50)
    assert _run(model, tmp_path / "b", "--trials", "2", "--reference", str(model), "--distill-steps", "5",
                "--distill-text", str(bad)) == 2
    assert "is not UTF-8" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("One short line.", encoding="utf-8")
    assert _run(model, tmp_path / "c", "--trials", "2", "--reference", str(model), "--distill-steps", "5",
                "--distill-text", str(short)) == 2
    assert "chunks of 64 tokens; at least 3 are needed" in capsys.readouterr().err
    assert not (tmp_path / "c" / "optimization_history.json").exists()  # no trial ran


def test_a_study_from_before_second_moment_resumes_only_as_mean_abs(tiny_model, tmp_path, capsys):
    """A residual study made when mean-abs was the default (its settings lack the statistic) is not
    continued with the second-moment θ: that would mix two objectives in one study."""
    import optuna

    from nkat_runtime.theta.autoopt import RANKS
    from nkat_runtime.theta.convert import sha256_file

    model, fine = tiny_model("llama"), tiny_model("llama", seed=0)
    storage = f"sqlite:///{tmp_path / 'old.db'}"
    old = optuna.create_study(study_name="old", storage=storage, direction="maximize")
    old.set_user_attr("settings", {"model_sha256": sha256_file(model), "theta_mode": "residual",
                                   "ranks": list(RANKS["residual"]), "eval_chunks": 2, "ctx": 64})
    args = ["--storage", storage, "--study-name", "old", "--reference", str(fine), "--trials", "1"]
    assert _run(model, tmp_path / "a", *args) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # (after optuna's own line about creating the study)
    assert err.startswith("nkat-auto-optimizer: error: study 'old'") and "was made for other settings" in err
    assert _run(model, tmp_path / "b", *args, "--activation-stats", "mean-abs") == 0


@pytest.mark.slow  # 23-39 s: two CLI runs
def test_resume_continues_the_trial_count(tiny_model, tmp_path):
    model = tiny_model("llama")
    storage = f"sqlite:///{tmp_path / 's.db'}"
    assert _run(model, tmp_path / "a", "--trials", "2", "--storage", storage, "--study-name", "r") == 0
    assert _run(model, tmp_path / "b", "--trials", "4", "--storage", storage, "--study-name", "r") == 0
    assert _complete(storage, "r") == [0, 1, 2, 3]
    history = json.loads((tmp_path / "b" / "optimization_history.json").read_text())
    assert [t["number"] for t in history["trials"]] == [0, 1, 2, 3]
    assert sum(t["baseline"] for t in history["trials"]) == 1


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(tiny_model, tmp_path):
    model = tiny_model("llama")
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    # create the study first, so both workers find it (and its baseline) in place
    assert _run(model, tmp_path / "w0", "--trials", "1", "--storage", storage, "--study-name", "s") == 0
    workers = [_cli(model, tmp_path / f"w{i}", "--trials", "8", "--storage", storage, "--study-name", "s")
               for i in (1, 2)]
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err
    done = _complete(storage, "s")
    assert len(done) == 8 and len(set(done)) == 8


def test_ctrl_c_keeps_the_finished_trials(tiny_model, tmp_path):
    model = tiny_model("llama")
    storage = f"sqlite:///{tmp_path / 'i.db'}"
    proc = _cli(model, tmp_path, "--trials", "500", "--storage", storage, "--study-name", "i")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        time.sleep(1.0)
        try:
            if len(_complete(storage, "i")) >= 2:
                break
        except Exception:  # the study is not created yet
            continue
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    history = json.loads((tmp_path / "optimization_history.json").read_text())
    assert len(history["trials"]) >= 2
    assert json.loads((tmp_path / "optuna_study.json").read_text())["interrupted"] is True


def test_unreachable_or_unknown_storage_is_one_line(tiny_model, tmp_path, capsys):
    from nkat_runtime.theta.storage import normalise_url
    from serverproc import free_port

    assert normalise_url("postgresql://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert normalise_url("postgres://h/db") == "postgresql+psycopg://h/db"
    assert normalise_url("mysql://u@h/db") == "mysql+pymysql://u@h/db"
    for url in ("postgresql+psycopg2://h/db", "sqlite:///x.db", "mysql+mysqldb://h/db"):
        assert normalise_url(url) == url
    args = ["--model", str(tiny_model("llama")), "--output-dir", str(tmp_path), "--mode", "custom", "--trials", "1"]
    assert main([*args, "--storage", "postgresql+nosuchdriver://u:hunter2@h/db"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Can't load plugin" in err and "hunter2" not in err
    pytest.importorskip("psycopg", reason="the PostgreSQL driver psycopg 3 (pip install 'nkat[postgres]')")
    assert main([*args, "--storage", f"postgresql://u:hunter2@127.0.0.1:{free_port()}/db"]) == 2  # nothing listens
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hunter2" not in err and "Traceback" not in err
    assert err.startswith("nkat-auto-optimizer: error: study storage postgresql+psycopg://u:***@127.0.0.1:")
    assert "connection" in err.lower()


def test_bad_arguments_are_one_line_errors(tiny_model, tmp_path, capsys):
    assert main(["--model", str(tiny_model("llama")), "--mode", "custom", "--output-dir", str(tmp_path)]) == 2
    assert "--mode custom needs --trials N" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "missing.gguf"), "--output-dir", str(tmp_path)]) == 2
