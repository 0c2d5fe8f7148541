"""A study's worker: the loop that takes trials (`Worker.work`) and the trial itself (`Worker.run_trial`: train,
measure the objective, tell the study how it ended), with interrupts and heartbeats. What a trial is comes from the
study's kind (`sparknet.study.StudyKind`: `take`, `setup_trial`, `report`, `trial_tags`, `record`).

- Interrupts: Ctrl-C or SIGTERM fails the running trial and queues it again (`Worker.abandon`); the steps that must
  not be cut in half (take a trial and start its heartbeat; record how a trial ended) run first
  (`signals_deferred`).
- The trial: a `sparknet.run` training whose every evaluation records every source's held-out loss, then the
  objective (`sparknet.objective`) measured on the result; a pruned or diverged trial is a result, an error fails it
  with the reason (never retried: its parameters do not work), nothing is left RUNNING.
- A worker that was only stopped (SIGSTOP, a suspended machine) and wakes after its trial was failed as stale trains
  on: the retry finds the run folder locked and is not run, and the woken worker records its result as a complete
  copy of the trial (`_CompleteCopy`).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from typing import Any

from sparknet.config import RunConfig
from sparknet.errors import SparknetError
from sparknet.study_storage import (
    TrialIds,
    add_complete,
    complete_trials,
    fail_stale_trials,
    first_beat,
    requeue,
    rescue_unbeaten,
    start_heartbeat,
    study_lock,
    tell,
    update_finished_trial_error,
)

# A run of trials whose config cannot be built (a sampled combination no single bound shows, e.g. a wsd schedule
# whose warmup + decay exceed the run): after this many in a row the worker stops and says so.
MAX_UNBUILDABLE_IN_A_ROW = 3
DONE = "done"  # what a kind's `take` returns when the study has every trial it wants


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
# Trials


class TrialPruned(Exception):
    """Raised from the training's evaluation hook; `execute` ends the MLflow run as KILLED / pruned."""

    run_status = "KILLED"
    state_status = "pruned"


def eval_index(tokens: int, every_tokens: int) -> int:
    """The pruning step of an evaluation: which `every_tokens` boundary it is (0 for the first), from the tokens
    trained, so a trial resumed from a checkpoint reports at the same steps as one that ran through."""
    return tokens // every_tokens - 1


