"""The study lifecycle under `sparknet.sweep` (hyperparameters), `sparknet.ablate` (mixture weights) and any further
kind of study: a kind says only what differs, as a `StudyKind`; `run_study` does the rest.

    kind = Sweep(study_name=..., storage_url=..., mixture=..., ...)   # a StudyKind
    return kind.run(confirm=args.confirm)                              # run_study(kind, confirm=...)

What every kind gets, written once:

- Creating or loading the study under the study lock, and what a study is (`identity`): stored at creation
  (`sparknet.kind`, the proxy budget, the objective, the recipe, ... and the kind's own keys) and compared on every
  later run, so a rerun with another question is a one-line error naming the difference, before anything trains.
- The parent MLflow run (experiment = study name): started once, with each trial a child run; closed with the
  summary's metrics, tags and files.
- Workers (`sparknet.study_worker`): any number, on one storage (`sparknet.study_storage`: SQLite, or PostgreSQL for
  several machines), with heartbeats, retries, resume after an interrupt or a kill.
- The conclusion, once per study whatever the number of workers (`study_job`: a claim taken under the lock and kept
  alive by a heartbeat): the summary written to `--out` (default experiments/<study>/, from where the command runs),
  then `--confirm` (the chosen config at the full budget), by one worker each.
- The command line's shared flags (`add_study_arguments`, `parse_budget`, `study_settings`).
- Whether the proxies are big enough to answer (`sparknet.adequacy`): the margin (--adequacy-margin, --no-adequacy)
  that the kinds' summaries judge their runs by, and `--proxy-tokens auto` (`sparknet.proxy_auto`): the base point
  probed once (before the study is created; `resolve_auto_budget`), the budget stored with the study's identity (user
  attrs `sparknet.proxy_tokens`, and how it was found in `sparknet.proxy_auto`) so a rerun or another worker keeps
  it.

A kind (a dataclass subclass of `StudyKind`) implements: for the lifecycle `base_config`, `identity`,
`identity_difference`, `sampler_and_pruner`, `queue`, `parent_params`, `summarize`, `confirmation` (and optionally
`before_create`, `parent_tags`, `plan_detail`); for its worker `take`, `setup_trial`, `unbuildable_fix` (and
optionally `report`, `trial_tags`, `record`, `curve_run`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from sparknet import atomic
from sparknet.adequacy import MARGIN
from sparknet.config import RunConfig, to_dict
from sparknet.errors import ArgumentParser, SparknetError
from sparknet.objective import Objective
from sparknet.prepare import check_lab
from sparknet.proxy_auto import DEFAULT_AUTO_CAP
from sparknet.study_storage import (
    check_storage_url,
    counts,
    create_study,
    default_storage,
    find_study,
    finished_trials,
    open_storage,
    quiet_optuna,
    redact,
    study_lock,
)
from sparknet.study_worker import Worker, interrupt_handlers, signals_deferred

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Summary:
    """What a kind's summary gives the lifecycle: `result` (returned to the caller), and for the parent MLflow run
    its final `metrics`, `tags` and the `files` it keeps; `written` names them in the "wrote DIR/ (...)" line."""

    result: dict[str, Any]
    metrics: dict[str, float]
    tags: dict[str, str]
    files: list[Path]
    written: str


@dataclass
class Confirmation:
    """What --confirm trains, once per study: `config` at the full budget, claimed for `key`. `what` and `run` name
    it in the lines printed ("confirming {what} at the full budget", "--confirm: {run} was done by ...")."""

    key: Any
    config: RunConfig
    what: str
    run: str


@dataclass(kw_only=True)
class StudyKind:
    """What a kind of study is and says. The fields are what every kind has; the methods are its hooks."""

    kind: ClassVar[str]  # the study attr `sparknet.kind`, the MLflow tag, the module (python -m sparknet.<kind>)
    lab_folder: ClassVar[str]  # the parent run's local files: <lab>/<lab_folder>/<study>/
    noun: ClassVar[str] = "trials"  # what the lines printed call a study's trials
    # User attrs a trial queued again after an interrupt keeps (the run continues, so does its curve).
    requeue_keep: ClassVar[tuple[str, ...]] = ("val_loss_by_eval",)
    confirm_reads_summary: ClassVar[bool] = False  # --confirm trains what the summary chose: wait for it

    mixture: str
    base_overrides: list[str]
    proxy_tokens: int
    study_name: str
    storage_url: str
    objective: Objective | None = None
    out_dir: Path | None = None  # --out; None: experiments/<study>/ from where the command runs
    timeout_s: float | None = None
    heartbeat_s: int = 60
    progress: bool = False
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    # Whether the proxies learned past a bigram table (sparknet.adequacy): the margin in nats/token, and whether a
    # failed verdict stops the summary from concluding (--no-adequacy: stated, not enforced).
    adequacy_margin: float = MARGIN
    adequacy_enforced: bool = True
    # --proxy-tokens auto: {"cap": tokens, "time_cap_s": s or None} until the probe has run (proxy_tokens is then the
    # cap, provisionally), then what the probe found, "chosen" among it (= proxy_tokens). None: a budget given.
    auto_budget: dict[str, Any] | None = None

    def run(self, *, confirm: bool) -> int:
        """Create or load the study, work on it, conclude (`run_study`); the exit code."""
        return run_study(self, confirm=confirm)

    @property
    def out(self) -> Path:
        """The folder the summary is written to."""
        return out_folder(self.out_dir, self.study_name)

    # -- the lifecycle's hooks -------------------------------------------------------------------

    def base_config(self) -> RunConfig:
        """The config the study's recipe (identity) and its parent run's tracking settings come from."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """The kind's own study user attrs (beside `common_identity`'s), compared by `identity_difference`."""
        return {}

    def identity_difference(self, stored: dict[str, Any], now: dict[str, Any]) -> str | None:
        """The first way the kind's own attrs in `now` differ from the `stored` ones, in words; None if none."""
        return None

    def sampler_and_pruner(self) -> tuple[Any, Any]:
        raise NotImplementedError

    def before_create(self, existing) -> None:
        """Before the study is created or loaded (`existing`: the stored study, its identity checked; None for a new
        one): prepare what its trials need, so that a study never holds queued trials that cannot run."""

    def queue(self, study) -> None:
        """Under the study lock, before the identity is stored: enqueue what a new (or grown) study starts with."""

    def parent_params(self) -> dict[str, str]:
        """The parent run's params beside the common ones (study, storage, proxy_tokens, mixture, objective)."""
        return {}

    def parent_tags(self) -> dict[str, str]:
        """The parent run's tags beside the common ones (sparknet.study, sparknet.kind, sparknet.objective)."""
        return {}

    def planned(self) -> int:
        """How many finished trials the study wants."""
        raise NotImplementedError

    def plan_detail(self) -> str:
        """Said after "N of M {noun} finished" in the first line (e.g. " (4 points x 2 seeds)")."""
        return ""

    def summarize(self, study) -> Summary:
        """Print the table and write the summary into `self.out` (SparknetError if nothing can be concluded)."""
        raise NotImplementedError

    def confirmation(self, study) -> Confirmation | None:
        """What --confirm trains, or None when there is nothing to confirm."""
        return None

    # -- the worker's hooks (sparknet.study_worker.Worker) --------------------------------------

    def take(self, study):
        """Under the study lock: the trial to run next (study.ask()), None to wait for trials running elsewhere,
        or study_worker.DONE when the study has every trial it wants."""
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

    def curve_run(self, frozen, cfg: RunConfig) -> bool:
        """Whether this trial is the study's learning curve (its base point, evaluated along the way): then the bigram
        references of a run of each evaluation's budget are counted too (`ref_bigram_by_eval`), for the verdict's
        extrapolation. Default: a run evaluated before its end (an ablation evaluates only its base point so)."""
        return cfg.eval.every_tokens < cfg.mixture.total_tokens

    def check_trainable(self) -> None:
        """That the study's runs can train at `proxy_tokens`: every source within its max_repeats (SparknetError, naming
        the source, if not). Default: the base mixture at that budget, from the lab's token stores (prepared as
        needed)."""
        from sparknet.config import config_from_dict
        from sparknet.locks import prepare_lock
        from sparknet.prepare import check_budget, prepare

        d = to_dict(self.base_config())
        d["mixture"]["total_tokens"] = int(self.proxy_tokens)
        cfg = config_from_dict(d, f"study {self.study_name} at {self.proxy_tokens:,} tokens")
        with prepare_lock(cfg.lab_path):
            prepared = prepare(cfg, progress=self.progress, write_report=False)
        check_budget(prepared)

    def forget_budget(self) -> None:
        """Drop what a kind computed from the provisional budget (--proxy-tokens auto, before its probe): cached
        plans and run folders (`Ablation.plans`, its `_run_dirs`) are computed again at the chosen one."""
        for name in ("plans", "_run_dirs"):
            vars(self).pop(name, None)

    def unbuildable_fix(self) -> str:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# The lifecycle


