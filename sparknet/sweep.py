"""python -m sparknet.sweep: Optuna over the secondary hyperparameters, resumable and multi-machine.

    python -m sparknet.sweep [--mixture M.yaml] [--space experiments/S.yaml] [--trials 20] [--timeout 8h]
                             [--proxy-tokens 50M] [--study NAME] [--storage URL] [--confirm] [key=value ...]

The only module that imports optuna. Each trial is a `sparknet.run` training at the proxy budget (the same
cached token stores, schedules scaled by their fractions), reporting the mean held-out loss at
`eval_points` evaluations so the median pruner can stop bad trials. The first trial is the mixture's own
config (the baseline). Trailing key=value overrides apply to every trial (e.g. model.preset=cpu-small).

Exactly N finished trials, with any number of workers: a worker takes a trial only while
finished + running < N, deciding under a per-study lock (a file lock for SQLite, a PostgreSQL advisory
lock for a shared database), so two workers never overshoot. A worker killed mid-trial leaves its trial
RUNNING; its heartbeat stops, and after the grace period any worker (or the same command rerun) marks it
failed and retries it with the same parameters, resuming the trial's own checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import re
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparknet.config import ConfigError, RunConfig, load_config, to_dict
from sparknet.errors import SparknetError, cli_main

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MIXTURE = "mixtures/codelion_502030.yaml"
DEFAULT_SPACE = "experiments/default_space.yaml"
_SPACE_KEYS = {"objective", "eval_points", "params", "sampler", "pruner"}


# ---------------------------------------------------------------------------------------------
# The search space


@dataclass(frozen=True)
class Dim:
    key: str  # a config key (train.lr, mixture.sources.dclm.weight) or train.min_lr_ratio
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple = ()


@dataclass(frozen=True)
class Space:
    path: str
    dims: tuple[Dim, ...]
    objective: str = "val/loss"
    eval_points: int = 5
    sampler: dict = field(default_factory=dict)
    pruner: dict = field(default_factory=dict)


def load_space(path: str | Path, mixture: str | Path, base_overrides: list[str]) -> Space:
    """Read and check a space file; every error names the file and the key, before any trial runs."""
    where = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise SparknetError(f"{where}: no such space file (fix: pass --space experiments/default_space.yaml "
                            f"or write one like it)") from None
    except yaml.YAMLError as exc:
        raise SparknetError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None

    def fail(key: str, reason: str, fix: str) -> None:
        raise SparknetError(f"{where}: {key}: {reason} (fix: {fix})")

    if not isinstance(raw, dict):
        fail("<top level>", "must be a mapping", "see experiments/default_space.yaml")
    for key in raw:
        if key not in _SPACE_KEYS:
            fail(str(key), "unknown key", f"use one of {', '.join(sorted(_SPACE_KEYS))}")
    if raw.get("objective", "val/loss") != "val/loss":
        fail("objective", f"{raw['objective']!r} is not supported", "use val/loss (mean held-out loss)")
    eval_points = raw.get("eval_points", 5)
    if not isinstance(eval_points, int) or isinstance(eval_points, bool) or not 1 <= eval_points <= 100:
        fail("eval_points", f"must be an integer in [1, 100], got {eval_points!r}", "use e.g. 5")
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        fail("params", "must map config keys to ranges", "e.g. train.lr: {low: 1e-4, high: 3e-3, log: true}")
    dims = []
    for key, spec in params.items():
        at = f"params.{key}"
        if not isinstance(spec, dict):
            fail(at, "must be a mapping", "use {low: .., high: ..} or {choices: [..]}")
        unknown = set(spec) - {"low", "high", "log", "type", "choices", "step"}
        if unknown:
            fail(at, f"unknown field {sorted(unknown)[0]!r}", "use low, high, log, type or choices")
        if "choices" in spec:
            choices = spec["choices"]
            if not isinstance(choices, list) or not choices:
                fail(at, "choices must be a non-empty list", "e.g. choices: [8, 16, 24]")
            dim = Dim(key, choices=tuple(choices))
            probe = [choices[0]]
        else:
            try:
                low, high = float(spec["low"]), float(spec["high"])
            except (KeyError, TypeError, ValueError):
                fail(at, "needs numeric low and high", "e.g. {low: 1e-4, high: 3e-3}")
            if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
                fail(at, f"low {low:g} must be below high {high:g}", "swap or widen the range")
            log = bool(spec.get("log", False))
            if log and low <= 0:
                fail(at, f"a log range needs low > 0, got {low:g}", "use a positive low, e.g. 1e-5")
            integer = spec.get("type", "float") == "int"
            if spec.get("type", "float") not in ("int", "float"):
                fail(at, f"type {spec['type']!r} is not int or float", "use type: int or type: float")
            dim = Dim(key, low, high, log, integer)
            probe = [low, high]
        # Each value must be one the config accepts: reuse the config's own checks and messages.
        for value in probe:
            try:
                _config_for(mixture, base_overrides, {key: value})
            except ConfigError as exc:
                fail(at, f"value {value!r} is rejected by the config: {exc}", "change the range")
        dims.append(dim)
    sampler, pruner = raw.get("sampler", {}) or {}, raw.get("pruner", {}) or {}
    for name, section, allowed in (("sampler", sampler, {"seed", "n_startup_trials"}),
                                   ("pruner", pruner, {"n_startup_trials", "n_warmup_steps"})):
        if not isinstance(section, dict) or set(section) - allowed:
            fail(name, f"allowed fields are {', '.join(sorted(allowed))}", "see experiments/default_space.yaml")
        for k, v in section.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                fail(f"{name}.{k}", f"must be a non-negative integer, got {v!r}", "use e.g. 3")
    return Space(str(path), tuple(dims), "val/loss", eval_points, dict(sampler), dict(pruner))


def _config_for(mixture: str | Path, base_overrides: list[str], params: dict[str, Any],
                extra: list[str] = ()) -> RunConfig:
    """The run config of a trial: mixture + user overrides + the sweep's settings + the trial's params."""
    params = dict(params)
    ratio = params.pop("train.min_lr_ratio", None)
    overrides = [*base_overrides, *extra, *(f"{k}={json.dumps(v)}" for k, v in params.items())]
    if ratio is None and "train.lr" in params and "train.min_lr" not in params:
        # A searched peak LR keeps the recipe's final/peak ratio (CodeLion: 5e-5 / 5e-4 = 0.1).
        base = load_config(mixture, list(base_overrides)).train
        ratio = base.min_lr / base.lr
    if ratio is not None:
        lr = params["train.lr"] if "train.lr" in params else load_config(mixture, list(base_overrides)).train.lr
        overrides.append(f"train.min_lr={float(ratio) * float(lr)!r}")
    return load_config(mixture, overrides)


def baseline_params(cfg: RunConfig, space: Space) -> dict[str, Any]:
    """The mixture's own values of the searched keys: the first trial."""
    d = to_dict(cfg)
    out = {}
    for dim in space.dims:
        if dim.key == "train.min_lr_ratio":
            out[dim.key] = cfg.train.min_lr / cfg.train.lr
            continue
        node: Any = d
        for part in dim.key.split("."):
            if isinstance(node, list):
                node = next(x for x in node if x.get("name") == part)
            else:
                node = node[part]
        out[dim.key] = node
    return out


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


