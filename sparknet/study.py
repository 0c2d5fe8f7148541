"""The one Optuna layer under `sparknet.sweep` (hyperparameters) and `sparknet.ablate` (mixture weights): the only
module that imports optuna.

What both need, written once:

- Storage: SQLite (`sqlite:///lab/optuna.db`) or PostgreSQL for several machines (`open_storage`), and a per-study
  lock for the decide-and-take step (`study_lock`: a file lock for SQLite, an advisory lock in PostgreSQL), so that
  N workers never take more trials than the study wants.
- Heartbeats: a worker's trial beats every `heartbeat_s / 2`; one silent for twice `heartbeat_s` (a worker killed
  outright, a lost machine) is failed and queued again with the same parameters by any worker, and the retry
  continues the original's checkpoints.
- Interrupts: Ctrl-C or SIGTERM fails the running trial and queues it again (`Worker.abandon`); the steps that must
  not be cut in half (take a trial and start its heartbeat; record how a trial ended) run first
  (`signals_deferred`).
- The trial itself (`Worker.run_trial`): a `sparknet.run` training whose every evaluation records every source's
  held-out loss, then the objective (`sparknet.objective`) measured on the result; a pruned or diverged trial is a
  result, an error fails it with the reason (never retried: its parameters do not work), nothing is left RUNNING.
- Study-wide jobs done once whatever the number of workers (`study_job`: the summary, the confirmation run).
- What a study is (`recipe`, `identity_difference`): stored at creation, compared on every later run.

A study kind (`Sweep`, `Ablation`) is a `Worker` subclass that says which trial to take next (`take`), how a trial
becomes a config (`setup_trial`), what is reported at each evaluation (`report`) and what else a finished trial
records (`record`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from sparknet.config import RunConfig, to_dict
from sparknet.errors import SparknetError

ROOT = Path(__file__).resolve().parents[1]
# A run of trials whose config cannot be built (a sampled combination no single bound shows, e.g. a wsd schedule
# whose warmup + decay exceed the run): after this many in a row the worker stops and says so.
MAX_UNBUILDABLE_IN_A_ROW = 3
DONE = "done"  # what `Worker.take` returns when the study has every trial it wants


def quiet_optuna() -> None:
    """Optuna's per-trial INFO lines and the warnings about how we drive it, off (we print our own lines)."""
    import logging

    import optuna

    optuna.logging.set_verbosity(logging.WARNING)
    # We drive heartbeats ourselves (ask/tell under a lock, not Study.optimize), deliberately.
    warnings.filterwarnings("ignore", message="Heartbeat of storage")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


# ---------------------------------------------------------------------------------------------
# Interrupts: Ctrl-C and SIGTERM raise `Interrupted` in the main thread, except inside the few steps that must
# not be cut in half (take a trial and start its heartbeat; record how a trial ended), which run first.


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM. A KeyboardInterrupt, so `run.execute` records its run as interrupted (resumable)."""


class _Deferral(threading.local):
    depth = 0
    pending: int | None = None


_DEFER = _Deferral()


def _on_signal(signum, frame) -> None:
    if _DEFER.depth:
        _DEFER.pending = signum
        return
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def signals_deferred():
    """A signal arriving inside the block is raised when the block ends (so a study update is never half done)."""
    _DEFER.depth += 1
    try:
        yield
    finally:
        _DEFER.depth -= 1
        if not _DEFER.depth and _DEFER.pending is not None:
            signum, _DEFER.pending = _DEFER.pending, None
            raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def interrupt_handlers():
    """SIGINT and SIGTERM -> Interrupted while the study runs (main thread only; restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------------
# Storage, lock, study


def redact(url: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@]+@", r"\1:***@", url)


@contextlib.contextmanager
def study_lock(url: str, study: str):
    """Serialize the decide-and-take step of all workers of one study (and its creation)."""
    key = int.from_bytes(hashlib.sha256(study.encode()).digest()[:8], "big", signed=True)
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///") + ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    elif url.startswith("postgresql"):
        import sqlalchemy

        engine = _engine(url)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    else:  # another database: Optuna's own transactions only (a rare overshoot of one trial is possible)
        yield


_ENGINES: dict = {}


def _engine(url: str):
    import sqlalchemy

    if url not in _ENGINES:
        _ENGINES[url] = sqlalchemy.create_engine(url, pool_pre_ping=True)
    return _ENGINES[url]


def default_storage(lab: Path) -> str:
    return f"sqlite:///{(lab / 'optuna.db').resolve()}"


def open_storage(url: str, heartbeat_s: int):
    import optuna

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        with study_lock(url, "__storage__"):  # table creation on a fresh database must not race
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
                engine_kwargs={"pool_pre_ping": True})
    except SparknetError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise SparknetError(f"--storage {redact(url)}: cannot open the Optuna storage ({first}) (fix: start the "
                            f"database, e.g. bash lab/postgres.sh, check the URL, or use the default "
                            f"sqlite:///lab/optuna.db)") from None