class Worker:
    """One worker of a study of kind `kind` (a `sparknet.study.StudyKind`) on the Optuna storage `storage`."""

    def __init__(self, kind, storage):
        self.kind = kind
        self.storage = storage
        self.ids: TrialIds | None = None

    def work(self, study, poll_s: float = 2.0) -> bool:
        """Take trials until the study has all it wants (True) or the timeout passes (False)."""
        kind = self.kind
        self.ids = ids = TrialIds(self.storage, study)
        deadline = time.time() + kind.timeout_s if kind.timeout_s else math.inf
        parent = study.user_attrs.get("mlflow_parent_run_id")
        unbuildable = 0
        while time.time() < deadline:
            trial = stop = None
            try:
                # Decide, take and give the first heartbeat as one step: an interrupt waits for it, so a trial is never
                # RUNNING without a heartbeat (nothing would ever fail it).
                with signals_deferred():
                    with study_lock(kind.storage_url, kind.study_name):
                        rescue_unbeaten(study, ids)  # a worker died between taking its trial and the first beat
                        fail_stale_trials(study)  # a killed worker's trial: failed, then retried
                        trial = kind.take(study)
                        if trial == DONE:
                            return True
                        if trial is not None:
                            first_beat(ids, trial.number)  # before the lock is released
                    if trial is not None:
                        stop = start_heartbeat(ids, trial.number, max(1.0, kind.heartbeat_s / 2))
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
                raise SparknetError(f"study {kind.study_name}: {unbuildable} trials in a row had parameters the "
                                    f"config rejects (see their reasons in the table: the last is trial "
                                    f"{trial.number}) (fix: {kind.unbuildable_fix()})")
        print(f"timeout: stopping after {kind.timeout_s:.0f} s; rerun the same command to continue", flush=True)
        return False

    def abandon(self, study, trial, reason: str, *, retry: bool) -> None:
        """Mark a trial failed with its reason (and queue it again when `retry`): never left RUNNING. With a retry
        both happen under the study lock, so no other worker decides in between on a study short of that trial."""
        with signals_deferred():
            with study_lock(self.kind.storage_url, self.kind.study_name) if retry else contextlib.nullcontext():
                if self.ids.frozen(trial.number).state.is_finished():
                    return  # failed as stale by another worker meanwhile (and queued again by Optuna's retry)
                trial.set_user_attr("reason", reason[:1000])
                tell(study, trial, state="FAIL")
                if retry:
                    requeue(study, self.ids.frozen(trial.number), keep_attrs=self.kind.requeue_keep)

    def run_trial(self, study, trial, parent_run_id: str | None) -> str:
        """Train one trial and tell the study how it ended. Returns "complete", "pruned" or "unbuildable"
        (its parameters make no valid config: failed, the worker goes on); an interrupt fails it and queues it
        again (then re-raises); any other error fails it with the reason (then re-raises)."""
        from sparknet.locks import RunBusy
        from sparknet.run import execute  # looked up per trial: tests replace it
        from sparknet.train import Diverged

        kind = self.kind
        objective = kind.objective
        frozen = self.ids.frozen(trial.number)
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
        finished_error = update_finished_trial_error()
        try:
            cfg = kind.setup_trial(study, trial, frozen, origin)
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
                    kind.report(trial, index, tokens, val)
                except finished_error:
                    # Another worker failed this trial as stale (this process was stopped or cut off from the
                    # storage for longer than the grace period) while it still trains: the run goes on (its folder is
                    # locked, so the retry did not train it twice) and its result is recorded as a copy at the end.
                    orphaned.append(index)
                    print(f"trial {trial.number}: failed as stale by another worker while still training here; "
                          f"training on, the result will be recorded as a copy", flush=True)

            tags = {"sparknet.study": kind.study_name, "sparknet.trial": str(trial.number),
                    "sparknet.objective": objective.name} | kind.trial_tags(trial)
            stage = "training"
            out = execute(cfg, progress=kind.progress, parent_run_id=parent_run_id, on_eval=on_eval, extra_tags=tags)
            stage = f"measuring {objective.metric}"
            metrics = objective.measure(out, cfg)
            curve_refs = self._curve_references(frozen, cfg, curve, out)
        except (TrialPruned, Diverged) as exc:  # a bad config is a result: recorded, and the study goes on
            if self.ids.frozen(trial.number).state.is_finished():  # failed as stale meanwhile
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
            now = self.ids.frozen(trial.number)
            if orphaned or now.state.is_finished():
                target = _CompleteCopy(now, curve)
            target.set_user_attr("val_loss", {k: float(v) for k, v in out.result["val_loss"].items()})
            if "wikitext-valid/bpb" in metrics:
                target.set_user_attr("wikitext_valid_bpb", metrics["wikitext-valid/bpb"])
            for key, ref in reference_attrs(out.result).items():  # the verdict's (sparknet.adequacy)
                target.set_user_attr(key, ref)
            # What the learning curve needs to place each evaluation (`adequacy.eval_tokens`), and its end.
            target.set_user_attr("eval_every_tokens", int(cfg.eval.every_tokens))
            target.set_user_attr("batch_tokens", int(cfg.train.batch_tokens))
            target.set_user_attr("train_tokens", int(out.result.get("tokens") or cfg.mixture.total_tokens))
            if curve_refs:
                target.set_user_attr("ref_bigram_by_eval", curve_refs)
            downstream = {r["task"]: {m: v for m, v in r["metrics"].items()} | {f"{m}_stderr": v for m, v in
                                                                               r["stderr"].items() if v == v}
                          for r in out.result.get("downstream") or []}
            if downstream:  # the report items every run ends with: the ablation's source x task table
                target.set_user_attr("downstream", downstream)
            target.set_user_attr("mlflow_run_id", out.mlflow_run_id or "")
            target.set_user_attr("run_dir", str(out.run_dir))
            target.set_user_attr("seconds", out.result["seconds"])  # training (steps, evaluations, checkpoints)
            kind.record(target, out, metrics, cfg)
            target.set_user_attr("wall_seconds", time.perf_counter() - started)  # everything, setup and logging too
            if target is trial:
                tell(study, trial, value)
            else:
                with study_lock(kind.storage_url, kind.study_name):
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

    def _curve_references(self, frozen, cfg: RunConfig, curve: dict, out) -> dict[str, dict[str, float]]:
        """For the study's learning-curve run (`kind.curve_run`): the bigram reference of a run of each evaluation's
        budget, {eval index: {source: nats}} (`sparknet.adequacy.reference_curve`); {} otherwise, or when it cannot be
        counted (a warning: the run's result is not lost over it)."""
        if not curve or not self.kind.curve_run(frozen, cfg):
            return {}
        from sparknet.adequacy import eval_tokens, reference_curve

        every, batch = cfg.eval.every_tokens, cfg.train.batch_tokens
        budgets = {k: eval_tokens(int(k), every, batch) for k in curve}
        budgets = {k: t for k, t in budgets.items() if t < int(out.result.get("tokens") or cfg.mixture.total_tokens)}
        try:
            return reference_curve(cfg, budgets)
        except Exception as exc:  # noqa: BLE001  (a figure for the verdict's curve, never worth the trial)
            print(f"warning: the learning curve's references were not counted: {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)
            return {}

    def _log_to_child(self, cfg: RunConfig, run_id: str, metrics: dict[str, float]) -> None:
        """The objective's own number on the trial's MLflow run (the run itself logs only val/loss)."""
        from sparknet.tracking import log_to_run, resolve_uri

        extra = {k: v for k, v in metrics.items() if not k.startswith("val/")}
        if not extra:  # the held-out losses are the run's own metrics already
            return
        tuned_on = self.kind.objective.tuned_on
        try:
            log_to_run(resolve_uri(cfg.tracking.uri, cfg.lab_path), run_id, extra,
                       tags={"sparknet.tuned_on": tuned_on} if tuned_on else None, timeout_s=cfg.tracking.timeout_s)
        except SparknetError as exc:  # the study holds the value; MLflow missing it is not worth a failed trial
            print(f"warning: {exc}", file=sys.stderr, flush=True)


def reference_attrs(result: dict) -> dict[str, Any]:
    """The run's count-table references (`sparknet.references`) as a trial keeps them beside `val_loss`:
    `val_ref_unigram`, `val_ref_bigram` ({source: nats/token}), and when WikiText-2 was scored against them,
    `wikitext_valid_ref_unigram_bpb`, `wikitext_valid_ref_bigram_bpb` and the text's `wikitext_valid_tokens_per_byte`
    (what converts the adequacy margin to bits per byte). A run without references (skipped) keeps none."""
    out: dict[str, Any] = {}
    for key in ("val_ref_unigram", "val_ref_bigram"):
        if result.get(key):
            out[key] = {k: float(v) for k, v in result[key].items()}
    for key in ("wikitext_valid_ref_unigram_bpb", "wikitext_valid_ref_bigram_bpb"):
        if result.get(key) is not None:
            out[key] = float(result[key])
    wv = (result.get("references") or {}).get("wikitext_valid") or {}
    if wv.get("bytes") and wv.get("text_tokens"):
        out["wikitext_valid_tokens_per_byte"] = wv["text_tokens"] / wv["bytes"]
    return out


class _CompleteCopy:
    """A finished trial's result, recorded as a new COMPLETE trial with the same parameters: for a trial that another
    worker failed as stale while this one still trained it (a finished trial cannot change its state). It takes
    `set_user_attr` as a trial does, so a kind's `record` fills it the same way."""

    def __init__(self, frozen, curve: dict[str, Any]):
        self.frozen = frozen
        self.user_attrs = dict(frozen.user_attrs, val_loss_by_eval=curve)
        self.user_attrs.pop("reason", None)  # the stale failure's reason is the original's, not this result's
        self.number = frozen.number

    def set_user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = value

    def add_to(self, study, value: float) -> int:
        # `completed_for`: the trial the chain of retries started from, so that a retry of it taken later is known as
        # a duplicate (Worker.run_trial).
        system = dict(self.frozen.system_attrs,
                      completed_for=self.frozen.system_attrs.get("failed_trial", self.frozen.number))
        return add_complete(study, self.frozen, value, self.user_attrs, system)