# ---------------------------------------------------------------------------------------------
# Trials


class TrialPruned(Exception):
    """Raised from the training's evaluation hook; `execute` ends the MLflow run as KILLED / pruned."""

    run_status = "KILLED"
    state_status = "pruned"


def _heartbeat(storage, trial_id: int, every_s: float) -> threading.Event:
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


def suggest(trial, space: Space) -> dict[str, Any]:
    out = {}
    for d in space.dims:
        if d.choices:
            out[d.key] = trial.suggest_categorical(d.key, list(d.choices))
        elif d.integer:
            out[d.key] = trial.suggest_int(d.key, int(d.low), int(d.high), log=d.log)
        else:
            out[d.key] = trial.suggest_float(d.key, d.low, d.high, log=d.log)
    return out


@dataclass
class Sweep:
    mixture: str
    space: Space
    base_overrides: list[str]
    n_trials: int
    proxy_tokens: int
    study_name: str
    storage_url: str
    timeout_s: float | None
    heartbeat_s: int
    progress: bool = False

    def trial_extra(self) -> list[str]:
        every = max(1, self.proxy_tokens // self.space.eval_points)
        return [f"mixture.total_tokens={self.proxy_tokens}", f"eval.every_tokens={every}", "eval.wikitext=[]",
                f"tracking.experiment={self.study_name}"]

    def run_trial(self, study, trial, parent_run_id: str | None) -> None:
        """Train one trial and tell the study how it ended (complete, pruned with a reason, or failed)."""
        import optuna

        from sparknet.run import execute
        from sparknet.train import Diverged

        params = suggest(trial, self.space)
        # One run folder (and MLflow child run) per trial; a retried trial continues its original's run,
        # checkpoints included.
        origin = study._storage.get_trial(trial._trial_id).system_attrs.get("failed_trial", trial.number)
        cfg = _config_for(self.mixture, self.base_overrides, params,
                          [*self.trial_extra(), f"name={self.study_name[:48]}-t{origin}"])
        reports = []

        def on_eval(tokens: int, val: dict[str, float]) -> None:
            value = float(sum(val.values()) / len(val))
            if tokens >= cfg.mixture.total_tokens:  # the final evaluation is the result, not a report
                return
            # Step = the evaluation's index: the same points in every trial (same proxy budget and cadence).
            trial.report(value, step=len(reports))
            reports.append(value)
            if trial.should_prune():
                raise TrialPruned(f"pruned at {tokens:,} tokens: val/loss {value:.4f} is worse than the median of "
                                  f"earlier trials at this point")

        started = time.perf_counter()
        tags = {"sparknet.study": self.study_name, "sparknet.trial": str(trial.number)}
        print(f"trial {trial.number}: {', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in params.items())}",
              flush=True)
        try:
            out = execute(cfg, progress=self.progress, parent_run_id=parent_run_id, on_eval=on_eval, extra_tags=tags)
        except TrialPruned as exc:
            trial.set_user_attr("reason", str(exc))
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            print(f"trial {trial.number}: {exc}", flush=True)
            return
        except Diverged as exc:  # a bad config is a result: recorded, and the sweep goes on
            trial.set_user_attr("reason", str(exc))
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            print(f"trial {trial.number}: {exc}", flush=True)
            return
        except BaseException as exc:
            trial.set_user_attr("reason", f"{type(exc).__name__}: {exc}"[:1000])
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        val = out.result["val_loss"]
        value = float(sum(val.values()) / len(val))
        trial.set_user_attr("mlflow_run_id", out.mlflow_run_id or "")
        trial.set_user_attr("run_dir", str(out.run_dir))
        trial.set_user_attr("seconds", out.result["seconds"])  # training (steps, evaluations, checkpoints)
        trial.set_user_attr("wall_seconds", time.perf_counter() - started)  # everything, setup and logging too
        study.tell(trial, value)
        print(f"trial {trial.number}: val/loss {value:.4f}", flush=True)


def _counts(study) -> dict[str, int]:
    from collections import Counter

    return Counter(t.state.name for t in study.get_trials(deepcopy=False))


def make_sampler(space: Space, offset: int):
    import optuna

    return optuna.samplers.TPESampler(seed=space.sampler.get("seed", 42) + offset,
                                      n_startup_trials=space.sampler.get("n_startup_trials", 5))


def create_or_load(sweep: Sweep, storage, lab: Path):
    """The study (created once, under the lock), with the baseline enqueued and the MLflow parent run."""
    import optuna

    space = sweep.space
    sampler = make_sampler(space, 0)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=space.pruner.get("n_startup_trials", 3),
                                         n_warmup_steps=space.pruner.get("n_warmup_steps", 1))
    with study_lock(sweep.storage_url, sweep.study_name):
        study = optuna.create_study(study_name=sweep.study_name, storage=storage, direction="minimize",
                                    sampler=sampler, pruner=pruner, load_if_exists=True)
        attrs = study.user_attrs
        if "sparknet.space" in attrs and attrs["sparknet.space"] != [d.key for d in space.dims]:
            raise SparknetError(f"--study {sweep.study_name}: exists with parameters {attrs['sparknet.space']} "
                                f"(fix: use another --study name for this space)")
        if not study.trials:
            base = _config_for(sweep.mixture, sweep.base_overrides, {})
            study.enqueue_trial(baseline_params(base, space), user_attrs={"baseline": True})
            study.set_user_attr("sparknet.space", [d.key for d in space.dims])
            study.set_user_attr("sparknet.proxy_tokens", sweep.proxy_tokens)
            study.set_user_attr("sparknet.mixture", str(sweep.mixture))
        if "mlflow_parent_run_id" not in study.user_attrs:
            study.set_user_attr("mlflow_parent_run_id", _start_parent(sweep, lab))
    return study