def tpe_sampler(seed: int, n_startup_trials: int):
    import optuna

    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)


def median_pruner(n_startup_trials: int, n_warmup_steps: int):
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps)


def fixed_sampler_and_no_pruner():
    """For studies whose trials are all enqueued (an ablation's design points): nothing is sampled (a random
    sampler, the cheapest, is never asked for a value) and nothing is pruned (every point is a measurement)."""
    import optuna

    return optuna.samplers.RandomSampler(seed=0), optuna.pruners.NopPruner()


def create_study(name: str, storage, sampler, pruner):
    """Create the study, or load it when it exists (call under `study_lock`)."""
    import optuna

    return optuna.create_study(study_name=name, storage=storage, direction="minimize", sampler=sampler,
                               pruner=pruner, load_if_exists=True)


def find_study(name: str, storage):
    """The study if it exists (without creating it), else None."""
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


def load_study(name: str, url: str):
    import optuna

    return optuna.load_study(study_name=name, storage=url)


# ---------------------------------------------------------------------------------------------
# Trials


class TrialPruned(Exception):
    """Raised from the training's evaluation hook; `execute` ends the MLflow run as KILLED / pruned."""

    run_status = "KILLED"
    state_status = "pruned"


def start_heartbeat(storage, trial_id: int, every_s: float) -> threading.Event:
    stop = threading.Event()

    def beat():
        while not stop.wait(every_s):
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # the database blinked: the next beat retries
                pass

    storage.record_heartbeat(trial_id)
    threading.Thread(target=beat, daemon=True, name=f"heartbeat-{trial_id}").start()
    return stop


def eval_index(tokens: int, every_tokens: int) -> int:
    """The pruning step of an evaluation: which `every_tokens` boundary it is (0 for the first), from the tokens
    trained, so a trial resumed from a checkpoint reports at the same steps as one that ran through."""
    return tokens // every_tokens - 1


def requeue(study, frozen, *, keep_attrs: tuple[str, ...] = ("baseline", "val_loss_by_eval")) -> None:
    """Queue trial `frozen` again with the same parameters, as Optuna's heartbeat retry does: `failed_trial` names
    the original, whose run folder (and checkpoints) the retry continues. An interrupt is counted in its own list,
    `interrupt_history`, not in Optuna's `retry_history`: that one is the stale-heartbeat retry budget
    (`max_retry`), and a trial stopped and resumed three times with Ctrl-C must still be retried if its worker dies."""
    import optuna

    system = dict(frozen.system_attrs)
    system.setdefault("failed_trial", frozen.number)
    system["interrupt_history"] = [*system.get("interrupt_history", []), frozen.number]
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=frozen.params, distributions=frozen.distributions,
        user_attrs={k: v for k, v in frozen.user_attrs.items() if k in keep_attrs}, system_attrs=system))


