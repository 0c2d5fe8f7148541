"""Optuna for the studies (`sparknet.study`): the storage, the per-study lock, trials and their heartbeats, through
Optuna's public API only. The only module that imports optuna.

- Storage: SQLite (`sqlite:///lab/optuna.db`) or PostgreSQL for several machines (`open_storage`), and a per-study
  lock for the decide-and-take step (`study_lock`: a file lock for SQLite, an advisory lock in PostgreSQL), so that
  N workers never take more trials than the study wants.
- Trial ids: Optuna's storage addresses a trial by its id, a study hands out numbers; `TrialIds` maps one to the
  other with the storage's own public lookups (`get_study_id_from_name`, `get_trial_id_from_study_id_trial_number`).
- Heartbeats: a worker's trial beats every `heartbeat_s / 2`; one silent for twice `heartbeat_s` (a worker killed
  outright, a lost machine) is failed and queued again with the same parameters (`fail_stale_trials`, Optuna's
  retry callback). Optuna never fails a RUNNING trial that has no heartbeat at all, so every trial's first beat is
  marked (`first_beat`) and a RUNNING trial without the mark gets one beat from the next worker (`rescue_unbeaten`).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import sys
import threading
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from sparknet.errors import SparknetError
from sparknet.locks import exclusive

# A trial's system attr: the number of the trial whose worker gave it its first heartbeat. Optuna's retry copies
# every system attr into the retry (another number), so a retry without a beat of its own is still told apart.
FIRST_BEAT = "sparknet.first_beat"


def quiet_optuna() -> None:
    """Optuna's per-trial INFO lines and the warnings about how we drive it, off (we print our own lines)."""
    import logging

    import optuna

    optuna.logging.set_verbosity(logging.WARNING)
    # We drive heartbeats ourselves (ask/tell under a lock, not Study.optimize), deliberately.
    warnings.filterwarnings("ignore", message="Heartbeat of storage")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def redact(url: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@]+@", r"\1:***@", url)


# ---------------------------------------------------------------------------------------------
# Storage and lock


@contextlib.contextmanager
def study_lock(url: str, study: str):
    """Serialize the decide-and-take step of all workers of one study (and its creation)."""
    if url.startswith("sqlite:///"):
        with exclusive(Path(url.removeprefix("sqlite:///") + ".lock")):
            yield
    elif url.startswith("postgresql"):
        import sqlalchemy

        key = int.from_bytes(hashlib.sha256(study.encode()).digest()[:8], "big", signed=True)
        with _engine(url).connect() as conn:
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
    """The lab's own study database."""
    return f"sqlite:///{(lab / 'optuna.db').resolve()}"


def check_sqlite_folder(url: str) -> None:
    """A SQLite storage's folder must exist (`study_settings` makes the lab's, for the default storage): a typo in
    --storage must not create a new, empty study database somewhere else, even at the filesystem root."""
    path = Path(url.removeprefix("sqlite:///"))
    if not str(path) or path.is_dir():
        raise SparknetError(f"--storage {url}: names a folder, not a database file (fix: sqlite:///lab/optuna.db)")
    if not path.parent.is_dir():
        raise SparknetError(f"--storage {url}: the folder {path.parent} does not exist (fix: create it, or correct the "
                            f"path; the default is sqlite:///<lab>/optuna.db)")


def check_storage_url(url: str) -> None:
    """Before anything is prepared: a URL SQLAlchemy can parse, of a database it has a driver for, and for SQLite a
    folder that exists. Cheap (nothing is connected), so a typo costs no tokenization first."""
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        sqlalchemy.engine.make_url(url).get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise SparknetError(f"--storage {redact(url)}: not a database URL SQLAlchemy can use ({exc}) (fix: "
                            f"sqlite:///lab/optuna.db, or postgresql://USER@HOST/DB with the postgres extra)") from None
    except ImportError as exc:  # the dialect is known, its driver is not installed
        raise SparknetError(f"--storage {redact(url)}: its database driver is not installed ({exc}) (fix: "
                            f"pip install -e '.[postgres]' for PostgreSQL)") from None
    if url.startswith("sqlite:///"):
        check_sqlite_folder(url)


def open_storage(url: str, heartbeat_s: int):
    import optuna

    if url.startswith("sqlite:///"):
        check_sqlite_folder(url)
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


# ---------------------------------------------------------------------------------------------
# Trials