def run_study(kind: StudyKind, *, confirm: bool) -> int:
    """Create or load the study, work on it until it has every trial it wants (or --timeout), then conclude."""
    quiet_optuna()
    with interrupt_handlers():
        storage = open_storage(kind.storage_url, kind.heartbeat_s)
        existing = find_study(kind.study_name, storage)
        if kind.auto_budget is not None and "chosen" not in kind.auto_budget:
            existing = resolve_auto_budget(kind, storage, existing)
        if existing is not None:  # a rerun: a different question is an error before anything is prepared
            check_identity(kind, existing.user_attrs, study_identity(kind))
        kind.before_create(existing)
        study = create_or_load(kind, storage)
        c = counts(study)
        print(f"study {kind.study_name} at {redact(kind.storage_url)}: {c['COMPLETE'] + c['PRUNED']} of "
              f"{kind.planned()} {kind.noun} finished{kind.plan_detail()}, {c['RUNNING']} running; minimizing "
              f"{kind.objective.metric} at a proxy budget of {kind.proxy_tokens:,} tokens", flush=True)
        if not Worker(kind, storage).work(study):
            return 0  # timed out: the rerun continues
        conclude(kind, study, confirm)
    return 0


def create_or_load(kind: StudyKind, storage):
    """The study (created once, under the lock): checked against what it was created as, what it starts with queued,
    and the MLflow parent run."""
    sampler, pruner = kind.sampler_and_pruner()
    identity = study_identity(kind)
    with signals_deferred(), study_lock(kind.storage_url, kind.study_name):
        study = create_study(kind.study_name, storage, sampler, pruner)
        check_identity(kind, study.user_attrs, identity)
        kind.queue(study)
        store_identity(study, identity)
        if "mlflow_parent_run_id" not in study.user_attrs:
            study.set_user_attr("mlflow_parent_run_id", _start_parent(kind))
    return study


