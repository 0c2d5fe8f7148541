"""python -m sparknet.sweep: Optuna over the secondary hyperparameters, resumable and multi-machine.

    python -m sparknet.sweep [--mixture M.yaml] [--space experiments/S.yaml] [--objective val] [--trials 20]
                             [--timeout 8h] [--proxy-tokens 50M] [--study NAME] [--storage URL] [--confirm]
                             [key=value ...]

Built on `sparknet.study`, the Optuna layer it shares with `sparknet.ablate` (the only module importing optuna).
Each trial is a `sparknet.run` training at the proxy budget (the same cached token stores, schedules scaled by their
fractions), reporting the objective's intermediate value at
`eval_points` evaluations so the median pruner can stop bad trials; what is minimized comes from
`sparknet.objective` (val, val/<source>, wikitext-valid). The first trial is the mixture's own config (the
baseline). Trailing key=value overrides apply to every trial (e.g. model.preset=cpu-small).

The space is checked whole before anything starts: every bound and choice goes through the config's own
checks, and the baseline's values must lie inside what is searched. A study remembers what it is (proxy budget,
objective, space, recipe, overrides): rerunning `--study NAME` with other settings is an error naming the
difference, not a study that silently mixes two questions.

Exactly N finished trials, with any number of workers: a worker takes a trial only while
finished + running < N, deciding under a per-study lock (a file lock for SQLite, a PostgreSQL advisory
lock for a shared database), so two workers never overshoot. No trial is left RUNNING by anything this process
sees: an error marks it failed with the reason (never retried: its parameters do not work); Ctrl-C or SIGTERM
marks it failed and queues it again with the same parameters, so the next run continues its checkpoints. A worker
killed outright (SIGKILL, a lost machine) stops its heartbeat; after the grace period any worker (or the same
command rerun) fails and retries the trial the same way. Pruning steps are evaluation indices derived from the
tokens trained, so a resumed trial reports at the same points as the others. When the study is complete, one
worker (a study-wide claim, taken under the lock and kept alive by a heartbeat) writes the summary and runs
`--confirm`; the others say who does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import socket
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparknet.config import ConfigError, RunConfig, load_config, read_yaml, to_dict
from sparknet.errors import SparknetError, cli_main
from sparknet.objective import Objective
from sparknet.study import (
    DONE,
    TrialPruned,
    Worker,
    budget_objective_difference,
    common_identity,
    complete_trials,
    counts,
    create_study,
    default_storage,
    enqueue,
    finished_trials,
    interrupt_handlers,
    kind_difference,
    markdown_table,
    median_pruner,
    open_storage,
    optuna_plots,
    parse_budget,
    parse_study_name,
    quiet_optuna,
    recipe_difference,
    redact,
    signals_deferred,
    store_identity,
    study_job,
    study_lock,
    tpe_sampler,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MIXTURE = "mixtures/codelion_502030.yaml"
DEFAULT_SPACE = "experiments/default_space.yaml"
_SPACE_KEYS = {"objective", "eval_points", "params", "sampler", "pruner"}
_DIM_FIELDS = ("low", "high", "log", "type", "choices")
MIN_LR_RATIO = "train.min_lr_ratio"  # a pseudo-key of the space: min_lr = ratio x lr; never written as a config key


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

    def spec(self) -> dict[str, Any]:
        """The dimension as the space file says it (what a study stores and compares)."""
        if self.choices:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "log": self.log, "type": "int" if self.integer else "float"}


@dataclass(frozen=True)
class Space:
    path: str
    dims: tuple[Dim, ...]
    objective: str = "val"  # the space file's default; --objective wins
    eval_points: int = 5
    sampler: dict = field(default_factory=dict)
    pruner: dict = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """What makes two spaces the same question: the dimensions and the pruning points."""
        return {"params": {d.key: d.spec() for d in self.dims}, "eval_points": self.eval_points}


def _field_type(key: str) -> Any:
    """The Python type of config key `key` (int, float, bool, str, a Literal), or None when it names no field
    (the config's own check then says so). List items are addressed by name: mixture.sources.<name>.weight."""
    if key == MIN_LR_RATIO:
        return float
    cls: Any = RunConfig
    parts = key.split(".")
    i = 0
    while i < len(parts):
        hints = typing.get_type_hints(cls)
        if parts[i] not in hints:
            return None
        tp = hints[parts[i]]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if typing.get_origin(tp) is tuple:
            inner = typing.get_args(tp)[0]
            if not hasattr(inner, "__dataclass_fields__"):
                return None
            cls, i = inner, i + 2  # skip the item's name
            continue
        if hasattr(tp, "__dataclass_fields__"):
            cls, i = tp, i + 1
            continue
        return tp if i == len(parts) - 1 else None
    return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _same_value(a: Any, b: Any) -> bool:
    """Equal as config values: 16 == 16.0, but true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def load_space(path: str | Path, mixture: str | Path, base_overrides: list[str]) -> Space:
    """Read and check a space file; every error names the file and the key, before any trial runs."""
    from sparknet.run import config_hash

    where = str(path)

    def fail(key: str, reason: str, fix: str) -> typing.NoReturn:
        raise SparknetError(f"{where}: {key}: {reason} (fix: {fix})")

    if not Path(path).is_file():
        raise SparknetError(f"{where}: no such space file (fix: pass --space experiments/default_space.yaml "
                            f"or write one like it)")
    raw = read_yaml(Path(path))  # a ConfigError naming the file and line for bad YAML or a key given twice
    if not isinstance(raw, dict):
        fail("<top level>", "must be a mapping", "see experiments/default_space.yaml")
    for key in raw:
        if key not in _SPACE_KEYS:
            fail(str(key), "unknown key", f"use one of {', '.join(sorted(_SPACE_KEYS))}")
    objective = raw.get("objective", "val")
    if not isinstance(objective, str):
        fail("objective", f"must be a name, got {objective!r}", "use val, val/<source> or wikitext-valid")
    eval_points = raw.get("eval_points", 5)
    if not isinstance(eval_points, int) or isinstance(eval_points, bool) or not 1 <= eval_points <= 100:
        fail("eval_points", f"must be an integer in [1, 100], got {eval_points!r}", "use e.g. 5")
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        fail("params", "must map config keys to ranges", "e.g. train.lr: {low: 1e-4, high: 3e-3, log: true}")
    base = _config_for(mixture, base_overrides, {})
    base_values = _values_of(base, [str(k) for k in params])
    dims = []
    for key, spec in params.items():
        key = str(key)
        at = f"params.{key}"
        if not isinstance(spec, dict):
            fail(at, "must be a mapping", "use {low: .., high: ..} or {choices: [..]}")
        unknown = [k for k in spec if k not in _DIM_FIELDS]
        if unknown:
            fail(at, f"unknown field {unknown[0]!r}", f"use {', '.join(_DIM_FIELDS)} (a grid: choices: [..])")
        if key == "mixture.total_tokens":
            fail(at, "is the proxy budget of every trial", "use --proxy-tokens, or search something else")
        if key == "train.min_lr" and "train.lr" in params:
            fail(at, "searched together with train.lr, trials would break min_lr <= lr",
                 f"search {MIN_LR_RATIO} (min_lr = ratio x lr) instead")
        ftype = _field_type(key)
        if "choices" in spec:
            choices = spec["choices"]
            if set(spec) != {"choices"}:
                fail(at, f"choices cannot be combined with {sorted(set(spec) - {'choices'})[0]}",
                     "give either choices or low/high")
            if not isinstance(choices, list) or len(choices) < 2:
                fail(at, "choices must be a list of at least two values", "e.g. choices: [98304, 122880, 245760]")
            for c in choices:
                if not isinstance(c, (str, bool, int, float)) or (isinstance(c, float) and not math.isfinite(c)):
                    fail(at, f"choice {c!r} is not a number, string or boolean", "list plain values")
            if len({json.dumps(c) for c in choices}) < len(choices):
                fail(at, "a choice is listed twice", "list each value once")
            dim = Dim(key, choices=tuple(choices))
            probes = list(choices)  # every value, not only the first: any of them may be drawn
        else:
            low, high = spec.get("low"), spec.get("high")
            if not (_is_number(low) and _is_number(high)):
                fail(at, f"needs numeric low and high, got low={low!r} high={high!r}", "e.g. {low: 1e-4, high: 3e-3}")
            if low >= high:
                fail(at, f"low {low:g} must be below high {high:g}", "swap or widen the range")
            log = spec.get("log", False)
            if not isinstance(log, bool):  # YAML's "false" (quoted) is a string, and bool("false") is True
                fail(at, f"log must be true or false, got {log!r}", "write log: true or log: false, unquoted")
            if log and low <= 0:
                fail(at, f"a log range needs low > 0, got {low:g}", "use a positive low, e.g. 1e-5")
            kind = spec.get("type", "float")
            if kind not in ("int", "float"):
                fail(at, f"type {kind!r} is not int or float", "use type: int or type: float")
            integer = kind == "int"
            if integer and not (float(low).is_integer() and float(high).is_integer()):
                fail(at, f"type int needs whole-number bounds, got low={low!r} high={high!r}",
                     "use whole numbers, or type: float")
            if ftype is int and not integer:
                fail(at, "is a whole number in the config, but this range would draw fractions",
                     "add type: int, or use choices")
            if ftype is not None and ftype not in (int, float):
                fail(at, f"is not a number in the config ({getattr(ftype, '__name__', ftype)})", "use choices: [..]")
            if integer:
                low, high = int(low), int(high)
            dim = Dim(key, float(low) if not integer else low, float(high) if not integer else high, log, integer)
            probes = [low, high]
        # Each value must be one the config accepts: reuse the config's own checks and messages.
        hashes = set()
        for value in probes:
            try:
                cfg = _config_for(mixture, base_overrides, {key: value})
            except ConfigError as exc:
                fail(at, f"value {value!r} is rejected by the config: {exc}", "change the range")
            hashes.add(config_hash(cfg))
        if key != MIN_LR_RATIO and len(hashes) < 2:
            # Left out of the run's identity: where the run lives, how the batch is split, what is logged.
            fail(at, "does not change what is trained (it is operational, not part of the recipe)",
                 "search a recipe key, e.g. train.batch_tokens for the global batch")
        # Trial 0 is the mixture's own config: its values must be ones the study can hold.
        v = base_values[key]
        if dim.choices and not any(_same_value(v, c) for c in dim.choices):
            fail(at, f"the mixture's own value {v!r} (trial 0, the baseline) is not among the choices "
                 f"{list(dim.choices)}", f"add {v!r} to the choices")
        if not dim.choices and not (_is_number(v) and dim.low <= v <= dim.high):
            fail(at, f"the mixture's own value {v!r} (trial 0, the baseline) is outside [{dim.low:g}, {dim.high:g}]",
                 "widen the range to include it, or change the mixture")
        if dim.integer and not float(v).is_integer():
            fail(at, f"the mixture's own value {v!r} (trial 0, the baseline) is not a whole number", "use type: float")
        dims.append(dim)
    sampler, pruner = raw.get("sampler", {}) or {}, raw.get("pruner", {}) or {}
    for name, section, allowed in (("sampler", sampler, {"seed", "n_startup_trials"}),
                                   ("pruner", pruner, {"n_startup_trials", "n_warmup_steps"})):
        if not isinstance(section, dict) or set(section) - allowed:
            fail(name, f"allowed fields are {', '.join(sorted(allowed))}", "see experiments/default_space.yaml")
        for k, v in section.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                fail(f"{name}.{k}", f"must be a non-negative integer, got {v!r}", "use e.g. 3")
    return Space(str(path), tuple(dims), objective, eval_points, dict(sampler), dict(pruner))


def trial_overrides(mixture: str | Path, base_overrides: list[str], params: dict[str, Any]) -> dict[str, Any]:
    """The config keys a trial sets on top of the mixture and the user's overrides: its params, with the
    pseudo-key train.min_lr_ratio turned into train.min_lr, and train.min_lr following a searched train.lr (the
    recipe's final/peak ratio is kept: CodeLion 5e-5 / 5e-4 = 0.1)."""
    out = {k: v for k, v in params.items() if k != MIN_LR_RATIO}
    ratio = params.get(MIN_LR_RATIO)
    if ratio is None and "train.lr" not in params:
        return out
    base = load_config(mixture, list(base_overrides)).train
    lr = float(params.get("train.lr", base.lr))
    if ratio is None:
        if "train.min_lr" in params or lr == base.lr:  # the recipe's own min_lr stands as it is (no rounding)
            return out
        ratio = base.min_lr / base.lr
    out["train.min_lr"] = float(ratio) * lr
    return out


def overrides_args(mapping: dict[str, Any]) -> list[str]:
    """`key=value` arguments that set each key of `mapping` (as `sparknet.run MIXTURE key=value ...` reads them)."""
    return [f"{k}={json.dumps(v)}" for k, v in mapping.items()]


def _parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """The user's `key=value` overrides as a mapping, values read as the config reads them (YAML scalars)."""
    out: dict[str, Any] = {}
    for text in overrides:
        key, _, value = text.partition("=")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def _config_for(mixture: str | Path, base_overrides: list[str], params: dict[str, Any],
                extra: list[str] = ()) -> RunConfig:
    """The run config of a trial: mixture + user overrides + the sweep's settings + the trial's params."""
    return load_config(mixture, [*base_overrides, *extra,
                                 *overrides_args(trial_overrides(mixture, base_overrides, params))])


_SHAPE_KEYS = ("model.n_layer", "model.n_head", "model.n_embd", "model.n_positions")  # ModelConfig.shape()'s order


def _values_of(cfg: RunConfig, keys: list[str]) -> dict[str, Any]:
    d = to_dict(cfg)
    out = {}
    for key in keys:
        if key == MIN_LR_RATIO:
            out[key] = cfg.train.min_lr / cfg.train.lr
            continue
        node: Any = d
        for part in key.split("."):
            if isinstance(node, list):
                node = next((x for x in node if isinstance(x, dict) and x.get("name") == part), None)
            elif isinstance(node, dict):
                node = node.get(part)
            else:
                node = None
        if node is None and key in _SHAPE_KEYS:  # unset: the preset's value is what the mixture trains
            node = cfg.model.shape()[_SHAPE_KEYS.index(key)]
        out[key] = node
    return out


def baseline_params(cfg: RunConfig, space: Space) -> dict[str, Any]:
    """The mixture's own values of the searched keys: the first trial."""
    return _values_of(cfg, [d.key for d in space.dims])


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


def _pretty(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


@dataclass
class Sweep(Worker):
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
    objective: Objective | None = None
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    requeue_keep = ("baseline", "val_loss_by_eval")

    def __post_init__(self):
        if self.objective is None:
            base = load_config(self.mixture, list(self.base_overrides))
            self.objective = Objective.parse(self.space.objective, [s.name for s in base.mixture.sources])

    def trial_extra(self) -> list[str]:
        every = max(1, self.proxy_tokens // self.space.eval_points)
        return [f"mixture.total_tokens={self.proxy_tokens}", f"eval.every_tokens={every}", "eval.wikitext=[]",
                f"tracking.experiment={self.study_name}"]

    def trial_config(self, params: dict[str, Any], origin: int) -> RunConfig:
        # One run folder (and MLflow child run) per trial; a retried trial continues its original's run.
        return _config_for(self.mixture, self.base_overrides, params,
                           [*self.trial_extra(), f"name={self.study_name[:48]}-t{origin}"])

    # -- the shared worker's hooks (sparknet.study.Worker) ---------------------------------------

    def take(self, study):
        """A new trial while finished + running < N (a queued one first: the baseline, a retry), else wait."""
        c = counts(study)
        finished = c["COMPLETE"] + c["PRUNED"]
        if finished >= self.n_trials:
            return DONE
        if finished + c["RUNNING"] >= self.n_trials:
            return None
        # Reseed by the trial count: reproducible for one worker, and two workers (same seed) never draw the same
        # "random" startup trial.
        study.sampler = make_sampler(self.space, sum(c.values()))
        return study.ask()

    def setup_trial(self, study, trial, frozen, origin: int) -> RunConfig:
        params = suggest(trial, self.space)
        print(f"trial {trial.number}: {_pretty(params)}" + (f" (retry of trial {origin})" if origin != trial.number
                                                             else ""), flush=True)
        return self.trial_config(params, origin)

    def report(self, trial, index: int, tokens: int, val: dict[str, float]) -> None:
        value = self.objective.intermediate(val)
        trial.report(value, step=index)
        if trial.should_prune():
            raise TrialPruned(f"pruned at {tokens:,} tokens: {self.objective.intermediate_metric} {value:.4f} is "
                              f"worse than the median of earlier trials at this point")

    def unbuildable_fix(self) -> str:
        return f"narrow {self.space.path} so that every combination is a valid config"


def make_sampler(space: Space, offset: int):
    return tpe_sampler(space.sampler.get("seed", 42) + offset, space.sampler.get("n_startup_trials", 5))


# ---------------------------------------------------------------------------------------------
# What a study is: stored once, compared on every later run


def study_identity(sweep: Sweep, base: RunConfig) -> dict[str, Any]:
    """The study user attrs that say what the study is (compared: proxy_tokens, objective, space, recipe,
    objective_data; for the record: mixture path and hash, overrides, model)."""
    ident = common_identity("sweep", sweep.proxy_tokens, sweep.objective, base, sweep.mixture, sweep.base_overrides)
    return ident | {"sparknet.space": sweep.space.identity()}


def identity_difference(stored: dict[str, Any], now: dict[str, Any]) -> str | None:
    """The first way `now` differs from what the study stored, in words; None when it is the same study."""
    def short(v: Any) -> str:
        return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)

    diff = kind_difference(stored, now) or budget_objective_difference(stored, now)
    if diff:
        return diff
    old_space = stored.get("sparknet.space")
    if isinstance(old_space, list):  # studies from before the space was stored whole kept only its keys
        old_space = {"params": {k: None for k in old_space}}
    if old_space is not None:
        new_space = now["sparknet.space"]
        old_p, new_p = old_space.get("params", {}), new_space["params"]
        for key in [*old_p, *(k for k in new_p if k not in old_p)]:
            if key not in new_p:
                return f"its space searches {key}, this space does not (--space)"
            if key not in old_p:
                return f"this space searches {key}, the study's does not (--space)"
            if old_p[key] is not None and old_p[key] != new_p[key]:
                return f"its space has {key}: {short(old_p[key])}, this space has {short(new_p[key])} (--space)"
        if "eval_points" in old_space and old_space["eval_points"] != new_space["eval_points"]:
            return (f"its space has eval_points: {old_space['eval_points']}, this space has "
                    f"{new_space['eval_points']} (--space)")
    return recipe_difference(stored, now)


def create_or_load(sweep: Sweep, storage, lab: Path):
    """The study (created once, under the lock): checked against what it was created as, with the baseline
    enqueued and the MLflow parent run."""
    space = sweep.space
    sampler = make_sampler(space, 0)
    pruner = median_pruner(space.pruner.get("n_startup_trials", 3), space.pruner.get("n_warmup_steps", 1))
    base = _config_for(sweep.mixture, sweep.base_overrides, {})
    identity = study_identity(sweep, base)
    with signals_deferred(), study_lock(sweep.storage_url, sweep.study_name):
        study = create_study(sweep.study_name, storage, sampler, pruner)
        diff = identity_difference(study.user_attrs, identity)
        if diff:
            raise SparknetError(f"--study {sweep.study_name}: {diff} (fix: rerun with the study's settings, or "
                                f"start another study with --study NAME)")
        if not study.trials:
            enqueue(study, baseline_params(base, space), {"baseline": True})
        store_identity(study, identity)
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
              "objective": sweep.objective.name, "sampler.seed": str(sweep.space.sampler.get("seed", 42))}
    return tracker.start(params, {"sparknet.study": sweep.study_name, "sparknet.kind": "sweep",
                                  "sparknet.objective": sweep.objective.name},
                         run_name=f"sweep {sweep.study_name}")


def _sweep_dir(lab: Path, study: str) -> Path:
    d = lab / "sweeps" / study
    d.mkdir(parents=True, exist_ok=True)
    return d


def work(sweep: Sweep, study, storage, poll_s: float = 2.0) -> bool:
    """Take trials until the study has `n_trials` finished ones (True) or the timeout passes (False)."""
    return sweep.work(study, storage, poll_s)


# ---------------------------------------------------------------------------------------------
# The end, once per study: summary, best config, plots, MLflow parent, --confirm


def conclude(sweep: Sweep, study, lab: Path, confirm: bool) -> dict | None:
    """The study is complete: the summary (and --confirm) by exactly one worker; the others say who."""
    finished = len(finished_trials(study))
    summary = None
    with study_job(sweep, study, "summary", finished) as state:
        if state == "mine":
            summary = finish(sweep, study, lab)
        else:
            who = study.user_attrs.get("sparknet.job.summary", {}).get("by", "?")
            print(f"study {sweep.study_name}: {finished} trials finished; the summary in "
                  f"experiments/{sweep.study_name}/ " + ("was written by " if state == "done" else "is being written by ")
                  + (who if state == "done" else state), flush=True)
    if not confirm or not complete_trials(study):
        return summary
    best = study.best_trial
    with study_job(sweep, study, "confirm", best.number) as state:
        if state != "mine":
            print(f"--confirm: trial {best.number}'s full-budget run " + ("was done by another worker" if state == "done"
                                                                          else f"is being trained by {state}"), flush=True)
            return summary
        from sparknet.run import execute

        # best.yaml's config, recorded in the study's MLflow experiment next to its parent run.
        full = _config_for(sweep.mixture, sweep.base_overrides, best.params,
                           [f"tracking.experiment={sweep.study_name}"])
        print(f"confirming trial {best.number}'s config at the full budget ({full.mixture.total_tokens:,} tokens)",
              flush=True)
        tags = {"sparknet.study": sweep.study_name, "sparknet.confirm": "true",
                "sparknet.objective": sweep.objective.name}
        if sweep.objective.tuned_on:  # its WikiText-2 validation figures were selected on: tables mark them
            tags["sparknet.tuned_on"] = sweep.objective.tuned_on
        out = execute(full, parent_run_id=study.user_attrs.get("mlflow_parent_run_id"), extra_tags=tags)
        if summary is not None:
            summary["confirm"] = out.result
        return summary


def summary_frame(study, objective: Objective):
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        retry = t.system_attrs.get("failed_trial")
        note = t.user_attrs.get("reason", "") or (f"retry of trial {retry}" if retry is not None else "")
        rows.append({"trial": t.number, "state": t.state.name, objective.metric: t.value,
                     **{k: v for k, v in t.params.items()},
                     "baseline": bool(t.user_attrs.get("baseline")),
                     "seconds": t.user_attrs.get("seconds"),
                     "note": note[:70]})
    df = pd.DataFrame(rows)
    return df.sort_values([objective.metric, "trial"], na_position="last").reset_index(drop=True) if len(df) else df


def command_line(sweep: Sweep) -> str:
    """The command that reruns (continues) this study."""
    parts = ["python", "-m", "sparknet.sweep", "--mixture", str(sweep.mixture), "--space", str(sweep.space.path),
             "--objective", sweep.objective.name, "--trials", str(sweep.n_trials), "--proxy-tokens",
             str(sweep.proxy_tokens), "--study", sweep.study_name, "--storage", redact(sweep.storage_url),
             *sweep.base_overrides]
    return " ".join(shlex.quote(p) for p in parts)


def finish(sweep: Sweep, study, lab: Path) -> dict:
    """Print the table, write experiments/<study>/ (best config, summary, plots), close the parent run."""
    objective = sweep.objective
    metric = objective.metric
    df = summary_frame(study, objective)
    done = complete_trials(study)
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
        print(f"best: trial {best.number} {metric} {best.value:.4f}; baseline (trial {baseline.number}) "
              f"{baseline.value:.4f}: {gain:+.4f} {objective.unit} ({gain / baseline.value:+.2%})")
    full = _config_for(sweep.mixture, sweep.base_overrides, best.params)
    # Real config keys only (train.min_lr, never the pseudo-key min_lr_ratio), the user's overrides included:
    # applied to the mixture they give exactly best.yaml.
    overrides = _parse_overrides(sweep.base_overrides) | trial_overrides(sweep.mixture, sweep.base_overrides,
                                                                         best.params)
    tuned = (f"# Its {objective.tuned_on} figures are tuned (the study selected on them): report the test split.\n"
             if objective.tuned_on else "")
    (out_dir / "best_overrides.yaml").write_text(
        f"# Best trial {best.number} of study {sweep.study_name}: {metric} {best.value:.4f} at "
        f"{sweep.proxy_tokens:,} tokens.\n# The keys that turn {sweep.mixture} into best.yaml:\n"
        f"#   python -m sparknet.run {shlex.quote(str(sweep.mixture))} "
        f"{' '.join(shlex.quote(a) for a in overrides_args(overrides))}\n" + tuned
        + yaml.safe_dump(overrides, sort_keys=True))
    (out_dir / "best.yaml").write_text(
        f"# The best config of study {sweep.study_name} ({metric}) at the mixture's full budget.\n"
        f"# Train it: python -m sparknet.run {out_dir / 'best.yaml'}\n" + tuned
        + yaml.safe_dump(to_dict(full), sort_keys=False))
    df.to_csv(out_dir / "trials.csv", index=False)
    wik = study.user_attrs.get("sparknet.objective_data") or {}
    (out_dir / "README.md").write_text(
        f"# Sweep {sweep.study_name}\n\nQuestion: best {', '.join(d.key for d in sweep.space.dims)} for "
        f"`{sweep.mixture}` at a {sweep.proxy_tokens:,}-token proxy budget, minimizing {metric} "
        f"({objective.unit}"
        + (f"; pruned on {objective.intermediate_metric}" if objective.intermediate_metric != metric else "")
        + (f"; WikiText-2 validation text sha256 {wik.get('sha256', '')[:12]}, tuned on" if objective.tuned_on else "")
        + ").\n\n"
        f"Command: `{command_line(sweep)}`\n\n"
        f"MLflow experiment: `{sweep.study_name}` (parent run {study.user_attrs.get('mlflow_parent_run_id')}).\n\n"
        + markdown_table(df) + "\n\n"
        + (f"Best: trial {best.number}, {metric} {best.value:.4f}"
           + (f"; baseline {baseline.value:.4f} ({baseline.value - best.value:+.4f} {objective.unit})." if baseline
              else ".")
           + " Full-budget config: `best.yaml`.\n"))
    plots = optuna_plots(study, out_dir, metric)
    _close_parent(sweep, study, lab, out_dir, plots, best, baseline)
    print(f"wrote {out_dir}/ (best.yaml, best_overrides.yaml, trials.csv, README.md, plots)", flush=True)
    return {"best_trial": best.number, "best_value": best.value, "best_params": best.params,
            "baseline_value": baseline.value if baseline else None, "dir": str(out_dir)}


def _close_parent(sweep: Sweep, study, lab: Path, out_dir: Path, plots: list[Path], best, baseline) -> None:
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    tracker = _parent_tracker(sweep, lab) if run_id else None
    if tracker is None:
        return
    tracker.start({}, {}, run_name="", resume_run_id=run_id)
    c = counts(study)
    tracker.log_metrics({"best_value": best.value, "trials_complete": c["COMPLETE"],
                         "trials_pruned": c["PRUNED"], "trials_failed": c["FAIL"]}
                        | ({"baseline_value": baseline.value} if baseline else {}), len(study.trials))
    for p in [*plots, out_dir / "trials.csv", out_dir / "best.yaml", out_dir / "best_overrides.yaml",
              out_dir / "README.md"]:
        tracker.log_artifact(p)
    tracker.set_tags({"sparknet.best_trial": str(best.number), "sparknet.objective": sweep.objective.name,
                      "sparknet.objective_metric": sweep.objective.metric})
    tracker.end("FINISHED")


# ---------------------------------------------------------------------------------------------


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparknet.sweep", description=__doc__.split("\n")[0],
                                 epilog="Ctrl-C or SIGTERM: the running trial is queued again and continues its "
                                        "checkpoints on the next run (exit 130).")
    ap.add_argument("overrides", nargs="*", help="key=value overrides applied to every trial")
    ap.add_argument("--mixture", default=DEFAULT_MIXTURE, help=f"mixture YAML (default {DEFAULT_MIXTURE})")
    ap.add_argument("--space", default=DEFAULT_SPACE, help=f"search space YAML (default {DEFAULT_SPACE})")
    ap.add_argument("--objective", default=None,
                    help="what to minimize: val (mean held-out loss over the sources), val/<source>, or "
                         "wikitext-valid (WikiText-2 validation bits per byte of the final model; pruned on val) "
                         "(default: the space's objective, else val)")
    ap.add_argument("--trials", type=int, default=20, help="finished trials the study should end with (default 20)")
    ap.add_argument("--timeout", default=None, help="stop taking trials after this long, e.g. 8h (default: none)")
    ap.add_argument("--proxy-tokens", default="50M", help="training tokens per trial (default 50M)")
    ap.add_argument("--study", default=None,
                    help="study name (default: <mixture>-<space>); a study keeps its budget, objective, space and "
                         "recipe: reusing the name with others is an error")
    ap.add_argument("--storage", default=None,
                    help="SQLAlchemy URL (default sqlite:///<lab>/optuna.db; postgresql://... for several machines)")
    ap.add_argument("--heartbeat", type=int, default=60,
                    help="seconds between trial heartbeats; a trial silent for twice this is failed and retried")
    ap.add_argument("--confirm", action="store_true",
                    help="then train the best config at the full budget (one worker of the study does it)")
    ap.add_argument("--progress", action="store_true", help="progress bars for each trial")
    args = ap.parse_intermixed_args(argv)
    if args.trials < 1:
        raise SparknetError(f"--trials: must be >= 1, got {args.trials}")
    proxy, timeout = parse_budget(args, "50M")
    # The defaults live in the repo: found from any working directory.
    mixture = args.mixture if Path(args.mixture).exists() or args.mixture != DEFAULT_MIXTURE else str(ROOT / DEFAULT_MIXTURE)
    if args.space == DEFAULT_SPACE and not Path(args.space).exists():
        args.space = str(ROOT / DEFAULT_SPACE)
    base = load_config(mixture, args.overrides)  # bad mixture/overrides fail here, before anything starts
    space = load_space(args.space, mixture, args.overrides)
    names = [s.name for s in base.mixture.sources]
    try:
        objective = Objective.parse(args.objective or space.objective, names)
    except SparknetError as exc:
        raise SparknetError(f"{'--objective' if args.objective else f'{space.path}: objective'}: {exc}") from None
    lab = base.lab_path
    study_name = parse_study_name(args.study or f"{base.name}-{Path(args.space).stem}")
    url = args.storage or default_storage(lab)
    sweep = Sweep(mixture, space, list(args.overrides), args.trials, proxy, study_name, url, timeout,
                  args.heartbeat, args.progress, objective)
    # Before any trial trains: WikiText-2 validation must be readable if it is the objective, and the held-out slices
    # it reads must hold a window once prepared (every trial trains on the same stores: prepared here, once).
    first = sweep.trial_config({}, 0)
    objective.check(first)
    from sparknet.prepare import prepare
    from sparknet.run import prepare_lock

    with prepare_lock(lab):
        prepared = prepare(first, progress=args.progress, write_report=False)
    try:  # the pruner reads every evaluation's objective.intermediate: for wikitext-valid, every source's loss
        objective.check_prepared(prepared, first, pruned=True)
    except SparknetError as exc:
        raise SparknetError(f"{'--objective' if args.objective else f'{space.path}: objective'}: {exc}") from None
    quiet_optuna()
    with interrupt_handlers():
        storage = open_storage(url, args.heartbeat)
        study = create_or_load(sweep, storage, lab)
        c = counts(study)
        print(f"study {study_name} at {redact(url)}: {c['COMPLETE'] + c['PRUNED']} of {args.trials} trials finished, "
              f"{c['RUNNING']} running; minimizing {objective.metric} at a proxy budget of {proxy:,} tokens",
              flush=True)
        if not sweep.work(study, storage):
            return 0  # timed out: the rerun continues
        conclude(sweep, study, lab, args.confirm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
