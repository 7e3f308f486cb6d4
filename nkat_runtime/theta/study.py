"""The Optuna side of the auto-optimiser: a TPE study in an RDB storage (SQLite on one
machine, PostgreSQL/MySQL across machines), shared by any number of workers.

``--trials N`` is the number of finished trials the *study* should reach: a crashed run
resumes where it stopped, and workers on one storage stop together at N. Trial 0 is the
baseline (γ = 0: θ off). A killed worker's running trial is failed by Optuna's heartbeat.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Callable

from tqdm import tqdm

from .autoopt import GAMMA_MAX, SearchConfig, ThetaSearch, TrialResult

log = logging.getLogger(__name__)

HEARTBEAT_S = 10
GRACE_S = 30


def open_study(storage_url: str, study_name: str, seed: int):
    import warnings

    import optuna
    from optuna.storages import RDBStorage

    # ERROR: a trial failed by Ctrl-C is reported by us in one line, not by Optuna with a traceback
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = RDBStorage(storage_url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)
    return optuna.create_study(storage=storage, study_name=study_name, direction="maximize", sampler=sampler,
                               load_if_exists=True)


def _count(study, *states) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def suggest(trial, cfg: SearchConfig) -> tuple[int, float]:
    ranks = cfg.ranks
    rank = ranks[0] if len(ranks) == 1 else trial.suggest_categorical("rank", list(ranks))
    gamma = trial.suggest_float("gamma", 0.0, GAMMA_MAX[cfg.theta_mode])
    return rank, gamma


class InterruptGate:
    """Ctrl-C that only ever cuts a trial's own work, never Optuna's bookkeeping around it.

    Inside the gate, SIGINT raises KeyboardInterrupt at once (and Optuna fails the trial in
    flight); anywhere else (Optuna telling the storage, stopping a heartbeat, the progress bar)
    it is noted and raised when the next objective starts. An interrupt that landed anywhere
    in Optuna's code could leave a trial neither finished nor failed: Optuna then asserts
    ("Should not reach") and the process ends with a traceback instead of exit 130.
    Installed only from the main thread (elsewhere Ctrl-C keeps Python's default).
    """

    def __init__(self) -> None:
        self.inside = False
        self.pending = False
        self._old = None

    def __enter__(self) -> "InterruptGate":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)

    def _handle(self, signum, frame) -> None:
        if self.inside:
            raise KeyboardInterrupt
        self.pending = True

    def enter(self) -> None:
        if self.pending:
            raise KeyboardInterrupt
        self.inside = True

    def leave(self) -> None:
        self.inside = False


def run_trials(study, search: ThetaSearch, n_trials: int, progress: bool = True,
               on_trial: Callable[[int, TrialResult], None] | None = None) -> int:
    """Run trials until the study holds ``n_trials`` finished ones; returns how many ran here.

    Workers sharing the storage never overshoot: a worker whose trial would be one too many
    waits for the earlier-numbered trials in flight, and prunes its own once they finished (a
    pruned trial is not a result). Ctrl-C (through :class:`InterruptGate`) raises KeyboardInterrupt
    after Optuna failed the trial in flight, or, when it came between trials, before the next one
    (or when the study is complete).
    """
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    cfg = search.cfg
    if not study.trials:
        baseline = {"gamma": 0.0} if len(cfg.ranks) == 1 else {"rank": cfg.ranks[0], "gamma": 0.0}
        study.enqueue_trial(baseline, user_attrs={"baseline": True})
    done = _count(study, TrialState.COMPLETE)
    if done >= n_trials:
        return 0
    ran = 0
    bar = tqdm(total=n_trials, initial=done, desc="trials", unit="trial", disable=not progress)

    def objective(trial) -> float:
        gate.enter()
        try:
            return measured(trial)
        finally:
            gate.leave()

    def measured(trial) -> float:
        nonlocal ran
        while True:
            live = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
            complete = sum(t.state == TrialState.COMPLETE for t in live)
            if complete >= n_trials:
                raise optuna.TrialPruned("the study already has its trials")
            # the running trials numbered before this one go first: two workers each waiting on the
            # other's trial would wait for ever (seen under load: both held the 8th slot of 8)
            ahead = [t for t in live if t.state == TrialState.COMPLETE or t.number < trial.number]
            if len(ahead) < n_trials:
                break
            time.sleep(1.0)  # earlier trials hold the last slots: wait for them to finish or fail
        rank, gamma = suggest(trial, cfg)
        result = search.evaluate(rank, gamma)
        for key, value in result.as_dict().items():
            trial.set_user_attr(key, value)
        ran += 1
        if on_trial is not None:
            on_trial(trial.number, result)
        return result.tpe

    def show(study_, trial) -> None:
        bar.n = min(_count(study_, TrialState.COMPLETE), n_trials)
        if trial.state == TrialState.COMPLETE:
            a = trial.user_attrs
            bar.set_postfix(best_tpe=f"{study_.best_value:.5f}",
                            last=f"r{a['rank']} γ{a['gamma']:.2f} ppl {a['perplexity']:.2f}")
        bar.refresh()

    try:
        with InterruptGate() as gate:
            study.optimize(objective, callbacks=[show, MaxTrialsCallback(n_trials, states=(TrialState.COMPLETE,))],
                           gc_after_trial=False)
            if gate.pending:
                raise KeyboardInterrupt
    finally:
        bar.close()
    return ran


def stop_heartbeats(timeout: float = 10.0) -> int:
    """Stop Optuna heartbeat threads still running; returns how many.

    Ctrl-C can land while Optuna is stopping a trial's heartbeat thread. The thread is not a
    daemon, so it would go on beating and the process could never exit. Its stop event is the
    last argument Optuna starts it with.
    """
    import threading

    stopped = 0
    for t in threading.enumerate():
        if getattr(getattr(t, "_target", None), "__name__", "") != "_record_heartbeat":
            continue
        for arg in getattr(t, "_args", ()):
            if isinstance(arg, threading.Event):
                arg.set()
        t.join(timeout)
        stopped += 1
    return stopped