def conclude(kind: StudyKind, study, confirm: bool, poll_s: float = 2.0) -> dict | None:
    """Every trial the study wants has finished: the summary (and --confirm) by exactly one worker; the others say
    who. A worker asked to --confirm what the summary chose waits for the summary (seconds) when another writes it."""
    finished = len(finished_trials(study))
    summary = None
    waiting = False
    # Written once per set of finished runs and full budget (best.yaml's, which may be set after the study), and again
    # where its README is gone (deleted to regenerate it with a newer sparknet, or another --out).
    key = f"{finished} runs, full budget {kind.base_config().mixture.total_tokens}"
    while True:
        with study_job(kind, study, "summary", key, redo=not (Path(kind.out) / "README.md").exists()) as state:
            if state == "mine":
                summary = write_summary(kind, study)
                break
            if state == "done" or not (confirm and kind.confirm_reads_summary):
                who = study.user_attrs.get("sparknet.job.summary", {}).get("by", "?")
                print(f"study {kind.study_name}: {finished} {kind.noun} finished; the summary in {kind.out}/ "
                      + ("was written by " if state == "done" else "is being written by ")
                      + (who if state == "done" else state), flush=True)
                break
        if not waiting:
            print(f"study {kind.study_name}: waiting for {state} to write the summary (then --confirm)", flush=True)
            waiting = True
        time.sleep(poll_s)  # its claim goes stale if it dies: study_job then hands the summary to this worker
    plan = kind.confirmation(study) if confirm else None
    if plan is None:
        return summary
    # Once per answer and full budget: a full budget set after the study (not part of its identity) is a new run.
    with study_job(kind, study, "confirm", f"{plan.key} at {plan.config.mixture.total_tokens} tokens") as state:
        if state != "mine":
            print(f"--confirm: {plan.run} " + ("was done by another worker" if state == "done"
                                               else f"is being trained by {state}"), flush=True)
            return summary
        from sparknet.run import execute

        print(f"confirming {plan.what} at the full budget ({plan.config.mixture.total_tokens:,} tokens)", flush=True)
        tags = {"sparknet.study": kind.study_name, "sparknet.confirm": "true",
                "sparknet.objective": kind.objective.name}
        if kind.objective.tuned_on:  # its WikiText-2 validation figures were selected on: tables mark them
            tags["sparknet.tuned_on"] = kind.objective.tuned_on
        out = execute(plan.config, parent_run_id=study.user_attrs.get("mlflow_parent_run_id"), extra_tags=tags)
        if summary is not None:
            summary["confirm"] = out.result
        return summary