def _parent_tracker(sweep: Sweep, lab: Path):
    """The tracker of the sweep's MLflow parent run (None when the mixture turns tracking off)."""
    from sparknet.tracking import open_tracker

    cfg = _config_for(sweep.mixture, sweep.base_overrides, {})
    if not cfg.tracking.enabled:
        return None
    return open_tracker(True, cfg.tracking.uri, sweep.study_name, lab, _sweep_dir(lab, sweep.study_name),
                        timeout_s=cfg.tracking.timeout_s)


def _start_parent(sweep: Sweep, lab: Path) -> str | None:
    tracker = _parent_tracker(sweep, lab)
    if tracker is None:
        return None
    params = {"study": sweep.study_name, "storage": redact(sweep.storage_url), "trials": str(sweep.n_trials),
              "proxy_tokens": str(sweep.proxy_tokens), "space": str(sweep.space.path),
              "space.params": ",".join(d.key for d in sweep.space.dims), "mixture": str(sweep.mixture),
              "sampler.seed": str(sweep.space.sampler.get("seed", 42))}
    return tracker.start(params, {"sparknet.study": sweep.study_name, "sparknet.kind": "sweep"},
                         run_name=f"sweep {sweep.study_name}")


def _sweep_dir(lab: Path, study: str) -> Path:
    d = lab / "sweeps" / study
    d.mkdir(parents=True, exist_ok=True)
    return d


