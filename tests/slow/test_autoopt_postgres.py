"""nkat-auto-optimizer on a real PostgreSQL server (tests/pgserver.py): three workers share one
study; one is SIGKILLed mid-trial, one paused past the grace period; the heartbeat fails their
trials, other workers rerun them with the same parameters, and the study ends with exactly N
complete trials. Bad credentials and a missing database are one-line errors that never show the
password."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from nkat_runtime.cli.autoopt import main

pytestmark = pytest.mark.slow

FAST = ["--ctx", "64", "--eval-chunks", "2", "--decode-steps", "4", "--quiet", "--threads", "1"]
N = 8


@pytest.fixture(scope="module")
def postgres():
    pytest.importorskip("psycopg", reason="the PostgreSQL driver psycopg 3 (pip install 'nkat[postgres]')")
    from pgserver import PostgresServer, find_binaries

    bindir = find_binaries()
    if bindir is None:
        pytest.skip("PostgreSQL's initdb/postgres not found under /usr/lib/postgresql/*/bin or on PATH "
                    "(apt-get install postgresql)")
    server = PostgresServer(bindir)
    yield server
    server.stop()


def _worker(model, out, url: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nkat_runtime.cli.autoopt", "--model", str(model),
                             "--output-dir", str(out), "--mode", "custom", *FAST, "--storage", url, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _study(url: str, name: str, deadline: float):
    import optuna
    import sqlalchemy.exc

    while time.monotonic() < deadline:
        try:
            return optuna.load_study(study_name=name, storage=url)
        except (KeyError, sqlalchemy.exc.SQLAlchemyError):  # the workers are still creating it
            time.sleep(0.2)
    raise AssertionError(f"no study {name!r} appeared")


def _first(study, deadline: float, what: str, found):
    """The first trial for which ``found(trial, all trials)`` holds, polling the study."""
    while time.monotonic() < deadline:
        trials = study.get_trials(deepcopy=False)
        for t in trials:
            if found(t, trials):
                return t
        time.sleep(0.05)
    raise AssertionError(f"never saw {what}")


def _measuring(worker: subprocess.Popen):
    """A trial the worker measures: its parameters drawn, its results not yet written."""
    def found(t, trials) -> bool:
        return (t.state.name == "RUNNING" and t.user_attrs.get("worker", "").endswith(f":{worker.pid}")
                and "gamma" in t.params and "perplexity" not in t.user_attrs)
    return found


def test_workers_killed_or_paused_mid_trial(tiny_model, tmp_path, postgres):
    """Worker A is SIGKILLed in its second trial; worker B is paused (SIGSTOP) in its first until the
    others fail its trial for silence, then resumed: it drops that trial's result and goes on. Both
    trials are rerun with their parameters in their slots; the study ends with N complete trials."""
    from optuna.trial import TrialState

    model = tiny_model("llama")
    db = postgres.create_database("workers")
    url = postgres.url(db)  # plain postgresql://, as users type it: psycopg 3 is picked
    name = "three"
    workers = [_worker(model, tmp_path / f"w{i}", url, "--trials", str(N), "--study-name", name, "--heartbeat", "1")
               for i in range(3)]
    a, b, c = workers
    deadline = time.monotonic() + 300
    try:
        study = _study(postgres.url(db, "psycopg"), name, deadline)
        paused = _first(study, deadline, "B measuring", _measuring(b))
        b.send_signal(signal.SIGSTOP)
        in_a = _measuring(a)
        killed = _first(study, deadline, "A measuring a second, fresh trial", lambda t, trials: (
            in_a(t, trials) and "failed_trial" not in t.system_attrs
            and any(o.state == TrialState.COMPLETE and o.user_attrs.get("worker") == t.user_attrs["worker"]
                    for o in trials)))
        a.send_signal(signal.SIGKILL)
        errs = {a: a.communicate(timeout=30)[1]}  # it may have rerun B's trial before it died
        _first(study, deadline, "B's trial failed for silence",
               lambda t, trials: t.number == paused.number and t.state == TrialState.FAIL)
        b.send_signal(signal.SIGCONT)
        for w in (b, c):
            out, err = w.communicate(timeout=300)
            assert w.returncode == 0, err
            assert "Traceback" not in err and postgres.password not in out + err
            errs[w] = err
    finally:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGCONT)
                w.kill()
                w.wait(30)

    assert f"trial {paused.number} was taken for a dead worker's" in errs[b]
    trials = {t.number: t for t in study.get_trials()}
    assert {n for n, t in trials.items() if t.state == TrialState.FAIL} == {killed.number, paused.number}
    assert {t.state for t in trials.values()} <= {TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED}
    complete = [t for t in trials.values() if t.state == TrialState.COMPLETE]
    assert len(complete) == N
    assert sum(bool(t.user_attrs.get("baseline")) for t in complete) == 1
    reruns = {}
    for lost in (killed, paused):
        again = [t for t in complete if t.system_attrs.get("failed_trial") == lost.number]
        assert len(again) == 1 and again[0].params == lost.params, (lost, again)
        assert again[0].user_attrs["worker"] != lost.user_attrs["worker"]
        said = f"trial {again[0].number} reruns trial {lost.number}, whose worker stopped"
        assert sum(said in err for err in errs.values()) == 1, errs
        reruns[lost.number] = again[0]

    for i in (1, 2):  # B and C each wrote the study's N trials
        history = json.loads((tmp_path / f"w{i}" / "optimization_history.json").read_text())
        rows = history["trials"]
        assert sorted(r["number"] for r in rows) == sorted(t.number for t in complete)
        assert sum(r["baseline"] for r in rows) == 1
        for lost, again in reruns.items():
            row = next(r for r in rows if r["retry_of"] == lost)
            assert row["number"] == again.number and row["worker"] == again.user_attrs["worker"]
            assert row["params"]["gamma"] == again.params["gamma"]
        summary = json.loads((tmp_path / f"w{i}" / "optuna_study.json").read_text())
        assert summary["n_trials"] == N and postgres.password not in json.dumps(summary)
        assert summary["storage"] == url.replace(postgres.password, "***")


def test_bad_credentials_and_database_are_one_line_errors(tiny_model, tmp_path, postgres, capsys):
    model = str(tiny_model("llama"))
    args = ["--model", model, "--output-dir", str(tmp_path), "--mode", "custom", "--trials", "1", *FAST]
    wrong = postgres.url("postgres").replace(postgres.password, "not-the-password")
    assert main([*args, "--storage", wrong]) == 2
    err = capsys.readouterr().err
    assert "password authentication failed" in err and "not-the-password" not in err and "***" in err
    assert err.count("\n") == 1 and err.startswith("nkat-auto-optimizer: error: study storage postgresql")
    assert main([*args, "--storage", postgres.url("no_such_db")]) == 2
    err = capsys.readouterr().err
    assert 'database "no_such_db" does not exist' in err and postgres.password not in err
    assert err.count("\n") == 1