def resolve_auto_budget(kind: StudyKind, storage, existing, poll_s: float = 5.0):
    """--proxy-tokens auto on a study without a budget yet: probe the base point (`sparknet.proxy_auto.probe`) and store
    the budget it chose with the study at once, so that a rerun, or a worker started meanwhile, keeps it and never
    probes again. Exactly one worker probes (the study-wide job "probe"); one started meanwhile waits for the budget
    it stores, and probes itself if that worker dies first (its claim goes stale). Returns the study."""
    from sparknet.proxy_auto import probe

    stored = existing.user_attrs if existing is not None else {}
    probed = waiting = False
    while "sparknet.proxy_tokens" not in stored:
        if existing is None:
            with signals_deferred(), study_lock(kind.storage_url, kind.study_name):
                existing = create_study(kind.study_name, storage, None, None)
        with study_job(kind, existing, "probe", "budget", redo=True) as state:
            if state == "mine":
                info = probe(kind.base_config(), objective=kind.objective, cap=kind.auto_budget["cap"],
                             margin=kind.adequacy_margin, study_name=kind.study_name,
                             time_cap_s=kind.auto_budget.get("time_cap_s"), progress=kind.progress)
                check_chosen_budget(kind, info["chosen"])
                with signals_deferred(), study_lock(kind.storage_url, kind.study_name):
                    existing.set_user_attr("sparknet.proxy_tokens", info["chosen"])
                    existing.set_user_attr("sparknet.proxy_auto", info)
                stored, probed = {"sparknet.proxy_tokens": info["chosen"], "sparknet.proxy_auto": info}, True
                continue
        if not waiting:
            print(f"--proxy-tokens auto: {state} is probing study {kind.study_name}'s budget; waiting for it",
                  flush=True)
            waiting = True
        time.sleep(poll_s)
        stored = find_study(kind.study_name, storage).user_attrs
    chosen = int(stored["sparknet.proxy_tokens"])
    if not probed:
        print(f"--proxy-tokens auto: study {kind.study_name} has its budget stored, {chosen:,} tokens; using it, not "
              f"probing again", flush=True)
    kind.auto_budget = dict(stored.get("sparknet.proxy_auto") or {}, chosen=chosen)
    if kind.proxy_tokens != chosen:
        kind.proxy_tokens = chosen
        kind.forget_budget()
    return existing


def check_chosen_budget(kind: StudyKind, chosen: int) -> None:
    """The budget the probe chose, checked against the data before it is stored with the study: a stored budget is
    kept by every rerun, so one that some planned run's sources cannot supply (within their max_repeats) would fail
    the study for good. The probe checked only the base point at its cap; the budget can be larger (a schedule's
    area) and other points draw more of some source."""
    kind.proxy_tokens = chosen
    kind.forget_budget()
    try:
        kind.check_trainable()
    except SparknetError as exc:
        raise SparknetError(f"--proxy-tokens auto chose {chosen:,} tokens a run, but at that budget {exc}; nothing was "
                            f"stored: once the data allows it, --proxy-tokens {chosen} trains at this budget without "
                            f"probing again") from None


def out_folder(out: str | Path | None, study_name: str) -> Path:
    """--out, else experiments/<study>/ from where the command runs."""
    return Path(out) if out else Path("experiments") / study_name


OWNER_FILE = ".study.json"  # in a study's folder: which study (name and storage) its files are the answer of


def _owner(study_name: str, storage_url: str) -> dict[str, str]:
    return {"study": study_name, "storage": redact(storage_url)}