def update_finished_trial_error() -> type[Exception]:
    """Optuna's error for a change to a trial that is finished already (e.g. failed as stale by another worker)."""
    from optuna.exceptions import UpdateFinishedTrialError

    return UpdateFinishedTrialError


class TrialIds:
    """Trial numbers (what a study and its trials show) to the storage's trial ids (what its methods take)."""

    def __init__(self, storage, study):
        self.storage = storage
        self.study_id = storage.get_study_id_from_name(study.study_name)
        self._ids: dict[int, int] = {}

    def __call__(self, number: int) -> int:
        if number not in self._ids:
            self._ids[number] = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
        return self._ids[number]

    def frozen(self, number: int):
        """The trial as the storage holds it now (state, params, attrs, intermediate values)."""
        return self.storage.get_trial(self(number))


def enqueue(study, params: dict[str, Any], user_attrs: dict[str, Any] | None = None) -> None:
    """A trial whose parameters are fixed (the baseline of a sweep, a design point of an ablation)."""
    study.enqueue_trial(params, user_attrs=user_attrs, skip_if_exists=False)


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


def add_complete(study, frozen, value: float, user_attrs: dict[str, Any], system_attrs: dict[str, Any]) -> int:
    """A new COMPLETE trial with `frozen`'s parameters and curve, `value` and these attrs; returns its number."""
    import optuna

    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.COMPLETE, value=value, params=frozen.params,
        distributions=frozen.distributions, user_attrs=user_attrs, system_attrs=system_attrs,
        intermediate_values={int(k): v for k, v in frozen.intermediate_values.items()}))
    return study.get_trials(deepcopy=False)[-1].number


def counts(study) -> dict[str, int]:
    return Counter(t.state.name for t in study.get_trials(deepcopy=False))


def finished_trials(study) -> list:
    import optuna

    TrialState = optuna.trial.TrialState
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def complete_trials(study) -> list:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def tell(study, trial, value: float | None = None, *, state: str | None = None) -> None:
    """Record how a trial ended: a value (COMPLETE), or state "PRUNED" / "FAIL"."""
    import optuna

    if state is None:
        study.tell(trial, value)
    else:
        study.tell(trial, state=optuna.trial.TrialState[state])


# ---------------------------------------------------------------------------------------------
# Heartbeats


def first_beat(ids: TrialIds, number: int) -> None:
    """A trial's first heartbeat, then the mark that it has one (in this order: a worker killed in between leaves a
    beating trial without the mark, which only earns it one more beat)."""
    trial_id = ids(number)
    ids.storage.record_heartbeat(trial_id)
    ids.storage.set_trial_system_attr(trial_id, FIRST_BEAT, number)


def rescue_unbeaten(study, ids: TrialIds) -> None:
    """Under the study lock: RUNNING trials that never had a heartbeat (their worker died between taking one and its
    first beat, or something took one outside a worker) get one now, so that they go stale after the grace period and
    are retried like the rest. Workers take a trial and beat it under the same lock, so none is caught half-way."""
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.system_attrs.get(FIRST_BEAT) != t.number:
            first_beat(ids, t.number)


def fail_stale_trials(study) -> None:
    """Trials whose worker stopped beating: failed, and queued again by Optuna's retry callback."""
    import optuna

    optuna.storages.fail_stale_trials(study)


def start_heartbeat(ids: TrialIds, number: int, every_s: float) -> threading.Event:
    """Beat trial `number` every `every_s` seconds in a thread until the returned event is set."""
    stop = threading.Event()
    trial_id = ids(number)

    def beat():
        while not stop.wait(every_s):
            try:
                ids.storage.record_heartbeat(trial_id)
            except Exception:  # the database blinked: the next beat retries
                pass

    ids.storage.record_heartbeat(trial_id)
    threading.Thread(target=beat, daemon=True, name=f"heartbeat-{trial_id}").start()
    return stop


# ---------------------------------------------------------------------------------------------
# Plots


def optuna_plots(study, out_dir: Path, metric: str) -> list[Path]:
    """Optuna's own views of a sweep: optimization history, parameter importance, parallel coordinates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    from sparknet.study_files import save_figure

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
            made.append(save_figure(fig, out_dir / f"{name}.png", dpi=100))
            plt.close(fig)
        except Exception as exc:  # e.g. importances need >= 2 complete trials with varying params
            print(f"note: no {name} plot ({type(exc).__name__}: {str(exc)[:100]})", file=sys.stderr)
    return made