def enqueue(study, params: dict[str, Any], user_attrs: dict[str, Any] | None = None) -> None:
    """A trial whose parameters are fixed (the baseline of a sweep, a design point of an ablation)."""
    study.enqueue_trial(params, user_attrs=user_attrs, skip_if_exists=False)


def counts(study) -> dict[str, int]:
    from collections import Counter

    return Counter(t.state.name for t in study.get_trials(deepcopy=False))


def finished_trials(study) -> list:
    return [t for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED")]


def complete_trials(study) -> list:
    return [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]


def fail_stale_trials(study) -> None:
    """Trials whose worker stopped beating: failed, and queued again by Optuna's retry callback."""
    import optuna

    optuna.storages.fail_stale_trials(study)


def running_without_heartbeat(storage, study) -> list[int]:
    """RUNNING trials of the study with no heartbeat row (Optuna's tables; [] if they ever change shape)."""
    import sqlalchemy

    query = sqlalchemy.text("SELECT t.trial_id FROM trials t LEFT JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
                            "WHERE t.study_id = :study AND t.state = 'RUNNING' AND h.trial_id IS NULL")
    try:
        with storage.engine.connect() as conn:
            return [row[0] for row in conn.execute(query, {"study": study._study_id})]
    except Exception:  # another schema: only this rare orphan goes unrescued, as in Optuna itself
        return []


def tell(study, trial, value: float | None = None, *, state: str | None = None) -> None:
    """Record how a trial ended: a value (COMPLETE), or state "PRUNED" / "FAIL"."""
    import optuna

    if state is None:
        study.tell(trial, value)
    else:
        study.tell(trial, state=optuna.trial.TrialState[state])


def optuna_plots(study, out_dir: Path, metric: str) -> list[Path]:
    """Optuna's own views of a sweep: optimization history, parameter importance, parallel coordinates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    made = []
    for name, fn in (("optimization_history", ovm.plot_optimization_history),
                     ("param_importances", ovm.plot_param_importances),
                     ("parallel_coordinate", ovm.plot_parallel_coordinate)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study, target_name=metric)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(9, 5)
            fig.tight_layout()
            fig.savefig(out_dir / f"{name}.png", dpi=100)
            plt.close(fig)
            made.append(out_dir / f"{name}.png")
        except Exception as exc:  # e.g. importances need >= 2 complete trials with varying params
            print(f"note: no {name} plot ({type(exc).__name__}: {str(exc)[:100]})", file=sys.stderr)
    return made


# ---------------------------------------------------------------------------------------------
# What a study is: stored once, compared on every later run


def portable(d: Any) -> Any:
    """Paths inside the repo made relative to it: workers on machines with the checkout elsewhere agree."""
    if isinstance(d, dict):
        return {k: portable(v) for k, v in d.items()}
    if isinstance(d, list):
        return [portable(v) for v in d]
    if isinstance(d, str) and d.startswith(str(ROOT) + os.sep):
        return os.path.relpath(d, ROOT)
    return d


def recipe(cfg: RunConfig) -> dict[str, str]:
    """The flattened recipe that every trial starts from: what is trained (mixture, tokenizer, model, the train
    keys that are part of a run's identity) and how it is scored (eval.val_tokens). Operational keys (lab_dir,
    device, micro_batch_size, tracking, ...) may differ between workers."""
    from sparknet.run import run_identity  # the run's own definition of what changes what is trained
    from sparknet.tracking import flatten

    d = portable(to_dict(cfg))
    return flatten(run_identity(d) | {"eval": {"val_tokens": d["eval"]["val_tokens"]}})


def common_identity(kind: str, proxy_tokens: int, objective, base: RunConfig, mixture: str,
                    overrides: list[str]) -> dict[str, Any]:
    """The study user attrs every kind stores (compared: kind, proxy_tokens, objective, recipe, objective_data;
    for the record: mixture path and hash, overrides, model)."""
    rec = recipe(base)
    mixture_part = {k: v for k, v in rec.items() if k.startswith(("mixture.", "tokenizer."))}
    data = objective.data(base)
    return {
        "sparknet.kind": kind,
        "sparknet.proxy_tokens": proxy_tokens,
        "sparknet.objective": objective.name,
        "sparknet.recipe": rec,
        "sparknet.objective_data": {k: data[k] for k in ("sha256", "rows")} if data else {},
        "sparknet.mixture": str(mixture),
        "sparknet.mixture_sha256": hashlib.sha256(json.dumps(mixture_part, sort_keys=True).encode()).hexdigest(),
        "sparknet.overrides": list(overrides),
        "sparknet.model": {k.removeprefix("model."): v for k, v in rec.items() if k.startswith("model.")},
    }


def kind_difference(stored: dict[str, Any], now: dict[str, Any]) -> str | None:
    # Studies from before the kind was stored are sweeps (the only kind there was).
    old = stored.get("sparknet.kind", "sweep" if stored.get("sparknet.space") is not None else None)
    if old is not None and old != now["sparknet.kind"]:
        return (f"it is a{'n' if old[0] in 'aeiou' else ''} {old} study (python -m sparknet.{old}), this command runs "
                f"a{'n' if now['sparknet.kind'][0] in 'aeiou' else ''} {now['sparknet.kind']}")
    return None


def budget_objective_difference(stored: dict[str, Any], now: dict[str, Any]) -> str | None:
    if "sparknet.proxy_tokens" in stored and stored["sparknet.proxy_tokens"] != now["sparknet.proxy_tokens"]:
        return (f"its proxy budget is {stored['sparknet.proxy_tokens']:,} tokens, this command asks for "
                f"{now['sparknet.proxy_tokens']:,} (--proxy-tokens)")
    if "sparknet.objective" in stored and stored["sparknet.objective"] != now["sparknet.objective"]:
        return f"it minimizes {stored['sparknet.objective']}, this command asks for {now['sparknet.objective']} (--objective)"
    return None


def recipe_difference(stored: dict[str, Any], now: dict[str, Any]) -> str | None:
    old_rec = stored.get("sparknet.recipe")
    if old_rec is not None:
        new_rec = now["sparknet.recipe"]
        for key in [*old_rec, *(k for k in new_rec if k not in old_rec)]:
            if old_rec.get(key) != new_rec.get(key):
                return (f"its recipe has {key}={old_rec.get(key, '(unset)')}, this command gives "
                        f"{key}={new_rec.get(key, '(unset)')} (the mixture file or a key=value override)")
    old_data, new_data = stored.get("sparknet.objective_data"), now["sparknet.objective_data"]
    if old_data and new_data and old_data != new_data:
        return (f"its WikiText-2 validation text has sha256 {old_data['sha256'][:12]}, this one "
                f"{new_data['sha256'][:12]} (eval.wikitext_path or $SPARKNET_WIKITEXT)")
    return None


def store_identity(study, identity: dict[str, Any]) -> None:
    """Set the identity attrs the study lacks or holds differently (a new study, or one from before a key was
    stored); call after the difference check, under the lock."""
    stored = study.user_attrs
    for key, value in identity.items():
        if stored.get(key) != value:
            study.set_user_attr(key, value)


# ---------------------------------------------------------------------------------------------
# Study-wide jobs


@contextlib.contextmanager
def study_job(worker, study, name: str, key: Any):
    """Claim the study-wide job `name` (the summary, the confirmation) for `key` (what it is done for). Yields
    "mine" (this worker does it; a heartbeat keeps the claim alive, done is recorded at the end, a failure or an
    interrupt releases it), "done" (already done for this key) or the worker id of the one doing it now. The
    claim is taken under the study lock, so with N workers exactly one does the job."""
    attr = f"sparknet.job.{name}"
    stale_s = 2 * worker.heartbeat_s
    with signals_deferred(), study_lock(worker.storage_url, worker.study_name):
        c = study.user_attrs.get(attr)
        if c and c.get("key") == key and c.get("done"):
            state = "done"
        elif c and not c.get("done") and c.get("by") != worker.worker and time.time() - c.get("beat", 0) < stale_s:
            state = c["by"]
        else:
            state = "mine"
            study.set_user_attr(attr, {"key": key, "by": worker.worker, "beat": time.time(), "done": False})
    if state != "mine":
        yield state
        return
    stop = threading.Event()

    def beat():
        while not stop.wait(max(1.0, worker.heartbeat_s / 2)):
            with contextlib.suppress(Exception):  # a blink of the database: the next beat retries
                study.set_user_attr(attr, {"key": key, "by": worker.worker, "beat": time.time(), "done": False})

    thread = threading.Thread(target=beat, daemon=True, name=f"job-{name}")
    thread.start()
    done = False
    try:
        yield "mine"
        done = True
    finally:
        stop.set()
        thread.join()
        with signals_deferred():
            study.set_user_attr(attr, {"key": key, "by": worker.worker, "beat": time.time() if done else 0,
                                       "done": done})


# ---------------------------------------------------------------------------------------------
# A worker of a study


class Worker:
    """The loop and the trial that sweeps and ablations share. A subclass (a dataclass) has the attributes
    `study_name`, `storage_url`, `heartbeat_s`, `timeout_s`, `progress`, `objective`, `worker` and implements
    `take`, `setup_trial` and `unbuildable_fix`; `report` and `record` are optional."""

    # User attrs a trial queued again after an interrupt keeps (the run continues, so does its curve).
    requeue_keep: tuple[str, ...] = ("val_loss_by_eval",)

    # -- what a kind says ------------------------------------------------------------------------

    def take(self, study):
        """Under the study lock: the trial to run next (study.ask()), None to wait for trials running elsewhere,
        or DONE when the study has every trial it wants."""
        raise NotImplementedError

    def setup_trial(self, study, trial, frozen, origin: int) -> RunConfig:
        """The trial's config (print what it is); a SparknetError means its parameters cannot work."""
        raise NotImplementedError

    def report(self, trial, index: int, tokens: int, val: dict[str, float]) -> None:
        """At evaluation `index` (not the final one), with every source's held-out loss: report, maybe prune."""

    def trial_tags(self, trial) -> dict[str, str]:
        return {}

    def record(self, trial, out, metrics: dict[str, float], cfg: RunConfig) -> None:
        """Anything else a completed trial keeps (user attrs), before it is told."""

    def unbuildable_fix(self) -> str:
        raise NotImplementedError

    # -- the loop --------------------------------------------------------------------------------

    def work(self, study, storage, poll_s: float = 2.0) -> bool:
        """Take trials until the study has all it wants (True) or the timeout passes (False)."""
        deadline = time.time() + self.timeout_s if self.timeout_s else math.inf
        parent = study.user_attrs.get("mlflow_parent_run_id")
        unbuildable = 0
        while time.time() < deadline:
            trial = stop = None
            try:
                # Decide, take and start the heartbeat as one step: an interrupt waits for it, so a trial is never
                # RUNNING without a heartbeat (nothing would ever fail it).
                with signals_deferred():
                    with study_lock(self.storage_url, self.study_name):
                        for orphan in running_without_heartbeat(storage, study):
                            # Its worker died between taking it and its first beat (before this lock was released):
                            # one beat now, so that it goes stale after the grace period and is retried like the rest.
                            storage.record_heartbeat(orphan)
                        fail_stale_trials(study)  # a killed worker's trial: failed, then retried
                        trial = self.take(study)
                        if trial == DONE:
                            return True
                        if trial is not None:
                            # Its first beat before the lock is released: Optuna never fails a RUNNING trial that has
                            # no heartbeat at all, so a worker killed right after ask() would strand it forever.
                            storage.record_heartbeat(trial._trial_id)
                    if trial is not None:
                        stop = start_heartbeat(storage, trial._trial_id, max(1.0, self.heartbeat_s / 2))
            except KeyboardInterrupt:
                if trial is not None and trial != DONE:
                    if stop is not None:
                        stop.set()
                    self.abandon(study, trial, "interrupted before it started; queued again", retry=True)
                raise
            if trial is None:  # the last trials are running elsewhere: wait for them (they may die)
                time.sleep(poll_s)
                continue
            try:
                how = self.run_trial(study, trial, parent)
            finally:
                stop.set()
            if how == "busy":  # its run trains in another process: give that one time before taking the next
                time.sleep(poll_s)
            unbuildable = unbuildable + 1 if how == "unbuildable" else 0
            if unbuildable >= MAX_UNBUILDABLE_IN_A_ROW:
                raise SparknetError(f"study {self.study_name}: {unbuildable} trials in a row had parameters the "
                                    f"config rejects (see their reasons in the table: the last is trial "
                                    f"{trial.number}) (fix: {self.unbuildable_fix()})")
        print(f"timeout: stopping after {self.timeout_s:.0f} s; rerun the same command to continue", flush=True)
        return False

    def abandon(self, study, trial, reason: str, *, retry: bool) -> None:
        """Mark a trial failed with its reason (and queue it again when `retry`): never left RUNNING. With a retry
        both happen under the study lock, so no other worker decides in between on a study short of that trial."""
        with signals_deferred():
            with study_lock(self.storage_url, self.study_name) if retry else contextlib.nullcontext():
                if study._storage.get_trial(trial._trial_id).state.is_finished():
                    return  # failed as stale by another worker meanwhile (and queued again by Optuna's retry)
                trial.set_user_attr("reason", reason[:1000])
                tell(study, trial, state="FAIL")
                if retry:
                    requeue(study, study._storage.get_trial(trial._trial_id), keep_attrs=self.requeue_keep)

    def run_trial(self, study, trial, parent_run_id: str | None) -> str:
        """Train one trial and tell the study how it ended. Returns "complete", "pruned" or "unbuildable"
        (its parameters make no valid config: failed, the worker goes on); an interrupt fails it and queues it
        again (then re-raises); any other error fails it with the reason (then re-raises)."""
        from optuna.exceptions import UpdateFinishedTrialError

        from sparknet.run import RunBusy, execute  # execute looked up per trial: tests replace it
        from sparknet.train import Diverged

        objective = self.objective
        frozen = study._storage.get_trial(trial._trial_id)
        origin = frozen.system_attrs.get("failed_trial", trial.number)
        started = time.perf_counter()
        stage = "building its config"
        orphaned: list[int] = []  # non-empty once another worker has failed this trial as stale
        if origin != trial.number:
            copy = next((t.number for t in complete_trials(study) if t.system_attrs.get("completed_for") == origin),
                        None)
            if copy is not None:  # its original was thought dead, lived on and recorded its result
                self.abandon(study, trial, f"a duplicate, not run: the run of trial {origin} finished, recorded as "
                                           f"trial {copy}", retry=False)
                return "duplicate"
        try:
            cfg = self.setup_trial(study, trial, frozen, origin)
            every = cfg.eval.every_tokens
            curve = dict(frozen.user_attrs.get("val_loss_by_eval", {}))

            def on_eval(tokens: int, val: dict[str, float]) -> None:
                if tokens >= cfg.mixture.total_tokens:  # the final evaluation is the result, not a report
                    return
                index = eval_index(tokens, every)
                curve[str(index)] = val  # every source's loss: the study can be re-read against any objective
                if orphaned:
                    return
                try:
                    trial.set_user_attr("val_loss_by_eval", curve)
                    self.report(trial, index, tokens, val)
                except UpdateFinishedTrialError:
                    # Another worker failed this trial as stale (this process was stopped or cut off from the
                    # storage for longer than the grace period) while it still trains: the run goes on (its folder is
                    # locked, so the retry did not train it twice) and its result is recorded as a copy at the end.
                    orphaned.append(index)
                    print(f"trial {trial.number}: failed as stale by another worker while still training here; "
                          f"training on, the result will be recorded as a copy", flush=True)

            tags = {"sparknet.study": self.study_name, "sparknet.trial": str(trial.number),
                    "sparknet.objective": objective.name} | self.trial_tags(trial)
            stage = "training"
            out = execute(cfg, progress=self.progress, parent_run_id=parent_run_id, on_eval=on_eval, extra_tags=tags)
            stage = f"measuring {objective.metric}"
            metrics = objective.measure(out, cfg)
        except (TrialPruned, Diverged) as exc:  # a bad config is a result: recorded, and the study goes on
            if study._storage.get_trial(trial._trial_id).state.is_finished():  # failed as stale meanwhile
                print(f"trial {trial.number} diverged after another worker failed it as stale: {exc}", flush=True)
                return "pruned"
            with signals_deferred():
                trial.set_user_attr("reason", str(exc)[:1000])
                tell(study, trial, state="PRUNED")
            print(f"trial {trial.number} pruned: {exc}", flush=True)
            return "pruned"
        except KeyboardInterrupt as exc:
            why = exc.args[0] if isinstance(exc, Interrupted) and exc.args else "Ctrl-C"
            self.abandon(study, trial, f"interrupted by {why} while {stage}; queued again with the same parameters "
                         f"(the next run continues its checkpoints)", retry=True)
            print(f"trial {trial.number}: interrupted by {why}; queued again (rerun to continue it)", flush=True)
            raise
        except RunBusy as exc:
            # The run this trial would train is training in another process: the trial it retries was failed as
            # stale while its worker lives on. Not run twice: failed, and that worker records the result.
            self.abandon(study, trial, f"not run: {exc}", retry=False)
            print(f"trial {trial.number} not run: {exc}", flush=True)
            return "busy"
        except SparknetError as exc:
            self.abandon(study, trial, f"{stage}: {exc}", retry=False)
            if stage == "building its config":  # these parameters cannot work: the next trial may
                print(f"trial {trial.number} failed: {exc}", flush=True)
                return "unbuildable"
            raise SparknetError(f"trial {trial.number} failed while {stage} (recorded as failed, not retried): "
                                f"{exc}") from None
        except BaseException as exc:
            self.abandon(study, trial, f"{stage}: {type(exc).__name__}: {exc}", retry=False)
            raise
        value = metrics[objective.metric]
        if out.mlflow_run_id and cfg.tracking.enabled:
            self._log_to_child(cfg, out.mlflow_run_id, metrics)
        with signals_deferred():
            target = trial
            now = study._storage.get_trial(trial._trial_id)
            if orphaned or now.state.is_finished():
                target = _CompleteCopy(now, curve)
            target.set_user_attr("val_loss", {k: float(v) for k, v in out.result["val_loss"].items()})
            if "wikitext-valid/bpb" in metrics:
                target.set_user_attr("wikitext_valid_bpb", metrics["wikitext-valid/bpb"])
            target.set_user_attr("mlflow_run_id", out.mlflow_run_id or "")
            target.set_user_attr("run_dir", str(out.run_dir))
            target.set_user_attr("seconds", out.result["seconds"])  # training (steps, evaluations, checkpoints)
            self.record(target, out, metrics, cfg)
            target.set_user_attr("wall_seconds", time.perf_counter() - started)  # everything, setup and logging too
            if target is trial:
                tell(study, trial, value)
            else:
                with study_lock(self.storage_url, self.study_name):
                    # Between the end of the run (its folder unlocked) and here, another worker may have taken the
                    # run again and found it finished: then it is recorded already, and once is enough.
                    twin = next((t.number for t in complete_trials(study)
                                 if t.user_attrs.get("run_dir") == str(out.run_dir)), None)
                    number = target.add_to(study, value) if twin is None else twin
                print(f"trial {trial.number} was failed as stale by another worker while it trained here: its "
                      f"result is recorded as trial {number}" + (", a complete copy" if twin is None else ""),
                      flush=True)
        print(f"trial {trial.number} complete: {objective.metric} {value:.4f}", flush=True)
        return "complete"

    def _log_to_child(self, cfg: RunConfig, run_id: str, metrics: dict[str, float]) -> None:
        """The objective's own number on the trial's MLflow run (the run itself logs only val/loss)."""
        from sparknet.tracking import log_to_run, resolve_uri

        extra = {k: v for k, v in metrics.items() if not k.startswith("val/")}
        if not extra:  # the held-out losses are the run's own metrics already
            return
        try:
            log_to_run(resolve_uri(cfg.tracking.uri, cfg.lab_path), run_id, extra,
                       tags={"sparknet.tuned_on": self.objective.tuned_on} if self.objective.tuned_on else None,
                       timeout_s=cfg.tracking.timeout_s)
        except SparknetError as exc:  # the study holds the value; MLflow missing it is not worth a failed trial
            print(f"warning: {exc}", file=sys.stderr, flush=True)


class _CompleteCopy:
    """A finished trial's result, recorded as a new COMPLETE trial with the same parameters: for a trial that another
    worker failed as stale while this one still trained it (a finished trial cannot change its state). It takes
    `set_user_attr` as a trial does, so `Worker.record` fills it the same way."""

    def __init__(self, frozen, curve: dict[str, Any]):
        self.frozen = frozen
        self.user_attrs = dict(frozen.user_attrs, val_loss_by_eval=curve)
        self.user_attrs.pop("reason", None)  # the stale failure's reason is the original's, not this result's
        self.number = frozen.number

    def set_user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = value

    def add_to(self, study, value: float) -> int:
        import optuna

        # `completed_for`: the trial the chain of retries started from, so that a retry of it taken later is known as
        # a duplicate (Worker.run_trial).
        system = dict(self.frozen.system_attrs,
                      completed_for=self.frozen.system_attrs.get("failed_trial", self.frozen.number))
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE, value=value, params=self.frozen.params,
            distributions=self.frozen.distributions, user_attrs=self.user_attrs, system_attrs=system,
            intermediate_values={int(k): v for k, v in self.frozen.intermediate_values.items()}))
        return study.get_trials(deepcopy=False)[-1].number