def check_out_folder(out: Path, study_name: str, storage_url: str) -> None:
    """The study's folder is its own: one written by a study of the same name in another storage (another lab, a
    PostgreSQL database) is refused, never overwritten: by the command line before anything runs (`study_settings`),
    and again before the summary is written. A folder without an owner file (written
    before folders recorded one) is taken as this study's."""
    if out.exists() and not out.is_dir():
        raise SparknetError(f"--out {out}: is a file, not a folder for the study's answer (fix: --out DIR of a folder, "
                            f"or leave it out for experiments/{study_name}/)")
    try:
        owner = json.loads((out / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return
    if owner != _owner(study_name, storage_url):
        raise SparknetError(f"--out {out}: holds the answer of study {owner.get('study')!r} at "
                            f"{owner.get('storage')}, not of this one at {redact(storage_url)} (fix: --out DIR "
                            f"for this study's files, or --study another name)")


def write_summary(kind: StudyKind, study) -> dict:
    """The kind's summary into its folder (claimed first with its owner file), then the parent run closed with it."""
    check_out_folder(kind.out, kind.study_name, kind.storage_url)
    atomic.write_json(kind.out / OWNER_FILE, _owner(kind.study_name, kind.storage_url))
    s = kind.summarize(study)
    _close_parent(kind, study, s)
    print(f"wrote {kind.out}/ ({s.written})", flush=True)
    return s.result


# ---------------------------------------------------------------------------------------------
# The parent MLflow run


def _parent_tracker(kind: StudyKind):
    """The tracker of the study's MLflow parent run (None when the mixture turns tracking off)."""
    from sparknet.tracking import open_tracker

    cfg = kind.base_config()
    if not cfg.tracking.enabled:
        return None
    lab = cfg.lab_path
    d = lab / kind.lab_folder / kind.study_name
    d.mkdir(parents=True, exist_ok=True)
    return open_tracker(True, cfg.tracking.uri, kind.study_name, lab, d, timeout_s=cfg.tracking.timeout_s)


def _start_parent(kind: StudyKind) -> str | None:
    tracker = _parent_tracker(kind)
    if tracker is None:
        return None
    params = {"study": kind.study_name, "storage": redact(kind.storage_url), "proxy_tokens": str(kind.proxy_tokens),
              "mixture": str(kind.mixture), "objective": kind.objective.name} | kind.parent_params()
    tags = {"sparknet.study": kind.study_name, "sparknet.kind": kind.kind,
            "sparknet.objective": kind.objective.name} | kind.parent_tags()
    return tracker.start(params, tags, run_name=f"{kind.kind} {kind.study_name}")


def _close_parent(kind: StudyKind, study, s: Summary) -> None:
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    tracker = _parent_tracker(kind) if run_id else None
    if tracker is None:
        return
    tracker.start({}, {}, run_name="", resume_run_id=run_id)
    tracker.log_metrics(s.metrics, len(study.trials))
    for p in s.files:
        tracker.log_artifact(p)
    tracker.set_tags({"sparknet.objective": kind.objective.name, "sparknet.objective_metric": kind.objective.metric}
                     | s.tags)
    tracker.end("FINISHED")


# ---------------------------------------------------------------------------------------------
# Study-wide jobs


@contextlib.contextmanager
def study_job(kind: StudyKind, study, name: str, key: Any, *, redo: bool = False):
    """Claim the study-wide job `name` (the summary, the confirmation) for `key` (what it is done for). Yields
    "mine" (this worker does it; a heartbeat keeps the claim alive, done is recorded at the end, a failure or an
    interrupt releases it), "done" (already done for this key; `redo`: do it again all the same) or the worker id of
    the one doing it now. The claim is taken under the study lock, so with N workers exactly one does the job."""
    attr = f"sparknet.job.{name}"
    me = kind.worker_id
    stale_s = 2 * kind.heartbeat_s
    with signals_deferred(), study_lock(kind.storage_url, kind.study_name):
        c = study.user_attrs.get(attr)
        if c and c.get("key") == key and c.get("done") and not redo:
            state = "done"
        elif c and not c.get("done") and c.get("by") != me and time.time() - c.get("beat", 0) < stale_s:
            state = c["by"]
        else:
            state = "mine"
            study.set_user_attr(attr, {"key": key, "by": me, "beat": time.time(), "done": False})
    if state != "mine":
        yield state
        return
    stop = threading.Event()

    def beat():
        while not stop.wait(max(1.0, kind.heartbeat_s / 2)):
            with contextlib.suppress(Exception):  # a blink of the database: the next beat retries
                study.set_user_attr(attr, {"key": key, "by": me, "beat": time.time(), "done": False})

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
            study.set_user_attr(attr, {"key": key, "by": me, "beat": time.time() if done else 0, "done": done})


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


def study_identity(kind: StudyKind) -> dict[str, Any]:
    """The study user attrs every kind stores (compared: kind, proxy_tokens, objective, recipe, objective_data;
    for the record: mixture path and hash, overrides, model), then the kind's own."""
    base = kind.base_config()
    rec = recipe(base)
    mixture_part = {k: v for k, v in rec.items() if k.startswith(("mixture.", "tokenizer."))}
    data = kind.objective.data(base)
    return {
        "sparknet.kind": kind.kind,
        "sparknet.proxy_tokens": kind.proxy_tokens,
        "sparknet.objective": kind.objective.name,
        "sparknet.recipe": rec,
        "sparknet.objective_data": {k: data[k] for k in ("sha256", "rows")} if data else {},
        "sparknet.mixture": str(kind.mixture),
        "sparknet.mixture_sha256": hashlib.sha256(json.dumps(mixture_part, sort_keys=True).encode()).hexdigest(),
        "sparknet.overrides": list(kind.base_overrides),
        "sparknet.model": {k.removeprefix("model."): v for k, v in rec.items() if k.startswith("model.")},
    } | ({"sparknet.proxy_auto": kind.auto_budget} if kind.auto_budget and "seconds" in kind.auto_budget else {}) \
        | kind.identity()


def check_identity(kind: StudyKind, stored: dict[str, Any], now: dict[str, Any]) -> None:
    diff = identity_difference(kind, stored, now)
    if diff:
        raise SparknetError(f"--study {kind.study_name}: {diff} (fix: rerun with the study's settings, or start "
                            f"another study with --study NAME)")


FULL_BUDGET_KEY = "mixture.total_tokens"


def identity_difference(kind: StudyKind, stored: dict[str, Any], now: dict[str, Any]) -> str | None:
    """The first way `now` differs from what the study stored, in words; None when it is the same study."""
    # Studies from before the kind was stored are sweeps (the only kind there was).
    old = stored.get("sparknet.kind", "sweep" if stored.get("sparknet.space") is not None else None)
    if old is not None and old != now["sparknet.kind"]:
        return (f"it is a{'n' if old[0] in 'aeiou' else ''} {old} study (python -m sparknet.{old}), this command runs "
                f"a{'n' if now['sparknet.kind'][0] in 'aeiou' else ''} {now['sparknet.kind']}")
    if "sparknet.proxy_tokens" in stored and stored["sparknet.proxy_tokens"] != now["sparknet.proxy_tokens"]:
        return (f"its proxy budget is {stored['sparknet.proxy_tokens']:,} tokens, this command asks for "
                f"{now['sparknet.proxy_tokens']:,} (--proxy-tokens)")
    if "sparknet.objective" in stored and stored["sparknet.objective"] != now["sparknet.objective"]:
        return f"it minimizes {stored['sparknet.objective']}, this command asks for {now['sparknet.objective']} (--objective)"
    diff = kind.identity_difference(stored, now)
    if diff:
        return diff
    old_rec = stored.get("sparknet.recipe")
    if old_rec is not None:
        new_rec = now["sparknet.recipe"]
        for key in [*old_rec, *(k for k in new_rec if k not in old_rec)]:
            if key == FULL_BUDGET_KEY:  # every trial trains the proxy budget: the full one is only what best.yaml
                continue                # and --confirm train, and may be set after the study (stored anew)
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
# The command line every kind shares


def study_parser(module: str, doc: str, *, running: str, **flags: str) -> argparse.ArgumentParser:
    """The parser of `python -m sparknet.<module>` (its description: the first line of `doc`) with the flags every
    kind shares (`add_study_arguments(**flags)`); `running`: what is interrupted by Ctrl-C ("trial", "point")."""
    ap = ArgumentParser(prog=f"python -m sparknet.{module}", description=doc.split("\n")[0],
                        epilog=f"Ctrl-C or SIGTERM: the running {running} is queued again and continues its "
                                        f"checkpoints on the next run (exit 130).")
    add_study_arguments(ap, **flags)
    return ap


def add_study_arguments(ap: argparse.ArgumentParser, *, noun: str, proxy_default: str, study_default: str,
                        keeps: str, confirm_what: str) -> None:
    """--proxy-tokens, --study, --storage, --out, --timeout, --heartbeat, --confirm, --progress. `noun`: what a trial
    is called ("trial", "run"); `keeps`: what a study keeps (for --study's help); `confirm_what`: what --confirm
    trains."""
    ap.add_argument("--proxy-tokens", default=proxy_default,
                    help=f"training tokens per {noun} (default {proxy_default}), or auto: train the base point once, "
                         f"evaluating along the way, until it is past its bigram reference by the margin (or at "
                         f"--auto-cap), and use that budget for every {noun} (stored with the study: a rerun keeps it)")
    ap.add_argument("--auto-cap", default=None, metavar="TOKENS",
                    help=f"--proxy-tokens auto: the most tokens the probe trains (default {DEFAULT_AUTO_CAP})")
    ap.add_argument("--auto-time", default=None, metavar="TIME",
                    help="--proxy-tokens auto: also stop the probe after this long, e.g. 2h (default: none)")
    ap.add_argument("--adequacy-margin", type=float, default=MARGIN, metavar="NATS",
                    help=f"how far past its bigram reference every {noun} must be, in nats/token, for the summary to "
                         f"conclude anything (default {MARGIN}; sparknet.adequacy says why)")
    ap.add_argument("--no-adequacy", action="store_true",
                    help="state the adequacy verdict but conclude anyway (effect sentences, fit): for tests, and for "
                         "users who accept answers about early optimization")
    ap.add_argument("--study", default=None,
                    help=f"study name (default: {study_default}); a study keeps its {keeps}: reusing the name with "
                         f"others is an error")
    ap.add_argument("--storage", default=None,
                    help="SQLAlchemy URL (default sqlite:///<lab>/optuna.db; postgresql://... for several machines)")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="the folder the summary is written to (default experiments/<study>/, from where the command "
                         "runs)")
    ap.add_argument("--timeout", default=None, help=f"stop taking {noun}s after this long, e.g. 8h (default: none)")
    ap.add_argument("--heartbeat", type=int, default=60,
                    help=f"seconds between {noun} heartbeats; a {noun} silent for twice this is failed and retried")
    ap.add_argument("--confirm", action="store_true",
                    help=f"then train {confirm_what} at the full budget (one worker of the study does it)")
    ap.add_argument("--progress", action="store_true", help=f"progress bars for each {noun}")


@dataclass(frozen=True)
class AutoBudget:
    """--proxy-tokens auto, as `parse_budget` read it: the probe's cap in tokens, and in seconds (or None)."""

    cap: int
    time_cap_s: float | None


def parse_budget(args, example: str) -> tuple[int | AutoBudget, float | None]:
    """The shared flags checked first: (proxy tokens per trial, or an `AutoBudget` for --proxy-tokens auto; --timeout
    in seconds or None). `example` is the --proxy-tokens value the fix suggests (e.g. "20M")."""
    from sparknet.config import parse_tokens

    if args.heartbeat < 1:
        raise SparknetError(f"--heartbeat: must be >= 1 second, got {args.heartbeat} (fix: --heartbeat 60)")
    margin = getattr(args, "adequacy_margin", MARGIN)
    if not margin >= 0 or not math.isfinite(margin):  # nan too
        raise SparknetError(f"--adequacy-margin: must be >= 0 nats/token, got {margin} (fix: --adequacy-margin "
                            f"{MARGIN}, or --no-adequacy to conclude whatever the proxies learned)")
    auto = str(args.proxy_tokens).strip().lower() == "auto"
    for flag, value in (("--auto-cap", getattr(args, "auto_cap", None)), ("--auto-time", getattr(args, "auto_time", None))):
        if value is not None and not auto:
            raise SparknetError(f"{flag}: only with --proxy-tokens auto, got --proxy-tokens {args.proxy_tokens} (fix: "
                                f"--proxy-tokens auto {flag} {value}, or drop {flag})")
    if auto:
        text = getattr(args, "auto_cap", None) or DEFAULT_AUTO_CAP
        try:
            cap = parse_tokens(text)
        except ValueError as exc:
            raise SparknetError(f"--auto-cap: {exc} (fix: use e.g. --auto-cap {DEFAULT_AUTO_CAP})") from None
        if cap <= 0:
            raise SparknetError(f"--auto-cap: must be > 0 tokens, got {text} (fix: --auto-cap {DEFAULT_AUTO_CAP})")
        time_cap = getattr(args, "auto_time", None)
        try:
            time_s = parse_duration(time_cap)
        except SparknetError:
            raise SparknetError(f"--auto-time: {time_cap!r} is not a duration (fix: use e.g. 2h, 30m, 90s)") from None
        if time_s is not None and time_s <= 0:
            raise SparknetError(f"--auto-time: must be > 0, got {time_cap!r} (fix: use e.g. 2h, or leave it out)")
        return AutoBudget(cap, time_s), parse_duration(args.timeout)
    try:
        proxy = parse_tokens(args.proxy_tokens)
    except ValueError as exc:
        raise SparknetError(f"--proxy-tokens: {exc} (fix: use e.g. {example}, or auto)") from None
    if proxy <= 0:
        raise SparknetError(f"--proxy-tokens: must be > 0 (fix: use e.g. {example}, or auto)")
    return proxy, parse_duration(args.timeout)


def study_settings(args, budget: tuple[int | AutoBudget, float | None], base: RunConfig, default_name: str, *,
                   objective: Objective | None = None) -> dict[str, Any]:
    """The shared flags as a StudyKind's fields: `budget` from `parse_budget`, the study's name (--study, else
    `default_name`) and storage (default: the lab's SQLite file, `base`'s lab), the adequacy margin. --proxy-tokens
    auto: the budget the study stored if it has one, else the cap until the probe has run (`resolve_auto_budget`);
    with --dry-run, what the probe would do (`objective`: the slices it reads; default --objective's)."""
    proxy, timeout = budget
    auto = None
    t = base.train
    if isinstance(proxy, AutoBudget):
        if proxy.cap < t.batch_tokens:
            raise SparknetError(f"--auto-cap {proxy.cap:,}: less than one optimizer step of train.batch_tokens "
                                f"{t.batch_tokens:,} (fix: --auto-cap {DEFAULT_AUTO_CAP}, at least "
                                f"{t.batch_tokens:,}, or lower train.batch_tokens)")
        auto = {"cap": proxy.cap, "time_cap_s": proxy.time_cap_s}
        proxy = proxy.cap
    if not args.storage:  # the lab's own database: its folder is made here (any other must exist already)
        check_lab(base.lab_path)
        base.lab_path.mkdir(parents=True, exist_ok=True)
    else:
        check_storage_url(args.storage)
    if base.train.batch_tokens > proxy:  # a trial's budget is the proxy's: it must hold one optimizer step
        raise SparknetError(f"--proxy-tokens {proxy:,}: less than one optimizer step of train.batch_tokens "
                            f"{t.batch_tokens:,} (fix: --proxy-tokens {t.batch_tokens:,} or more, or lower "
                            f"train.batch_tokens to at most {proxy // t.seq_len * t.seq_len:,})")
    name, url = parse_study_name(args.study or default_name), args.storage or default_storage(base.lab_path)
    check_out_folder(out_folder(args.out, name), name, url)
    margin = getattr(args, "adequacy_margin", MARGIN)
    if auto is not None:
        stored = _stored_budget(url, name, args.heartbeat)
        if stored is not None:
            proxy = int(stored["sparknet.proxy_tokens"])
            auto = dict(stored.get("sparknet.proxy_auto") or {}, chosen=proxy)
            print(f"--proxy-tokens auto: study {name} has its budget stored, {proxy:,} tokens; using it, not probing "
                  f"again", flush=True)
        elif getattr(args, "dry_run", False):
            if objective is None:
                with contextlib.suppress(SparknetError):
                    objective = Objective.parse(getattr(args, "objective", None) or "val",
                                                [s.name for s in base.mixture.sources])
            from sparknet.proxy_auto import dry_run_lines

            print("\n".join(dry_run_lines(base, objective=objective, cap=auto["cap"], margin=margin,
                                          study_name=name, time_cap_s=auto["time_cap_s"])), flush=True)
    return {"study_name": name, "storage_url": url,
            "out_dir": Path(args.out) if args.out else None, "proxy_tokens": proxy, "timeout_s": timeout,
            "heartbeat_s": args.heartbeat, "progress": args.progress, "adequacy_margin": margin,
            "adequacy_enforced": not getattr(args, "no_adequacy", False), "auto_budget": auto}


def _stored_budget(url: str, name: str, heartbeat_s: int) -> dict[str, Any] | None:
    """The user attrs of study `name` if it exists and has a budget stored; a SQLite file not there yet is not
    created to find out."""
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return None
    quiet_optuna()
    study = find_study(name, open_storage(url, heartbeat_s))
    if study is None or "sparknet.proxy_tokens" not in study.user_attrs:
        return None
    return study.user_attrs


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