def work(sweep: Sweep, study, storage, poll_s: float = 2.0) -> None:
    """Take trials until the study has `n_trials` finished ones (or the timeout passes)."""
    import optuna

    deadline = time.time() + sweep.timeout_s if sweep.timeout_s else math.inf
    parent = study.user_attrs.get("mlflow_parent_run_id")
    while time.time() < deadline:
        with study_lock(sweep.storage_url, sweep.study_name):
            optuna.storages.fail_stale_trials(study)  # a killed worker's trial: failed, then retried
            c = _counts(study)
            finished = c["COMPLETE"] + c["PRUNED"]
            if finished >= sweep.n_trials:
                return
            trial = None
            if finished + c["RUNNING"] < sweep.n_trials:
                # Reseed by the trial count: reproducible for one worker, and two workers (same seed)
                # never draw the same "random" startup trial.
                study.sampler = make_sampler(sweep.space, sum(c.values()))
                trial = study.ask()
        if trial is None:  # the last trials are running elsewhere: wait for them (they may die)
            time.sleep(poll_s)
            continue
        stop = _heartbeat(storage, trial._trial_id, max(1.0, sweep.heartbeat_s / 2))
        try:
            sweep.run_trial(study, trial, parent)
        finally:
            stop.set()
    print(f"timeout: stopping after {sweep.timeout_s:.0f} s; rerun the same command to continue", flush=True)


# ---------------------------------------------------------------------------------------------
# The end: summary, best config, plots, MLflow parent


def summary_frame(study):
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"trial": t.number, "state": t.state.name, "val_loss": t.value,
                     **{k: v for k, v in t.params.items()},
                     "baseline": bool(t.user_attrs.get("baseline")),
                     "seconds": t.user_attrs.get("seconds"),
                     "note": t.user_attrs.get("reason", "")[:70]})
    df = pd.DataFrame(rows)
    return df.sort_values(["val_loss", "trial"], na_position="last").reset_index(drop=True) if len(df) else df


