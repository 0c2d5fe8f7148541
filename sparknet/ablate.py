"""python -m sparknet.ablate: a mixture ablation as one command — which sources, in which proportions?

    python -m sparknet.ablate MIXTURE.yaml --design DESIGN [--proxy-tokens 20M] [--objective wikitext-valid]
           [--study NAME] [--storage URL] [--seeds K] [--confirm] [--stage I] [key=value ...]

DESIGN (sparknet.mixfit.design_points) is `leave-one-out`, `single-source`, `grid:STEP`, `random:N` (seeded
Dirichlet draws, as RegMix) or a YAML file of weight vectors. Each design point is a proxy run through the machinery
of `sparknet.sweep` (`sparknet.study`, the one Optuna layer): the points x seeds are enqueued in an Optuna study with
fixed parameters (point index, model seed `train.seed`, the weights), so several workers on one storage (PostgreSQL
for several machines), heartbeats, retries and resume come for free, and exactly the planned runs finish: a worker
takes only queued runs, and before taking one it queues again any planned run that no trial holds. Each run is an
MLflow child run of the study's parent run.

Token stores are prepared once, before the first run, for the largest share any point gives each source (a point's
weights change only the plan, not the stores; a source at weight 0 still needs its store for its held-out loss);
then every point's plan is checked against them (a source that cannot supply its share within `max_repeats` is a
one-line error naming the point), so nothing fails half-way through a study.

What is minimized comes from `sparknet.objective`: `wikitext-valid` (the default: bits per byte on the WikiText-2
validation split), `val` or `val/<source>`. Every run records every source's held-out loss and its realized tokens
per source, so one study can be read against any of them. A study remembers its design, seeds, proxy budget,
objective and recipe: a rerun with others is a one-line error naming the difference (`--seeds` may grow: the new
seeds' runs are queued).

The answer, written once per study (whatever the number of workers) to `experiments/<study>/`: README.md (the
question, the command, the table sorted by the objective with the mean and spread over seeds, what was found in
plain sentences, the fitted model's verdict), results.csv (one row per run), plots (each source's held-out loss
against its own weight; the objective against the weights: bars for leave-one-out, a ternary plot for three
sources), and best.yaml: the fitted model's predicted mixture when its held-out rank correlation is trusted, else the
best measured one, at the mixture's full budget (`python -m sparknet.run experiments/<study>/best.yaml`; `--confirm`
trains it, once per study).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sparknet.config import RunConfig, load_config, to_dict
from sparknet.errors import SparknetError, cli_main
from sparknet.mixfit import Fit, Point, design_points, fit_objective
from sparknet.objective import WIKITEXT_VALID, Objective
from sparknet.study import (
    DONE,
    Worker,
    budget_objective_difference,
    common_identity,
    counts,
    create_study,
    default_storage,
    enqueue,
    find_study,
    finished_trials,
    fixed_sampler_and_no_pruner,
    interrupt_handlers,
    kind_difference,
    markdown_table,
    open_storage,
    parse_budget,
    parse_study_name,
    quiet_optuna,
    recipe_difference,
    redact,
    signals_deferred,
    store_identity,
    study_job,
    study_lock,
    tell,
)

DEFAULT_OBJECTIVE = WIKITEXT_VALID
DEFAULT_PROXY = "20M"
LOO = "leave-one-out"


def _key_of(trial) -> tuple[int, int] | None:
    """(point index, model seed) of a trial: its params once drawn, else the fixed params it was queued with
    (Optuna's heartbeat retry and our requeue copy both), else the user attrs set at enqueue."""
    system = getattr(trial, "system_attrs", {})  # a FrozenTrial's (a live Trial has params and user attrs only)
    for source in (trial.params, system.get("fixed_params") or {}, trial.user_attrs):
        if "point" in source and "seed" in source:
            return int(source["point"]), int(source["seed"])
    return None


def _weights_text(names: tuple[str, ...], weights: tuple[float, ...]) -> str:
    return " ".join(f"{n}={f'{w:.3f}'.rstrip('0').rstrip('.')}" for n, w in zip(names, weights))


@dataclass
class Ablation(Worker):
    mixture: str
    design: str  # as given: leave-one-out, single-source, grid:STEP, random:N or a file
    points: list[Point]
    names: tuple[str, ...]  # the mixture's sources, in its order (the order of every weight vector)
    stage: int | None  # the stage whose weights are ablated (None: the sources' own weights)
    seeds: list[int]  # train.seed of each repeat: the mixture's seed, +1, ...
    proxy_tokens: int
    study_name: str
    storage_url: str
    base_overrides: list[str]
    objective: Objective
    timeout_s: float | None = None
    heartbeat_s: int = 60
    progress: bool = False
    design_seed: int = 0
    storage_given: bool = True  # whether --storage was given (the command written to the README says it only then)
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    # A run queued again after an interrupt keeps which point and seed it is, and its curve.
    requeue_keep = ("point", "seed", "point_name", "val_loss_by_eval")

    # -- the plan ------------------------------------------------------------------------------------

    def planned(self) -> list[tuple[int, int]]:
        """Every (point, seed), seed-major: a study cut short by --timeout has each point once before any twice."""
        return [(p, s) for s in self.seeds for p in range(len(self.points))]

    def weight_overrides(self, weights: tuple[float, ...]) -> list[str]:
        if self.stage is None:
            return [f"mixture.sources.{n}.weight={json.dumps(float(w))}" for n, w in zip(self.names, weights)]
        return [f"mixture.stages.{self.stage}.weights.{n}={json.dumps(float(w))}" for n, w in zip(self.names, weights)]

    def point_config(self, point: int, seed: int) -> RunConfig:
        """The proxy run of one design point: the mixture, the user's overrides, then the point's weights, the proxy
        budget and the seed. Only the final evaluation: an ablation prunes nothing, so evaluating every source's
        held-out slice along the way would only cost time."""
        k = self.seeds.index(seed) if seed in self.seeds else seed
        extra = [f"mixture.total_tokens={self.proxy_tokens}", f"eval.every_tokens={self.proxy_tokens}",
                 "eval.wikitext=[]", f"tracking.experiment={self.study_name}", f"train.seed={seed}",
                 f"name={self.study_name[:48]}-p{point}-s{k}"]
        return load_config(self.mixture, [*self.base_overrides, *extra,
                                          *self.weight_overrides(self.points[point].weights)])

    def full_config(self, weights: tuple[float, ...], extra: list[str] = ()) -> RunConfig:
        """A mixture at the full budget (the mixture's own, or the user's mixture.total_tokens) with `weights`."""
        return load_config(self.mixture, [*self.base_overrides, *extra, *self.weight_overrides(weights)])

    def params(self, point: int, seed: int) -> dict[str, Any]:
        return {"point": point, "seed": seed,
                **{f"weight.{n}": float(w) for n, w in zip(self.names, self.points[point].weights)}}

    # -- the shared worker's hooks (sparknet.study.Worker) ---------------------------------------

    def take(self, study):
        """The next queued run. Before taking it, every planned (point, seed) that no trial finished, runs or waits
        for is queued (again): a run whose retries Optuna gave up on, or one that --seeds added. A queued trial whose
        run finished meanwhile (a retry racing its original) is failed as a duplicate, never run twice."""
        trials = study.get_trials(deepcopy=False)
        done, active = set(), set()
        for t in trials:
            key = _key_of(t)
            if t.state.name in ("COMPLETE", "PRUNED"):
                done.add(key)
            elif t.state.name in ("RUNNING", "WAITING"):
                active.add(key)
        planned = self.planned()
        if all(k in done for k in planned):
            return DONE
        waiting = sum(t.state.name == "WAITING" for t in trials)
        # A run folder another process holds: its trial was failed as stale while its worker trains on (and will
        # record the result). Neither queued again nor taken meanwhile.
        busy = {key for key in planned if key not in done and key not in active and self.run_busy(key)}
        for key in planned:
            if key not in done and key not in active and key not in busy:
                enqueue(study, self.params(*key), {"point": key[0], "seed": key[1],
                                                   "point_name": self.points[key[0]].name})
                waiting += 1
        running = {_key_of(t) for t in trials if t.state.name == "RUNNING"}
        while waiting:
            trial = study.ask()  # the oldest queued trial (RUNNING from here on)
            waiting -= 1
            key = _key_of(study._storage.get_trial(trial._trial_id))
            why = ("it is not one of this study's planned runs" if key not in planned else
                   "its run already finished" if key in done else
                   "another trial is running it" if key in running else
                   f"its run folder is in use by {self.run_busy(key) or 'another process'}"
                   if key in busy or self.run_busy(key) else "")
            if not why:
                return trial
            trial.set_user_attr("reason", f"a duplicate, not run: {why}")
            tell(study, trial, state="FAIL")
        return None  # the remaining runs are running elsewhere: wait for them (they may die)

    def run_busy(self, key: tuple[int, int]) -> str:
        """Who holds the run folder of (point, seed), "" if nobody does."""
        from sparknet.run import run_busy, run_dir_for

        dirs = self.__dict__.setdefault("_run_dirs", {})  # a config per key is read once, not at every take
        if key not in dirs:
            dirs[key] = run_dir_for(self.point_config(*key))
        return run_busy(dirs[key])

    def setup_trial(self, study, trial, frozen, origin: int) -> RunConfig:
        point, seed = _key_of(frozen)
        p = self.points[point]
        # Recorded as the trial's params (Optuna's views, dashboards); the values are the fixed ones it was queued
        # with, so the sampler is never asked.
        trial.suggest_int("point", 0, max(0, len(self.points) - 1))
        trial.suggest_int("seed", seed, seed)
        for n in self.names:
            trial.suggest_float(f"weight.{n}", 0.0, 1.0)
        trial.set_user_attr("point", point)
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("point_name", p.name)
        print(f"trial {trial.number}: point {point} ({p.name}: {_weights_text(self.names, p.weights)}), seed {seed}"
              + (f" (retry of trial {origin})" if origin != trial.number else ""), flush=True)
        return self.point_config(point, seed)

    def trial_tags(self, trial) -> dict[str, str]:
        point, seed = _key_of(trial)
        return {"sparknet.kind": "ablate-point", "sparknet.point": str(point),
                "sparknet.point_name": self.points[point].name, "sparknet.seed": str(seed)}

    def record(self, trial, out, metrics: dict[str, float], cfg: RunConfig) -> None:
        from sparknet.mixture import build_plan

        plan = build_plan(cfg.mixture, cfg.train.seq_len)
        trial.set_user_attr("planned_tokens", {n: int(v) for n, v in zip(plan.source_names, plan.tokens_per_source())})
        # Counted from the batches the run trained on (train.py checks them against the plan as it ends).
        trial.set_user_attr("tokens_per_source", {k: int(v) for k, v in out.result["tokens_per_source"].items()})

    def unbuildable_fix(self) -> str:
        return "check the design's weights against the mixture (python -m sparknet.ablate ... --dry-run)"

    # -- the study ---------------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """The study user attrs that say what it is. The recipe is the mixture's with the first point's weights: the
        weights are the design's to say (compared as its points), so a grid over the same sources is the same study
        whatever weights the mixture file starts from."""
        base = self.full_config(self.points[0].weights)
        ident = common_identity("ablate", self.proxy_tokens, self.objective, base, self.mixture, self.base_overrides)
        return ident | {
            "sparknet.design": {"design": self.design_label(), "stage": self.stage, "sources": list(self.names),
                                "points": [[p.name, list(p.weights)] for p in self.points]},
            "sparknet.seeds": len(self.seeds),
        }

    def design_label(self) -> str:
        if Path(self.design).suffix in (".yaml", ".yml"):
            return f"file {Path(self.design).name}"
        return self.design + (f" (seed {self.design_seed})" if self.design.startswith("random:") else "")


def identity_difference(stored: dict[str, Any], now: dict[str, Any]) -> str | None:
    """The first way `now` differs from what the study stored, in words; None when it is the same study. More
    seeds than the study has is not a difference: it grows."""
    diff = kind_difference(stored, now) or budget_objective_difference(stored, now)
    if diff:
        return diff
    old, new = stored.get("sparknet.design"), now["sparknet.design"]
    if old is not None:
        if old.get("stage") != new["stage"]:
            def what(stage: int | None) -> str:
                return "the sources' own weights" if stage is None else f"stage {stage}"

            return f"it ablates {what(old.get('stage'))}, this command {what(new['stage'])} (--stage)"
        if old.get("sources") != new["sources"]:
            return f"its sources are {', '.join(old.get('sources', []))}, this mixture's {', '.join(new['sources'])}"
        if old.get("points") != new["points"]:
            return (f"its design is {old.get('design')} ({len(old.get('points', []))} points), this command's is "
                    f"{new['design']} ({len(new['points'])} points) (--design)")
    k_old = stored.get("sparknet.seeds")
    if k_old is not None and now["sparknet.seeds"] < k_old:
        return (f"it has {k_old} seeds per point, this command asks for {now['sparknet.seeds']} (--seeds may grow, "
                f"not shrink: --seeds {k_old})")
    return recipe_difference(stored, now)


def create_or_load(abl: Ablation, storage, lab: Path):
    """The study (created once, under the lock): checked against what it was created as, every planned run
    queued, and the MLflow parent run."""
    sampler, pruner = fixed_sampler_and_no_pruner()
    identity = abl.identity()
    with signals_deferred(), study_lock(abl.storage_url, abl.study_name):
        study = create_study(abl.study_name, storage, sampler, pruner)
        diff = identity_difference(study.user_attrs, identity)
        if diff:
            raise SparknetError(f"--study {abl.study_name}: {diff} (fix: rerun with the study's settings, or start "
                                f"another study with --study NAME)")
        grown = study.user_attrs.get("sparknet.seeds", len(abl.seeds)) < len(abl.seeds)
        store_identity(study, identity)
        if not study.trials or grown:
            queued = {_key_of(t) for t in study.get_trials(deepcopy=False)}
            for key in abl.planned():
                if key not in queued:
                    enqueue(study, abl.params(*key), {"point": key[0], "seed": key[1],
                                                      "point_name": abl.points[key[0]].name})
        if "mlflow_parent_run_id" not in study.user_attrs:
            study.set_user_attr("mlflow_parent_run_id", _start_parent(abl, lab))
    return study


def _parent_tracker(abl: Ablation, lab: Path):
    """The tracker of the ablation's MLflow parent run (None when the mixture turns tracking off)."""
    from sparknet.tracking import open_tracker

    cfg = abl.full_config(abl.points[0].weights)
    if not cfg.tracking.enabled:
        return None
    d = lab / "ablations" / abl.study_name
    d.mkdir(parents=True, exist_ok=True)
    return open_tracker(True, cfg.tracking.uri, abl.study_name, lab, d, timeout_s=cfg.tracking.timeout_s)


def _start_parent(abl: Ablation, lab: Path) -> str | None:
    tracker = _parent_tracker(abl, lab)
    if tracker is None:
        return None
    params = {"study": abl.study_name, "storage": redact(abl.storage_url), "design": abl.design_label(),
              "points": str(len(abl.points)), "seeds": str(len(abl.seeds)), "proxy_tokens": str(abl.proxy_tokens),
              "mixture": str(abl.mixture), "objective": abl.objective.name, "sources": ",".join(abl.names),
              "stage": "" if abl.stage is None else str(abl.stage)}
    tags = {"sparknet.study": abl.study_name, "sparknet.kind": "ablate", "sparknet.objective": abl.objective.name}
    if abl.objective.tuned_on:
        tags["sparknet.tuned_on"] = abl.objective.tuned_on
    return tracker.start(params, tags, run_name=f"ablate {abl.study_name}")


# ---------------------------------------------------------------------------------------------
# Before the first run: every point checked, the stores prepared once


def check_points(abl: Ablation) -> list:
    """Every point's proxy config and plan (a source a point gives a weight too small for one sequence is an error
    naming the point); returns the plans. No data is read."""
    from sparknet.mixture import build_plan

    plans = []
    for i, p in enumerate(abl.points):
        try:
            cfg = abl.point_config(i, abl.seeds[0])
            plans.append(build_plan(cfg.mixture, cfg.train.seq_len))
        except SparknetError as exc:
            raise SparknetError(f"--design {abl.design}: point {i} ({p.name}: {_weights_text(abl.names, p.weights)}): "
                                f"{exc}") from None
    return plans


def prepare_stores(abl: Ablation, plans: list):
    """Prepare each source's store once for the largest share any point gives it, then check every point's plan
    against the stores (within each source's max_repeats), before the first run trains: a study never stops
    half-way on a store, and no store grows while the workers train on it."""
    from sparknet.prepare import Prepared, _report, check_budget, prepare
    from sparknet.run import prepare_lock

    seqs = np.array([plan.sequences_per_source() for plan in plans])  # [points, sources]
    # The point that needs the most of each source; preparing those points' plans gives every source the most any
    # point needs (prepare extends a store only as far as a plan needs, so this is the whole tokenization).
    needy = list(dict.fromkeys(int(np.argmax(seqs[:, i])) for i in range(len(abl.names))))
    cfgs = [abl.point_config(i, abl.seeds[0]) for i in range(len(abl.points))]
    lab = cfgs[0].lab_path
    print(f"preparing the token stores for the largest share of each source over {len(abl.points)} points "
          f"(points {', '.join(map(str, needy))})", flush=True)
    def at(i: int) -> str:
        p = abl.points[i]
        return (f"--design {abl.design}: point {i} ({p.name}: {_weights_text(abl.names, p.weights)}) at "
                f"--proxy-tokens {abl.proxy_tokens:,}")

    with prepare_lock(lab):
        for i in needy:
            try:  # a local source too small for this point's share is found here, before anything is tokenized
                prepared = prepare(cfgs[i], progress=abl.progress, write_report=False)
            except SparknetError as exc:
                raise SparknetError(f"{at(i)}: {exc}") from None
        prepared = prepare(cfgs[needy[0]], progress=False, write_report=False)  # the stores as they now are
    for i, (cfg, plan) in enumerate(zip(cfgs, plans)):
        reports = [_report(cfg, plan, j, prepared.stores[n]) for j, n in enumerate(plan.source_names)]
        try:
            check_budget(Prepared(cfg, plan, prepared.tokenizer, prepared.stores, reports))
        except SparknetError as exc:
            raise SparknetError(f"{at(i)}: {exc}") from None
    return prepared


# ---------------------------------------------------------------------------------------------
# The end, once per study: table, findings, fitted model, plots, best.yaml, MLflow parent, --confirm


def results_frame(abl: Ablation, study):
    """One row per finished run (the planned point x seed), sorted by the objective."""
    import pandas as pd

    metric = abl.objective.metric
    rows = []
    for t in finished_trials(study):
        key = _key_of(t)
        if key is None or key[0] >= len(abl.points):
            continue
        point, seed = key
        p = abl.points[point]
        val = t.user_attrs.get("val_loss", {})
        toks = t.user_attrs.get("tokens_per_source", {})
        planned = t.user_attrs.get("planned_tokens", {})
        row = {"point": point, "mixture": p.name, "seed": seed, "trial": t.number, "state": t.state.name}
        row |= {f"weight.{n}": w for n, w in zip(abl.names, p.weights)}
        row |= {f"tokens.{n}": toks.get(n) for n in abl.names}
        row |= {f"planned.{n}": planned.get(n) for n in abl.names}
        row |= {f"val/loss/{n}": val.get(n) for n in abl.names}
        row["val/loss"] = float(np.mean([val[n] for n in abl.names])) if all(n in val for n in abl.names) else None
        if "wikitext_valid_bpb" in t.user_attrs:
            row["wikitext-valid/bpb"] = t.user_attrs["wikitext_valid_bpb"]
        row[metric] = t.value
        row |= {"seconds": t.user_attrs.get("seconds"), "note": (t.user_attrs.get("reason") or "")[:80]}
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values([metric, "point", "seed"], na_position="last").reset_index(drop=True)
    return df


def points_frame(abl: Ablation, runs):
    """One row per design point: its weights, realized tokens, the mean held-out losses and the objective's mean
    and standard deviation over the seeds, sorted by the mean objective."""
    import pandas as pd

    metric = abl.objective.metric
    rows = []
    for point, g in runs.groupby("point", sort=True):
        values = g[metric].dropna().to_numpy(dtype=float)
        row = {"point": int(point), "mixture": g["mixture"].iloc[0]}
        row |= {f"weight.{n}": float(g[f"weight.{n}"].iloc[0]) for n in abl.names}
        # Identical over seeds (the plan does not depend on train.seed): the first run's count stands for all.
        row |= {f"tokens.{n}": g[f"tokens.{n}"].iloc[0] for n in abl.names}
        row |= {f"val/loss/{n}": float(g[f"val/loss/{n}"].mean()) for n in abl.names}
        if metric != "val/loss":
            row["val/loss"] = float(g["val/loss"].mean())
        row[metric] = float(values.mean()) if len(values) else math.nan
        row["sd"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        row["seeds"] = len(values)
        rows.append(row)
    df = pd.DataFrame(rows)
    return df.sort_values([metric, "point"], na_position="last").reset_index(drop=True) if len(df) else df


def _change(delta: float) -> str:
    return "raised" if delta > 0 else "lowered" if delta < 0 else "left"


def findings(abl: Ablation, pts) -> list[str]:
    """What the table says, in plain sentences (numbers from the table, nothing else)."""
    metric, unit = abl.objective.metric, abl.objective.unit
    m = pts.set_index("mixture")
    sds = pts["sd"].dropna()
    noise = float(sds.median()) if len(sds) else None
    out = []

    def versus_noise(delta: float) -> str:
        if noise is None or noise == 0:
            return ""
        ratio = abs(delta) / noise
        return (f" ({ratio:.0f}x the spread between seeds)" if ratio >= 2 else
                " (within the spread between seeds: not told apart from noise)")

    if abl.design == LOO and "base" in m.index:
        base = m.loc["base"]
        effects = {}
        for n in abl.names:
            name = f"without {n}"
            if name not in m.index:
                continue
            row = m.loc[name]
            d_own = row[f"val/loss/{n}"] - base[f"val/loss/{n}"]
            d_obj = row[metric] - base[metric]
            effects[n] = d_obj
            own = (f"{_change(d_own)} val/{n} by {abs(d_own):.2f} nats/token ({base[f'val/loss/{n}']:.3f} -> "
                   f"{row[f'val/loss/{n}']:.3f})")
            if metric == f"val/loss/{n}":
                out.append(f"Removing {n} {own}{versus_noise(d_obj)}.")
            else:
                out.append(f"Removing {n} {own} and {_change(d_obj)} the objective {metric} by {abs(d_obj):.4f} "
                           f"{unit} ({base[metric]:.4f} -> {row[metric]:.4f}){versus_noise(d_obj)}.")
        if effects:
            worst = max(effects, key=effects.get)
            best = min(effects, key=effects.get)
            if effects[worst] > 0:
                out.append(f"The source the objective needs most is {worst} (removing it costs {effects[worst]:+.4f} "
                           f"{unit}{versus_noise(effects[worst]).replace(' (', ', ').rstrip(')')})"
                           + (f"; the one it misses least is {best} ({effects[best]:+.4f} {unit})"
                              if best != worst else "") + ".")
            else:
                out.append(f"Removing any one source did not raise the objective (removing {best} lowered it most, "
                           f"{effects[best]:+.4f} {unit}).")
    else:
        best, worst = pts.iloc[0], pts.dropna(subset=[metric]).iloc[-1]
        spread = worst[metric] - best[metric]
        out.append(f"The best measured mixture is {best['mixture']} "
                   f"({_weights_text(abl.names, tuple(best[f'weight.{n}'] for n in abl.names))}): {metric} "
                   f"{best[metric]:.4f} {unit}; the worst is {worst['mixture']} ({worst[metric]:.4f}), "
                   f"{spread:.4f} {unit} apart{versus_noise(spread)}.")
        if len(pts) > 1:
            second = pts.iloc[1]
            gap = second[metric] - best[metric]
            out.append(f"The runner-up, {second['mixture']}, is {gap:.4f} {unit} behind{versus_noise(gap)}.")
        for n in abl.names:
            w, loss = pts[f"weight.{n}"].to_numpy(), pts[f"val/loss/{n}"].to_numpy()
            if np.ptp(w) == 0:
                continue
            lo, hi = w.min(), w.max()
            at_lo, at_hi = loss[np.isclose(w, lo)].mean(), loss[np.isclose(w, hi)].mean()
            rho = _spearman(w, loss)
            out.append(f"val/{n} goes from {at_lo:.3f} nats/token at weight {lo:.2f} to {at_hi:.3f} at weight "
                       f"{hi:.2f}" + (f" (rank correlation with its weight {rho:+.2f} over {len(w)} points)"
                                      if not math.isnan(rho) else "") + ".")
    if noise is not None:
        out.append(f"The spread between seeds is {noise:.4f} {unit} (the standard deviation of {metric} over the "
                   f"{len(abl.seeds)} seeds of a point, median over points; largest {float(sds.max()):.4f}).")
    else:
        out.append("One seed per point: the noise between seeds is not measured (rerun with --seeds 2 or more: the "
                   "study grows).")
    return out


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)


def command_line(abl: Ablation) -> str:
    """The command that reruns (continues) this study."""
    parts = ["python", "-m", "sparknet.ablate", str(abl.mixture), "--design", abl.design, "--proxy-tokens",
             str(abl.proxy_tokens), "--objective", abl.objective.name, "--seeds", str(len(abl.seeds))]
    if abl.stage is not None:
        parts += ["--stage", str(abl.stage)]
    if abl.design.startswith("random:") and abl.design_seed:
        parts += ["--design-seed", str(abl.design_seed)]
    parts += ["--study", abl.study_name]
    if abl.storage_given:
        parts += ["--storage", redact(abl.storage_url)]
    env = ""
    wikitext = os.environ.get("SPARKNET_WIKITEXT")
    if abl.objective.kind == WIKITEXT_VALID and wikitext and not any(o.startswith("eval.wikitext_path=")
                                                                     for o in abl.base_overrides):
        env = f"SPARKNET_WIKITEXT={shlex.quote(wikitext)} "  # where the objective's text came from
    return env + " ".join(shlex.quote(p) for p in [*parts, *abl.base_overrides])


def _round_weights(w: tuple[float, ...]) -> tuple[float, ...]:
    """Three decimals (the config normalizes them again): a mixture a person can read."""
    r = [round(float(x), 3) for x in w]
    return tuple(x / sum(r) if sum(r) else x for x in r) if abs(sum(r) - 1) > 1e-9 else tuple(r)


def choose_best(abl: Ablation, pts, fit: Fit) -> tuple[tuple[float, ...], str]:
    """The mixture best.yaml holds and why: the fit's prediction when trusted, else the best measured point."""
    metric = abl.objective.metric
    if fit.trusted and fit.predicted_best is not None:
        w = _round_weights(fit.predicted_best)
        return w, (f"predicted by the fitted {fit.model} model ({metric} {fit.predicted_value:.4f} predicted; "
                   f"held-out rank correlation {fit.cv_spearman:.2f}): not measured yet, confirm it (--confirm)")
    best = pts.iloc[0]
    w = tuple(float(best[f"weight.{n}"]) for n in abl.names)
    why = f"the best measured point, {best['mixture']} ({metric} {best[metric]:.4f} at the proxy budget)"
    sds = pts["sd"].dropna()
    if len(pts) > 1 and len(sds) and pts.iloc[1][metric] - best[metric] < 2 * float(sds.median()):
        why += (f", within twice the seeds' spread ({float(sds.median()):.4f}) of the runner-up "
                f"{pts.iloc[1]['mixture']} ({pts.iloc[1][metric]:.4f}): not a clear winner")
    return w, why


def finish(abl: Ablation, study, lab: Path) -> dict:
    """Print the table and write experiments/<study>/: README.md, results.csv, plots, best.yaml; close the parent."""
    import pandas as pd

    obj = abl.objective
    metric = obj.metric
    runs = results_frame(abl, study)
    done = runs.dropna(subset=[metric]) if len(runs) else runs
    if not len(done):
        raise SparknetError(f"study {abl.study_name}: no run completed (fix: see the trials' reasons in MLflow, "
                            f"experiment {abl.study_name}, or lower train.lr if they diverged)")
    pts = points_frame(abl, runs)
    out_dir = Path("experiments") / abl.study_name  # relative to where the ablation runs (the repo, normally)
    out_dir.mkdir(parents=True, exist_ok=True)
    measured = pts.dropna(subset=[metric])
    fit = fit_objective(np.array([[r[f"weight.{n}"] for n in abl.names] for _, r in measured.iterrows()]),
                        measured[metric].to_numpy(dtype=float), abl.names, seed=abl.design_seed)
    weights, why = choose_best(abl, measured, fit)
    study.set_user_attr("sparknet.best_weights", list(weights))  # what --confirm trains, by whichever worker
    mismatched = [f"{r['mixture']} seed {r['seed']}" for _, r in runs.iterrows()
                  if any(r[f"tokens.{n}"] != r[f"planned.{n}"] for n in abl.names) and r["state"] == "COMPLETE"]

    # The table a person reads: weights, realized tokens, held-out losses, the objective's mean and spread.
    show = pts.rename(columns={**{f"weight.{n}": f"w {n}" for n in abl.names},
                               **{f"tokens.{n}": f"tokens {n}" for n in abl.names},
                               **{f"val/loss/{n}": f"val/{n}" for n in abl.names},
                               "sd": "sd over seeds"}).drop(columns=["point"])
    formats = {**{f"w {n}": ".3f" for n in abl.names}, **{f"tokens {n}": ",d" for n in abl.names},
               **{f"val/{n}": ".4f" for n in abl.names}, "val/loss": ".4f", metric: ".4f", "sd over seeds": ".4f"}
    for n in abl.names:
        show[f"tokens {n}"] = show[f"tokens {n}"].map(lambda v: int(v) if v is not None and v == v else None)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(show.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    facts = findings(abl, measured)
    for line in facts:
        print(line)
    print(f"fit: {fit.verdict}")
    runs.to_csv(out_dir / "results.csv", index=False)
    plots = make_plots(abl, runs, pts, fit, out_dir)
    full = abl.full_config(weights)
    tuned = (f"# Its {obj.tuned_on} figures are tuned (the study selected on them): report the test split.\n"
             if obj.tuned_on else "")
    (out_dir / "best.yaml").write_text(
        f"# The mixture of ablation {abl.study_name} ({metric}) at the mixture's full budget: {why}.\n"
        f"# Weights: {_weights_text(abl.names, weights)}"
        + (f" (stage {abl.stage}; the other stages keep theirs)" if abl.stage is not None else "") + ".\n"
        f"# Train it: python -m sparknet.run {out_dir / 'best.yaml'}\n" + tuned
        + yaml.safe_dump(to_dict(full), sort_keys=False))
    (out_dir / "README.md").write_text(readme(abl, study, show, formats, facts, fit, weights, why, plots, mismatched,
                                              len(runs)))
    _close_parent(abl, study, lab, out_dir, plots, float(measured[metric].iloc[0]), fit)
    print(f"wrote {out_dir}/ (README.md, results.csv, best.yaml, {', '.join(p.name for p in plots)})", flush=True)
    return {"dir": str(out_dir), "best_weights": weights, "best_value": float(measured[metric].iloc[0]),
            "fit": fit, "findings": facts}


def question(abl: Ablation) -> str:
    srcs = ", ".join(abl.names)
    where = f"stage {abl.stage} of " if abl.stage is not None else ""
    if abl.design == LOO:
        q = f"Which of the sources {srcs} does {abl.objective.metric} depend on, and by how much"
    elif abl.design == "single-source":
        q = f"Which single source of {srcs}, trained on alone, gives the best {abl.objective.metric}"
    else:
        q = f"Which weights of {srcs} minimize {abl.objective.metric}"
    return (f"{q}, for {where}`{abl.mixture}` at a {abl.proxy_tokens:,}-token proxy budget "
            f"({len(abl.points)} points x {len(abl.seeds)} seed{'s' if len(abl.seeds) > 1 else ''}, design "
            f"{abl.design_label()})?")


def readme(abl: Ablation, study, show, formats, facts, fit: Fit, weights, why, plots, mismatched, n_runs) -> str:
    obj = abl.objective
    metric = obj.metric
    wik = study.user_attrs.get("sparknet.objective_data") or {}
    base = load_config(abl.mixture, list(abl.base_overrides))
    lines = [f"# Mixture ablation {abl.study_name}", "", f"Question: {question(abl)}", "",
             f"Objective: {metric} ({obj.unit}, lower is better"
             + (f"; WikiText-2 validation split, text sha256 {wik.get('sha256', '')[:12]}, {wik.get('rows', '?')} "
                f"rows; the study selects on it, so its figures for the chosen mixture are tuned: report the test "
                f"split" if obj.tuned_on else "")
             + f"). Model {base.model.preset}, tokenizer {base.tokenizer.name}"
             + (f" ({base.tokenizer.vocab_size:,})" if base.tokenizer.name == "bpe" else "") + ".", "",
             "```", command_line(abl), "```", "",
             f"MLflow experiment `{abl.study_name}` (parent run {study.user_attrs.get('mlflow_parent_run_id')}); "
             f"Optuna study `{abl.study_name}`.", "",
             f"## Result ({n_runs} runs, sorted by {metric}; losses are means over seeds, in nats/token)", "",
             markdown_table(show, formats), "",
             ("Realized tokens per source equal each point's plan in every run (counted from the trained batches)."
              if not mismatched else f"Realized tokens differ from the plan in: {', '.join(mismatched)}."), "",
             "## What it says", "", *[f"- {f}" for f in facts], "",
             "## Fitted model", "",
             f"{fit.verdict[:1].upper()}{fit.verdict[1:]}."
             + (f" Models tried (held-out rank correlation): "
                f"{', '.join(f'{k} {v:.2f}' for k, v in fit.candidates.items())}." if fit.candidates else "")
             + (f" Predicted best: {_weights_text(abl.names, fit.predicted_best)} ({metric} {fit.predicted_value:.4f})."
                if fit.predicted_best is not None else ""), "",
             f"`best.yaml`: {why}; weights {_weights_text(abl.names, weights)} at the mixture's full budget. Train it "
             f"with `python -m sparknet.run experiments/{abl.study_name}/best.yaml`.", ""]
    for p in plots:
        lines += [f"![{p.stem}]({p.name})", ""]
    return "\n".join(lines)


def make_plots(abl: Ablation, runs, pts, fit: Fit, out_dir: Path) -> list[Path]:
    """Each source's held-out loss against its own weight; the objective against the weights (bars for
    leave-one-out, a ternary plot for three sources, a line for two, else bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, unit = abl.objective.metric, abl.objective.unit
    made = []
    n = len(abl.names)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), dpi=110, squeeze=False)
    for ax, name in zip(axes[0], abl.names):
        ax.scatter(runs[f"weight.{name}"], runs[f"val/loss/{name}"], s=14, alpha=0.5, color="tab:blue",
                   label="a run (seed)")
        ax.scatter(pts[f"weight.{name}"], pts[f"val/loss/{name}"], s=40, color="tab:red", marker="D",
                   label="mean over seeds")
        ax.set_xlabel(f"weight of {name}")
        ax.set_ylabel(f"val/{name} (nats/token)")
        ax.set_title(f"{name}: held-out loss vs its weight", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "loss_vs_weight.png"
    fig.savefig(path)
    plt.close(fig)
    made.append(path)

    measured = pts.dropna(subset=[metric])
    if abl.design != LOO and n == 3:
        import mpltern  # noqa: F401  (registers the "ternary" projection)

        fig = plt.figure(figsize=(6.4, 6), dpi=110)
        ax = fig.add_subplot(projection="ternary")
        w = measured[[f"weight.{x}" for x in abl.names]].to_numpy()
        # Points on the edges and corners (a grid's single sources) must not be clipped by the triangle.
        sc = ax.scatter(w[:, 0], w[:, 1], w[:, 2], c=measured[metric], cmap="viridis_r", s=70, edgecolors="k",
                        linewidths=0.4, zorder=3, clip_on=False)
        if len(w) <= 21:  # the values themselves, while they still fit
            for wi, v in zip(w, measured[metric]):
                ax.text(wi[0], wi[1], wi[2], f"  {v:.3f}", fontsize=7, ha="left", va="bottom", clip_on=False)
        ax.scatter([w[0, 0]], [w[0, 1]], [w[0, 2]], marker="*", s=320, color="gold", edgecolors="k",
                   label=f"best measured: {measured['mixture'].iloc[0]} ({measured[metric].iloc[0]:.4f})", zorder=4,
                   clip_on=False)
        if fit.predicted_best is not None and fit.model != "none":
            b = fit.predicted_best
            ax.scatter([b[0]], [b[1]], [b[2]], marker="X", s=140, color="red", edgecolors="k", clip_on=False,
                       label=f"predicted best ({fit.model}; {'trusted' if fit.trusted else 'not trusted'})", zorder=4)
        ax.set_tlabel(abl.names[0])
        ax.set_llabel(abl.names[1])
        ax.set_rlabel(abl.names[2])
        ax.grid(alpha=0.3)
        cax = ax.inset_axes([1.1, 0.1, 0.04, 0.8], transform=ax.transAxes)
        fig.colorbar(sc, cax=cax, label=f"{metric} ({unit}, lower is better)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
        ax.set_title(f"{abl.study_name}: {metric} over the mixtures", fontsize=9, pad=22)
    elif abl.design != LOO and n == 2:
        fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
        order = measured.sort_values(f"weight.{abl.names[0]}")
        ax.errorbar(order[f"weight.{abl.names[0]}"], order[metric], yerr=order["sd"].fillna(0), marker="o",
                    capsize=3)
        ax.set_xlabel(f"weight of {abl.names[0]} (the rest: {abl.names[1]})")
        ax.set_ylabel(f"{metric} ({unit})")
        ax.grid(alpha=0.3)
        ax.set_title(f"{abl.study_name}: {metric} against the weights", fontsize=9)
    elif abl.design == LOO and "base" in set(measured["mixture"]):
        # One bar per removed source: how much the objective, and the source's own held-out loss, change against the
        # base mixture (right of zero: worse). Whiskers: the seeds' spread of the two points together; dots: the
        # difference seed by seed (the same seed starts both runs from the same weights).
        base = measured[measured["mixture"] == "base"].iloc[0]
        removed = [n for n in abl.names if f"without {n}" in set(measured["mixture"])]
        fig, axes = plt.subplots(1, 2, figsize=(10, 0.55 * len(removed) + 1.8), dpi=110, squeeze=False)
        y = np.arange(len(removed))[::-1]
        base_runs = runs[runs["mixture"] == "base"].set_index("seed")
        for ax, (col, label) in zip(axes[0], ((metric, f"change of {metric} ({unit})"),
                                              (None, "change of its own held-out loss val/<source> (nats/token)"))):
            for yi, n in zip(y, removed):
                c = col or f"val/loss/{n}"
                row = measured[measured["mixture"] == f"without {n}"].iloc[0]
                delta = row[c] - base[c]
                err = math.hypot(*(0.0 if math.isnan(v) else v for v in (row["sd"], base["sd"]))) if col else 0.0
                ax.barh(yi, delta, xerr=err or None, color="tab:red" if delta > 0 else "tab:green", alpha=0.8,
                        capsize=3)
                mine = runs[runs["mixture"] == f"without {n}"].set_index("seed")[c]
                paired = (mine - base_runs[c]).dropna()
                ax.scatter(paired, [yi] * len(paired), color="k", s=12, zorder=3)
            ax.axvline(0, color="k", lw=0.8)
            ax.set_yticks(y)
            ax.set_yticklabels([f"without {n}" for n in removed], fontsize=8)
            ax.set_xlabel(label, fontsize=8)
            ax.grid(alpha=0.3, axis="x")
        axes[0][0].set_title(f"{abl.study_name}: removing a source (base {metric} {base[metric]:.4f}; right: worse)",
                             fontsize=9)
        axes[0][1].set_title("and the removed source's own held-out loss", fontsize=9)
    else:  # designs over four or more sources: one bar per point, best first
        shown = measured.head(30)
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(shown) + 1.4), dpi=110)
        y = np.arange(len(shown))[::-1]
        ax.barh(y, shown[metric], xerr=shown["sd"].fillna(0), color="tab:blue", capsize=3, alpha=0.85)
        for yi, (_, row) in zip(y, shown.iterrows()):
            seeds = runs[runs["point"] == row["point"]][metric].dropna()
            ax.scatter(seeds, [yi] * len(seeds), color="k", s=10, zorder=3)
        lo = float((shown[metric] - shown["sd"].fillna(0)).min())
        hi = float((shown[metric] + shown["sd"].fillna(0)).max())
        pad = max(hi - lo, 1e-6) * 0.3
        ax.set_xlim(lo - pad, hi + pad)  # the differences, not the distance from zero, are the result
        ax.set_yticks(y)
        ax.set_yticklabels(shown["mixture"], fontsize=8)
        ax.set_xlabel(f"{metric} ({unit}); bars: mean over seeds, whiskers: sd, dots: each seed")
        ax.set_title(f"{abl.study_name}: {metric} per mixture (lower is better)", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    path = out_dir / "objective.png"
    fig.savefig(path)
    plt.close(fig)
    made.append(path)
    return made


def _close_parent(abl: Ablation, study, lab: Path, out_dir: Path, plots: list[Path], best_value: float,
                  fit: Fit) -> None:
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    tracker = _parent_tracker(abl, lab) if run_id else None
    if tracker is None:
        return
    tracker.start({}, {}, run_name="", resume_run_id=run_id)
    c = counts(study)
    metrics = {"best_value": best_value, "runs_complete": c["COMPLETE"], "runs_diverged": c["PRUNED"],
               "trials_failed": c["FAIL"]}
    if not math.isnan(fit.cv_spearman):
        metrics["fit_cv_spearman"] = fit.cv_spearman
    tracker.log_metrics(metrics, len(study.trials))
    for p in [*plots, out_dir / "results.csv", out_dir / "best.yaml", out_dir / "README.md"]:
        tracker.log_artifact(p)
    tracker.set_tags({"sparknet.objective": abl.objective.name, "sparknet.objective_metric": abl.objective.metric,
                      "sparknet.fit": fit.model, "sparknet.fit_trusted": str(fit.trusted).lower()})
    tracker.end("FINISHED")


def conclude(abl: Ablation, study, lab: Path, confirm: bool, poll_s: float = 2.0) -> dict | None:
    """Every planned run finished: the summary (and --confirm) by exactly one worker; the others say who. A worker
    asked to --confirm waits for the summary (seconds) when another writes it: the confirmation trains its best.yaml."""
    finished = len(finished_trials(study))
    summary = None
    waiting = False
    while True:
        with study_job(abl, study, "summary", finished) as state:
            if state == "mine":
                summary = finish(abl, study, lab)
                break
            if state == "done" or not confirm:
                who = study.user_attrs.get("sparknet.job.summary", {}).get("by", "?")
                print(f"study {abl.study_name}: {finished} runs finished; the summary in "
                      f"experiments/{abl.study_name}/ " + ("was written by " if state == "done" else
                                                          "is being written by ")
                      + (who if state == "done" else state), flush=True)
                break
        if not waiting:
            print(f"study {abl.study_name}: waiting for {state} to write the summary (then --confirm)", flush=True)
            waiting = True
        time.sleep(poll_s)  # its claim goes stale if it dies: study_job then hands the summary to this worker
    if not confirm:
        return summary
    stored = study.user_attrs.get("sparknet.best_weights")
    if stored is None:  # a summary written before the weights were kept in the study: its best.yaml says them
        from sparknet.config import read_yaml

        stored = _best_weights(abl, read_yaml(Path("experiments") / abl.study_name / "best.yaml"))
    weights = tuple(float(w) for w in stored)
    with study_job(abl, study, "confirm", json.dumps(weights)) as state:
        if state != "mine":
            print("--confirm: the full-budget run of best.yaml " + ("was done by another worker" if state == "done"
                                                                    else f"is being trained by {state}"), flush=True)
            return summary
        from sparknet.run import execute

        full = abl.full_config(weights, [f"tracking.experiment={abl.study_name}"])
        print(f"confirming best.yaml ({_weights_text(abl.names, weights)}) at the full budget "
              f"({full.mixture.total_tokens:,} tokens)", flush=True)
        tags = {"sparknet.study": abl.study_name, "sparknet.confirm": "true", "sparknet.objective": abl.objective.name}
        if abl.objective.tuned_on:  # its WikiText-2 validation figures were selected on: tables mark them
            tags["sparknet.tuned_on"] = abl.objective.tuned_on
        out = execute(full, parent_run_id=study.user_attrs.get("mlflow_parent_run_id"), extra_tags=tags)
        if summary is not None:
            summary["confirm"] = out.result
        return summary


def _best_weights(abl: Ablation, best: dict) -> tuple[float, ...]:
    """The weights best.yaml holds (of the ablated stage, or of the sources)."""
    mix = best.get("mixture", {})
    if abl.stage is None:
        by_name = {s["name"]: float(s.get("weight") or 0.0) for s in mix.get("sources", [])}
    else:
        by_name = {k: float(v) for k, v in mix["stages"][abl.stage].get("weights", {}).items()}
    return tuple(by_name.get(n, 0.0) for n in abl.names)


# ---------------------------------------------------------------------------------------------


def base_weights(cfg: RunConfig, stage: int | None, where: str = "--stage") -> tuple[float, ...]:
    """The weights the design starts from: the sources' own, or those of stage `stage` (one-line errors for a
    stage the mixture does not have, or a staged mixture without --stage)."""
    stages = cfg.mixture.stage_list()
    names = [s.name for s in cfg.mixture.sources]
    if not cfg.mixture.stages:
        if stage is not None:
            raise SparknetError(f"{where} {stage}: the mixture has no stages (fix: drop --stage; the sources' weights "
                                f"are what is ablated)")
        w = stages[0][1]
    else:
        starts = ", ".join(f"{i}: from {s:g}" for i, (s, _) in enumerate(stages))
        if stage is None:
            raise SparknetError(f"--stage: the mixture has {len(stages)} stages ({starts}) (fix: --stage I ablates "
                                f"stage I's weights; the other stages keep theirs)")
        if not 0 <= stage < len(stages):
            raise SparknetError(f"{where} {stage}: the mixture has stages 0 to {len(stages) - 1} ({starts}) (fix: "
                                f"--stage 0 to {len(stages) - 1})")
        w = stages[stage][1]
    total = sum(w.values())
    return tuple(w[n] / total for n in names)


def default_study_name(cfg: RunConfig, design: str, stage: int | None) -> str:
    label = Path(design).stem if Path(design).suffix in (".yaml", ".yml") else design
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-")
    return f"{cfg.name}-{label}" + (f"-stage{stage}" if stage is not None else "")


def dry_run_text(abl: Ablation, plans: list) -> str:
    names = abl.names
    runs = len(abl.points) * len(abl.seeds)
    lines = [f"ablation {abl.study_name}: design {abl.design_label()} over {', '.join(names)}"
             + (f" (stage {abl.stage})" if abl.stage is not None else "")
             + f": {len(abl.points)} points x {len(abl.seeds)} seed(s) (train.seed {', '.join(map(str, abl.seeds))}) "
             f"= {runs} runs of {abl.proxy_tokens:,} tokens ({runs * abl.proxy_tokens:,} tokens); minimizing "
             f"{abl.objective.metric}"]
    width = max(len(p.name) for p in abl.points)
    head = (f"{'point':>5}  {'mixture':<{width}}  " + "  ".join(f"{'w ' + n:>10}" for n in names) + "  "
            + "  ".join(f"{'tokens ' + n:>14}" for n in names))
    lines.append(head)
    for i, (p, plan) in enumerate(zip(abl.points, plans)):
        toks = plan.tokens_per_source()
        lines.append(f"{i:>5}  {p.name:<{width}}  " + "  ".join(f"{w:>10.4f}" for w in p.weights) + "  "
                     + "  ".join(f"{int(t):>14,}" for t in toks))
    return "\n".join(lines)


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparknet.ablate", description=__doc__.split("\n")[0],
                                 epilog="Ctrl-C or SIGTERM: the running point is queued again and continues its "
                                        "checkpoints on the next run (exit 130).")
    ap.add_argument("mixture", nargs="?", help="mixture YAML, e.g. mixtures/quickstart.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value overrides applied to every run (e.g. model.preset=cpu-small)")
    ap.add_argument("--design", default=None,
                    help="leave-one-out, single-source, grid:STEP (e.g. grid:0.25), random:N (seeded Dirichlet draws) "
                         "or a YAML file: points: [{name: .., weights: {source: w, ..}}, ..]")
    ap.add_argument("--proxy-tokens", default=DEFAULT_PROXY, help=f"training tokens per run (default {DEFAULT_PROXY})")
    ap.add_argument("--objective", default=DEFAULT_OBJECTIVE,
                    help="what to minimize: wikitext-valid (WikiText-2 validation bits per byte; the default), val "
                         "(mean held-out loss over the sources) or val/<source>")
    ap.add_argument("--seeds", type=int, default=1,
                    help="model seeds per point (train.seed, +1, ...), to tell noise from effect (default 1)")
    ap.add_argument("--stage", type=int, default=None, help="staged mixtures: ablate the weights of stage I")
    ap.add_argument("--design-seed", type=int, default=0, help="random:N: the seed of the draws (default 0)")
    ap.add_argument("--study", default=None,
                    help="study name (default: <mixture>-<design>); a study keeps its design, seeds, budget, objective "
                         "and recipe: reusing the name with others is an error")
    ap.add_argument("--storage", default=None,
                    help="SQLAlchemy URL (default sqlite:///<lab>/optuna.db; postgresql://... for several machines)")
    ap.add_argument("--timeout", default=None, help="stop taking runs after this long, e.g. 8h (default: none)")
    ap.add_argument("--heartbeat", type=int, default=60,
                    help="seconds between heartbeats; a run silent for twice this is failed and retried")
    ap.add_argument("--confirm", action="store_true",
                    help="then train best.yaml at the full budget (one worker of the study does it)")
    ap.add_argument("--dry-run", action="store_true", help="print the points and their plans; train nothing")
    ap.add_argument("--progress", action="store_true", help="progress bars for each run")
    args = ap.parse_intermixed_args(argv)
    if not args.mixture:
        raise SparknetError("missing MIXTURE.yaml (fix: python -m sparknet.ablate mixtures/quickstart.yaml "
                            "--design leave-one-out)")
    if args.design is None:
        raise SparknetError("--design: required (fix: --design leave-one-out, single-source, grid:0.25, random:16 or "
                            "a YAML file of weight vectors)")
    if args.seeds < 1:
        raise SparknetError(f"--seeds: must be >= 1, got {args.seeds}")
    if args.design_seed < 0:
        raise SparknetError(f"--design-seed: must be >= 0, got {args.design_seed}")
    proxy, timeout = parse_budget(args, "20M")
    base = load_config(args.mixture, args.overrides)  # bad mixture/overrides fail here, before anything starts
    names = tuple(s.name for s in base.mixture.sources)
    weights = base_weights(base, args.stage)
    points = design_points(args.design, names, weights, seed=args.design_seed)
    try:
        objective = Objective.parse(args.objective, names)
    except SparknetError as exc:
        raise SparknetError(f"--objective: {exc}") from None
    lab = base.lab_path
    study_name = parse_study_name(args.study or default_study_name(base, args.design, args.stage))
    url = args.storage or default_storage(lab)
    seeds = [base.train.seed + k for k in range(args.seeds)]
    abl = Ablation(args.mixture, args.design, points, names, args.stage, seeds, proxy, study_name, url,
                   list(args.overrides), objective, timeout, args.heartbeat, args.progress, args.design_seed,
                   storage_given=args.storage is not None)
    plans = check_points(abl)  # every point's config and plan, before anything starts
    if args.dry_run:
        print(dry_run_text(abl, plans))
        return 0
    # Before any run trains: WikiText-2 validation must be readable if it is the objective.
    try:
        objective.check(abl.point_config(0, seeds[0]))
    except SparknetError as exc:
        default = " (the default)" if args.objective == DEFAULT_OBJECTIVE else ""
        raise SparknetError(f"--objective {objective.name}{default}: {exc} (or: --objective val, the mean held-out "
                            f"loss, needs no WikiText-2)") from None
    quiet_optuna()
    with interrupt_handlers():
        storage = open_storage(url, args.heartbeat)
        existing = find_study(study_name, storage)
        if existing is not None:  # a rerun: a different question is an error before anything is prepared
            diff = identity_difference(existing.user_attrs, abl.identity())
            if diff:
                raise SparknetError(f"--study {study_name}: {diff} (fix: rerun with the study's settings, or start "
                                    f"another study with --study NAME)")
            k = existing.user_attrs.get("sparknet.seeds", len(seeds))
            if k > len(seeds):  # another worker grew the study: its plan is the study's
                abl.seeds = [base.train.seed + i for i in range(k)]
        done = {_key_of(t) for t in finished_trials(existing)} if existing is not None else set()
        if not all(key in done for key in abl.planned()):
            # Before the study holds any queued run: a point whose share a store cannot supply stops here.
            prepared = prepare_stores(abl, plans)
            try:  # every point shares the stores: a held-out slice too short for the objective fails every point
                objective.check_prepared(prepared, abl.point_config(0, abl.seeds[0]))
            except SparknetError as exc:
                raise SparknetError(f"--objective {objective.name}: {exc}") from None
        study = create_or_load(abl, storage, lab)
        planned = len(abl.planned())
        c = counts(study)
        print(f"study {study_name} at {redact(url)}: {c['COMPLETE'] + c['PRUNED']} of {planned} runs finished "
              f"({len(points)} points x {len(abl.seeds)} seeds), {c['RUNNING']} running; minimizing "
              f"{objective.metric} at a proxy budget of {proxy:,} tokens", flush=True)
        if not abl.work(study, storage):
            return 0  # timed out: the rerun continues
        conclude(abl, study, lab, args.confirm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