def parse_budget(args, example: str) -> tuple[int, float | None]:
    """The options every study command shares, checked: (proxy tokens per trial, --timeout in seconds or None).
    `example` is the --proxy-tokens value the fix suggests (e.g. "20M")."""
    from sparknet.config import parse_tokens

    if args.heartbeat < 1:
        raise SparknetError(f"--heartbeat: must be >= 1 second, got {args.heartbeat}")
    try:
        proxy = parse_tokens(args.proxy_tokens)
    except ValueError as exc:
        raise SparknetError(f"--proxy-tokens: {exc} (fix: use e.g. {example})") from None
    if proxy <= 0:
        raise SparknetError(f"--proxy-tokens: must be > 0 (fix: use e.g. {example})")
    return proxy, parse_duration(args.timeout)


def parse_duration(text: str | None) -> float | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise SparknetError(f"--timeout: {text!r} is not a duration (fix: use e.g. 8h, 30m, 90s)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def parse_study_name(name: str) -> str:
    # It is also the trials' MLflow experiment, whose names the config limits to 64 characters.
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        raise SparknetError(f"--study: {name!r} is not a safe name (fix: at most 64 letters, digits, '.', '_', '-')")
    return name


def markdown_table(df, formats: dict[str, str] | None = None) -> str:
    """A pandas frame as a markdown table: floats to 4 significant digits unless `formats` says otherwise."""
    formats = formats or {}

    def cell(col: str, v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, float):
            return format(v, formats.get(col, ".4g"))
        if isinstance(v, int) and not isinstance(v, bool) and col in formats:
            return format(v, formats[col])
        return str(v).replace("|", "/")

    cols = list(map(str, df.columns))
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)
    return head + "".join("\n| " + " | ".join(cell(c, v) for c, v in zip(cols, row)) + " |"
                          for row in df.itertuples(index=False))