def markdown_table(df) -> str:
    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "/")

    head = "| " + " | ".join(map(str, df.columns)) + " |\n|" + "---|" * len(df.columns)
    return head + "".join("\n| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False))


def finish(sweep: Sweep, study, lab: Path, confirm: bool) -> dict:
    """Print the table, write experiments/<study>/ (best config, summary, plots), close the parent run."""
    import optuna

    df = summary_frame(study)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise SparknetError(f"study {sweep.study_name}: no trial completed (fix: widen the space or raise "
                            f"--proxy-tokens; see the trials' notes with --trials {sweep.n_trials})")
    best = study.best_trial
    baseline = next((t for t in done if t.user_attrs.get("baseline")), None)
    out_dir = Path("experiments") / sweep.study_name  # relative to where the sweep runs (the repo, normally)
    out_dir.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(df.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    if baseline is not None:
        gain = baseline.value - best.value
        print(f"best: trial {best.number} val/loss {best.value:.4f}; baseline (trial {baseline.number}) "
              f"{baseline.value:.4f}: {gain:+.4f} nats ({gain / baseline.value:+.2%})")
    full = _config_for(sweep.mixture, sweep.base_overrides, best.params)
    overrides = {k: v for k, v in best.params.items()}
    (out_dir / "best_overrides.yaml").write_text(
        f"# best trial {best.number} of study {sweep.study_name}: val/loss {best.value:.4f} at {sweep.proxy_tokens:,} "
        f"tokens\n" + yaml.safe_dump(overrides, sort_keys=True))
    (out_dir / "best.yaml").write_text(
        f"# The best config of study {sweep.study_name} at the mixture's full budget.\n"
        f"# Train it: python -m sparknet.run {out_dir / 'best.yaml'}\n"
        + yaml.safe_dump({k: v for k, v in to_dict(full).items()}, sort_keys=False))
    df.to_csv(out_dir / "trials.csv", index=False)
    (out_dir / "README.md").write_text(
        f"# Sweep {sweep.study_name}\n\nQuestion: best {', '.join(d.key for d in sweep.space.dims)} for "
        f"`{sweep.mixture}` at a {sweep.proxy_tokens:,}-token proxy budget.\n\n"
        f"Command: `python -m sparknet.sweep --mixture {sweep.mixture} --space {sweep.space.path} --trials "
        f"{sweep.n_trials} --proxy-tokens {sweep.proxy_tokens} --study {sweep.study_name} --storage "
        f"{redact(sweep.storage_url)}{' ' + ' '.join(sweep.base_overrides) if sweep.base_overrides else ''}`\n\n"
        f"MLflow experiment: `{sweep.study_name}` (parent run {study.user_attrs.get('mlflow_parent_run_id')}).\n\n"
        + markdown_table(df) + "\n\n"
        + (f"Best: trial {best.number}, val/loss {best.value:.4f}"
           + (f"; baseline {baseline.value:.4f} ({baseline.value - best.value:+.4f} nats)." if baseline else ".")
           + " Full-budget config: `best.yaml`.\n"))
    plots = _plots(study, out_dir)
    _close_parent(sweep, study, lab, out_dir, plots, best, baseline)
    summary = {"best_trial": best.number, "best_value": best.value, "best_params": best.params,
               "baseline_value": baseline.value if baseline else None, "dir": str(out_dir)}
    if confirm:
        from sparknet.run import execute

        print(f"confirming trial {best.number}'s config at the full budget ({full.mixture.total_tokens:,} tokens)")
        out = execute(full, parent_run_id=study.user_attrs.get("mlflow_parent_run_id"),
                      extra_tags={"sparknet.study": sweep.study_name, "sparknet.confirm": "true"})
        summary["confirm"] = out.result
    return summary


def _plots(study, out_dir: Path) -> list[Path]:
    import warnings

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
                ax = fn(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(9, 5)
            fig.tight_layout()
            fig.savefig(out_dir / f"{name}.png", dpi=100)
            plt.close(fig)
            made.append(out_dir / f"{name}.png")
        except Exception as exc:  # e.g. importances need >= 2 complete trials with varying params
            print(f"note: no {name} plot ({type(exc).__name__}: {str(exc)[:100]})", file=sys.stderr)
    return made


def _close_parent(sweep: Sweep, study, lab: Path, out_dir: Path, plots: list[Path], best, baseline) -> None:
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    tracker = _parent_tracker(sweep, lab) if run_id else None
    if tracker is None:
        return
    tracker.start({}, {}, run_name="", resume_run_id=run_id)
    c = _counts(study)
    tracker.log_metrics({"best_val_loss": best.value, "trials_complete": c["COMPLETE"],
                         "trials_pruned": c["PRUNED"], "trials_failed": c["FAIL"]}
                        | ({"baseline_val_loss": baseline.value} if baseline else {}), len(study.trials))
    for p in [*plots, out_dir / "trials.csv", out_dir / "best.yaml", out_dir / "best_overrides.yaml",
              out_dir / "README.md"]:
        tracker.log_artifact(p)
    tracker.set_tags({"sparknet.best_trial": str(best.number)})
    tracker.end("FINISHED")


# ---------------------------------------------------------------------------------------------


def parse_duration(text: str | None) -> float | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise SparknetError(f"--timeout: {text!r} is not a duration (fix: use e.g. 8h, 30m, 90s)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


@cli_main
def main(argv: list[str] | None = None) -> int:
    from sparknet.config import parse_tokens

    ap = argparse.ArgumentParser(prog="python -m sparknet.sweep", description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="*", help="key=value overrides applied to every trial")
    ap.add_argument("--mixture", default=DEFAULT_MIXTURE, help=f"mixture YAML (default {DEFAULT_MIXTURE})")
    ap.add_argument("--space", default=DEFAULT_SPACE, help=f"search space YAML (default {DEFAULT_SPACE})")
    ap.add_argument("--trials", type=int, default=20, help="finished trials the study should end with (default 20)")
    ap.add_argument("--timeout", default=None, help="stop taking trials after this long, e.g. 8h (default: none)")
    ap.add_argument("--proxy-tokens", default="50M", help="training tokens per trial (default 50M)")
    ap.add_argument("--study", default=None, help="study name (default: <mixture>-<space>)")
    ap.add_argument("--storage", default=None,
                    help="SQLAlchemy URL (default sqlite:///<lab>/optuna.db; postgresql://... for several machines)")
    ap.add_argument("--heartbeat", type=int, default=60,
                    help="seconds between trial heartbeats; a trial silent for twice this is failed and retried")
    ap.add_argument("--confirm", action="store_true", help="then train the best config at the full budget")
    ap.add_argument("--progress", action="store_true", help="progress bars for each trial")
    args = ap.parse_args(argv)
    if args.trials < 1:
        raise SparknetError(f"--trials: must be >= 1, got {args.trials}")
    if args.heartbeat < 1:
        raise SparknetError(f"--heartbeat: must be >= 1 second, got {args.heartbeat}")
    try:
        proxy = parse_tokens(args.proxy_tokens)
    except ValueError as exc:
        raise SparknetError(f"--proxy-tokens: {exc} (fix: use e.g. 50M)") from None
    if proxy <= 0:
        raise SparknetError("--proxy-tokens: must be > 0 (fix: use e.g. 50M)")
    timeout = parse_duration(args.timeout)
    # The defaults live in the repo: found from any working directory.
    mixture = args.mixture if Path(args.mixture).exists() or args.mixture != DEFAULT_MIXTURE else str(ROOT / DEFAULT_MIXTURE)
    if args.space == DEFAULT_SPACE and not Path(args.space).exists():
        args.space = str(ROOT / DEFAULT_SPACE)
    base = load_config(mixture, args.overrides)  # bad mixture/overrides fail here, before anything starts
    space = load_space(args.space, mixture, args.overrides)
    lab = base.lab_path
    study_name = args.study or f"{base.name}-{Path(args.space).stem}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", study_name):
        raise SparknetError(f"--study: {study_name!r} is not a safe name (fix: letters, digits, '.', '_', '-')")
    url = args.storage or f"sqlite:///{(lab / 'optuna.db').resolve()}"
    sweep = Sweep(mixture, space, list(args.overrides), args.trials, proxy, study_name, url, timeout,
                  args.heartbeat, args.progress)
    import logging

    import optuna

    optuna.logging.set_verbosity(logging.WARNING)
    # We drive heartbeats ourselves (ask/tell under a lock, not Study.optimize), deliberately.
    warnings.filterwarnings("ignore", message="Heartbeat of storage")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = open_storage(url, args.heartbeat)
    study = create_or_load(sweep, storage, lab)
    c = _counts(study)
    print(f"study {study_name} at {redact(url)}: {c['COMPLETE'] + c['PRUNED']} of {args.trials} trials finished, "
          f"{c['RUNNING']} running; proxy budget {proxy:,} tokens", flush=True)
    work(sweep, study, storage)
    c = _counts(study)
    if c["COMPLETE"] + c["PRUNED"] < args.trials:
        return 0  # timed out: the rerun continues
    finish(sweep, study, lab, args.confirm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
