"""The Optuna side of the auto-optimiser: a TPE study in an RDB storage (SQLite on one
machine, PostgreSQL/MySQL across machines), shared by any number of workers.

``--trials N`` is the number of finished trials the *study* should reach: a crashed run
resumes where it stopped, and workers on one storage stop together at N. Trial 0 is the
baseline (γ = 0: θ off); for residual θ, trials 1 and 2 are γ = 1 at ranks 8 and 32
(:func:`queued_points`). A killed worker's running trial is failed by Optuna's heartbeat and
rerun with the same parameters (theta/storage.py), in the slot it held: the study still ends
with N complete trials.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import warnings
from typing import Callable

import numpy as np
import optuna
from tqdm import tqdm

from .autoopt import GAMMA_MAX, SearchConfig, ThetaSearch, TrialResult
from .storage import GRACE_FACTOR, HEARTBEAT_S

log = logging.getLogger(__name__)


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """Optuna's TPE, its random draws for trial k seeded by (seed, k).

    One TPESampler(seed) per worker would have every worker sharing a study with the same
    --seed draw the same points (seen: three workers, one set of parameters in three trials).
    Seeding by trial number, unique in the study, keeps the draws apart, and a run repeats its
    random (startup) points.
    """

    def __init__(self, seed: int, n_startup_trials: int = 4) -> None:
        self.seed = seed
        self.n_startup_trials = n_startup_trials
        self._tpe = self._for(0)

    def _for(self, number: int) -> optuna.samplers.TPESampler:
        trial_seed = int(np.random.SeedSequence([self.seed, number]).generate_state(1)[0])
        return optuna.samplers.TPESampler(seed=trial_seed, n_startup_trials=self.n_startup_trials)

    def before_trial(self, study, trial) -> None:
        self._tpe = self._for(trial.number)
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._tpe.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._tpe.reseed_rng()


def open_study(storage_url: str, study_name: str, seed: int, heartbeat_s: int = HEARTBEAT_S):
    from .storage import open_storage

    # ERROR: a trial failed by Ctrl-C is reported by us in one line, not by Optuna with a traceback
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = open_storage(storage_url, heartbeat_s, GRACE_FACTOR * heartbeat_s)
    sampler = TrialSeededTPE(seed)
    return optuna.create_study(storage=storage, study_name=study_name, direction="maximize", sampler=sampler,
                               load_if_exists=True)


def _count(study, *states) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def slot(trial) -> int:
    """The place of a trial in the study's order: its number, or for a rerun of a trial whose worker
    died, the number of that first trial (the rerun takes over the slot it held)."""
    return trial.system_attrs.get("failed_trial", trial.number)


def worker_name() -> str:
    """Which worker runs a trial (the ``worker`` attribute of each trial): host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def fail_dead_trials(study) -> None:
    """Fail the running trials whose worker stopped beating (and queue their reruns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


#: residual θ's own γ: 2·(W_ref − W_q) at 0.5·γ adds back its rank-r part (tried first at these ranks)
RESIDUAL_GAMMA = 1.0
SEEDED_RANKS = (8, 32)


def queued_points(cfg: SearchConfig) -> list[tuple[dict, dict]]:
    """The trials queued before the sampler's own, as (parameters, user attributes): the baseline
    (θ off), and for residual θ its construction's γ = 1 at ranks 8 and 32, or at the one rank
    searched (TPE's 12 quick trials drew γ far from it; docs/auto-optimizer.md)."""
    ranks = cfg.ranks
    fixed = len(ranks) == 1  # --target-rank: rank is not a parameter
    seeded = [] if cfg.theta_mode != "residual" else ranks if fixed else [r for r in SEEDED_RANKS if r in ranks]

    def point(rank: int, gamma: float) -> dict:
        return {"gamma": gamma} if fixed else {"rank": rank, "gamma": gamma}

    return [(point(ranks[0], 0.0), {"baseline": True, "queued": "baseline"})] + [
        (point(r, RESIDUAL_GAMMA), {"queued": f"γ {RESIDUAL_GAMMA} at rank {r}"}) for r in seeded]


def queued_tag(trial) -> str | None:
    """What a queued trial is (workers racing to create a study each queue them; the later copy is
    pruned): its ``queued`` attribute, or ``baseline`` for a baseline queued by an older version."""
    return trial.user_attrs.get("queued") or ("baseline" if trial.user_attrs.get("baseline") else None)


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
    waits for the trials in earlier slots (:func:`slot`) in flight, and prunes its own once they
    finished (a pruned trial is not a result). A rerun of a dead worker's trial takes that
    trial's slot, so it is never the one too many; a worker waiting behind a queued rerun
    prunes its own trial and runs the rerun. A worker whose trial was failed while it was alive
    but silent (a paused machine) drops that trial's result and goes on. Ctrl-C (through
    :class:`InterruptGate`) raises KeyboardInterrupt after Optuna failed the trial in flight, or,
    when it came between trials, before the next one (or when the study is complete).
    """
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    cfg = search.cfg
    if not study.trials:
        for params, attrs in queued_points(cfg):
            study.enqueue_trial(params, user_attrs=attrs)
    done = _count(study, TrialState.COMPLETE)
    if done >= n_trials:
        return 0
    ran = 0
    worker = worker_name()
    taken: int | None = None  # this worker's trial in flight, when another worker took it for dead
    bar = tqdm(total=n_trials, initial=done, desc="trials", unit="trial", disable=not progress)

    def objective(trial) -> float:
        nonlocal taken
        taken = None
        gate.enter()
        try:
            return measured(trial)
        finally:
            gate.leave()

    def measured(trial) -> float:
        nonlocal ran, taken
        trial.set_user_attr("worker", worker)
        while True:
            live = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING,
                                                            TrialState.WAITING))
            complete = sum(t.state == TrialState.COMPLETE for t in live)
            if complete >= n_trials:
                raise optuna.TrialPruned("the study already has its trials")
            me = next((t for t in live if t.number == trial.number), None)
            if me is None:  # failed by another worker while this one waited: it was silent too long
                taken = trial.number
                raise optuna.exceptions.UpdateFinishedTrialError(f"trial {trial.number} was failed elsewhere")
            tag = queued_tag(me)
            if tag and any(queued_tag(t) == tag and (slot(t), t.number) < (slot(me), me.number) for t in live):
                raise optuna.TrialPruned(f"another worker queued {tag} first")  # workers started together
            # the trials in slots before this one go first: two workers each waiting on the other's
            # trial would wait for ever (seen under load: both held the 8th slot of 8)
            ahead = [t for t in live
                     if t.state == TrialState.COMPLETE or (t.number != me.number and slot(t) < slot(me))]
            if len(ahead) < n_trials:
                break
            if "failed_trial" not in me.system_attrs and any(
                    t.state == TrialState.WAITING and slot(t) < slot(me) for t in live):
                # a rerun of a dead worker's trial holds an earlier slot: this worker runs it next
                log.debug("trial %d: pruned, a queued rerun holds an earlier slot", trial.number)
                raise optuna.TrialPruned("a rerun goes first")
            fail_dead_trials(study)  # a slot held by a dead worker frees after the grace period
            time.sleep(1.0)  # earlier trials hold the last slots: wait for them to finish or fail
        if "failed_trial" in me.system_attrs:
            log.warning("trial %d reruns trial %d, whose worker stopped (no heartbeat): the same parameters",
                        trial.number, me.system_attrs["failed_trial"])
        rank, gamma = suggest(trial, cfg)
        result = search.evaluate(rank, gamma)
        try:
            for key, value in result.as_dict().items():
                trial.set_user_attr(key, value)
        except optuna.exceptions.UpdateFinishedTrialError:
            taken = trial.number  # failed by another worker while this one measured (paused too long)
            raise
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
            while True:
                try:
                    study.optimize(objective, gc_after_trial=False,
                                   callbacks=[show, MaxTrialsCallback(n_trials, states=(TrialState.COMPLETE,))])
                    break
                except ValueError:  # Optuna cannot tell a trial that another worker failed
                    if taken is None:
                        raise
                    log.warning("trial %d was taken for a dead worker's (its heartbeat stopped too long) and "
                                "is rerun elsewhere: its result here is dropped", taken)
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
