"""The ablation study kind (`Ablation`, a `sparknet.study.StudyKind`): its points x seeds as fixed Optuna trials, each
point's proxy config and plan, the token stores prepared once for every point, the study's identity, and the helpers
the commands share (the design's base weights, the default study name, the dry run's table). The command line is
`sparknet.ablate`; `sparknet.ablate_transfer` and `sparknet.ablate_reuse` build on the kind.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from sparknet.ablate_report import key_of, weights_text, write_ablation_summary
from sparknet.config import RunConfig, load_config
from sparknet.designs import Point
from sparknet.errors import SparknetError
from sparknet.study import Confirmation, StudyKind, Summary
from sparknet.study_storage import enqueue, finished_trials, fixed_sampler_and_no_pruner, tell
from sparknet.study_worker import DONE


@dataclass(kw_only=True)
class Ablation(StudyKind):
    kind = "ablate"
    lab_folder = "ablations"
    noun = "runs"
    # A run queued again after an interrupt keeps which point and seed it is, and its curve.
    requeue_keep = ("point", "seed", "point_name", "val_loss_by_eval")
    confirm_reads_summary = True  # --confirm trains the summary's best.yaml

    design: str  # as given: leave-one-out, single-source, grid:STEP, random:N or a file
    points: list[Point]
    names: tuple[str, ...]  # the mixture's sources, in its order (the order of every weight vector)
    stage: int | None = None  # the stage whose weights are ablated (None: the sources' own weights)
    seeds: list[int]  # the label of each repeat: train.seed of the mixture, +1, ... (its k-th repeat: k = index)
    # What differs between a point's repeats: the model's initialization (train.seed + k), the data order
    # (mixture.seed + k: the interleaving and each source's sequence order; never the validation slices, the token
    # quotas or the tokenizer), or both.
    seed_vary: str = "both"
    data_seed: int = 1234  # the mixture's own mixture.seed, the first repeat's data order
    design_seed: int = 0
    storage_given: bool = True  # whether --storage was given (the command written to the README says it only then)

    # -- the plan ------------------------------------------------------------------------------------

    def planned_runs(self) -> list[tuple[int, int]]:
        """Every (point, seed), seed-major: a study cut short by --timeout has each point once before any twice."""
        return [(p, s) for s in self.seeds for p in range(len(self.points))]

    def weight_overrides(self, weights: tuple[float, ...]) -> list[str]:
        if self.stage is None:
            return [f"mixture.sources.{n}.weight={json.dumps(float(w))}" for n, w in zip(self.names, weights)]
        return [f"mixture.stages.{self.stage}.weights.{n}={json.dumps(float(w))}" for n, w in zip(self.names, weights)]

    def point_config(self, point: int, seed: int) -> RunConfig:
        """The proxy run of one design point: the mixture, the user's overrides, then the point's weights, the proxy
        budget and the seed. Only the final evaluation (an ablation prunes nothing), except for the base point (point 0,
        first seed): evaluated along the way (`sparknet.adequacy.CURVE_POINTS` times in all), its learning curve says
        how far the proxy budget is from learning past a bigram table (`sparknet.adequacy`)."""
        from sparknet.adequacy import CURVE_POINTS

        k = self.seeds.index(seed) if seed in self.seeds else seed
        init_seed = seed if self.seed_vary in ("init", "both") else self.seeds[0]
        every = max(1, self.proxy_tokens // CURVE_POINTS) if (point, k) == (0, 0) else self.proxy_tokens
        extra = [f"mixture.total_tokens={self.proxy_tokens}", f"eval.every_tokens={every}",
                 "eval.wikitext=[]", f"tracking.experiment={self.study_name}", f"train.seed={init_seed}",
                 f"name={self.study_name[:48]}-p{point}-s{k}"]
        if self.seed_vary in ("data", "both"):
            extra.append(f"mixture.seed={self.data_seed + k}")
        return load_config(self.mixture, [*self.base_overrides, *extra,
                                          *self.weight_overrides(self.points[point].weights)])

    def full_config(self, weights: tuple[float, ...], extra: list[str] = ()) -> RunConfig:
        """A mixture at the full budget (the mixture's own, or the user's mixture.total_tokens) with `weights`."""
        return load_config(self.mixture, [*self.base_overrides, *extra, *self.weight_overrides(weights)])

    def params(self, point: int, seed: int) -> dict[str, Any]:
        return {"point": point, "seed": seed,
                **{f"weight.{n}": float(w) for n, w in zip(self.names, self.points[point].weights)}}

    def enqueue_run(self, study, key: tuple[int, int], curve: dict | None = None) -> None:
        """Queue the run of (point, seed); `curve`: the evaluations along the way an earlier, failed trial of it
        recorded (the run continues that trial's checkpoints, so they are not measured again)."""
        enqueue(study, self.params(*key), {"point": key[0], "seed": key[1], "point_name": self.points[key[0]].name,
                                           **({"val_loss_by_eval": curve} if curve else {})})

    @cached_property
    def plans(self) -> list:
        """Every point's plan at the proxy budget, each point's config checked (`check_points`); computed once."""
        return check_points(self)

    def design_label(self) -> str:
        if Path(self.design).suffix in (".yaml", ".yml"):
            return f"file {Path(self.design).name}"
        return self.design + (f" (seed {self.design_seed})" if self.design.startswith(("random:", "prior:")) else "")

    # -- the lifecycle's hooks (sparknet.study) ----------------------------------------------------

    def base_config(self) -> RunConfig:
        """The mixture with the first point's weights: the weights are the design's to say (compared as its points),
        so a grid over the same sources is the same study whatever weights the mixture file starts from."""
        return self.full_config(self.points[0].weights)

    def identity(self) -> dict[str, Any]:
        return {"sparknet.design": {"design": self.design_label(), "stage": self.stage, "sources": list(self.names),
                                    "points": [[p.name, list(p.weights)] for p in self.points]},
                "sparknet.seeds": len(self.seeds), "sparknet.seed_vary": self.seed_vary}

    def identity_difference(self, stored: dict[str, Any], now: dict[str, Any]) -> str | None:
        """More seeds than the study has is not a difference: it grows."""
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
        # Studies from before --seed-vary varied the model seed only.
        vary = stored.get("sparknet.seed_vary", "init" if "sparknet.seeds" in stored else now["sparknet.seed_vary"])
        if vary != now["sparknet.seed_vary"] and max(stored.get("sparknet.seeds", 1), now["sparknet.seeds"]) > 1:
            return (f"its seeds vary {vary}, this command's {now['sparknet.seed_vary']} (fix: --seed-vary {vary}, or a "
                    f"new --study)")
        k_old = stored.get("sparknet.seeds")
        if k_old is not None and now["sparknet.seeds"] < k_old:
            return (f"it has {k_old} seeds per point, this command asks for {now['sparknet.seeds']} (--seeds may grow, "
                    f"not shrink: --seeds {k_old})")
        return None

    def sampler_and_pruner(self):
        return fixed_sampler_and_no_pruner()

    def before_create(self, existing) -> None:
        """Before the study holds any queued run: the stores prepared for every point (a point whose share a store
        cannot supply stops here), unless every planned run has finished already."""
        done = {key_of(t) for t in finished_trials(existing)} if existing is not None else set()
        if all(key in done for key in self.planned_runs()):
            return
        prepared = prepare_stores(self, self.plans)
        try:  # every point shares the stores: a held-out slice too short for the objective fails every point
            self.objective.check_prepared(prepared, self.point_config(0, self.seeds[0]))
        except SparknetError as exc:
            raise SparknetError(f"--objective {self.objective.name}: {exc}") from None

    def check_trainable(self) -> None:
        """Every point trainable at the proxy budget: the stores prepared for the largest share of each source, each
        point's plan checked against them (`prepare_stores`: the error names the point and the source)."""
        prepare_stores(self, self.plans)

    def queue(self, study) -> None:
        """Every planned run, on a new study or one that --seeds grew."""
        grown = study.user_attrs.get("sparknet.seeds", len(self.seeds)) < len(self.seeds)
        if study.trials and not grown:
            return
        queued = {key_of(t) for t in study.get_trials(deepcopy=False)}
        for key in self.planned_runs():
            if key not in queued:
                self.enqueue_run(study, key)

    def parent_params(self) -> dict[str, str]:
        return {"design": self.design_label(), "points": str(len(self.points)), "seeds": str(len(self.seeds)),
                "sources": ",".join(self.names), "stage": "" if self.stage is None else str(self.stage)}

    def parent_tags(self) -> dict[str, str]:
        return {"sparknet.tuned_on": self.objective.tuned_on} if self.objective.tuned_on else {}

    def planned(self) -> int:
        return len(self.planned_runs())

    def plan_detail(self) -> str:
        return f" ({len(self.points)} points x {len(self.seeds)} seeds)"

    def summarize(self, study) -> Summary:
        return write_ablation_summary(self, study)

    def confirmation(self, study) -> Confirmation:
        stored = study.user_attrs.get("sparknet.best_weights")
        if stored is None:  # a summary written before the weights were kept in the study: its best.yaml says them
            from sparknet.config import read_yaml

            stored = self.best_weights(read_yaml(self.out / "best.yaml"))
        weights = tuple(float(w) for w in stored)
        return Confirmation(json.dumps(weights), self.full_config(weights, [f"tracking.experiment={self.study_name}"]),
                            f"best.yaml ({weights_text(self.names, weights)})", "the full-budget run of best.yaml")

    def best_weights(self, best: dict) -> tuple[float, ...]:
        """The weights a best.yaml holds (of the ablated stage, or of the sources)."""
        mix = best.get("mixture", {})
        if self.stage is None:
            by_name = {s["name"]: float(s.get("weight") or 0.0) for s in mix.get("sources", [])}
        else:
            by_name = {k: float(v) for k, v in mix["stages"][self.stage].get("weights", {}).items()}
        return tuple(by_name.get(n, 0.0) for n in self.names)

    # -- the worker's hooks (sparknet.study_worker) ------------------------------------------------

    def take(self, study):
        """The next queued run. Before taking it, every planned (point, seed) that no trial finished, runs or waits
        for is queued (again): a run whose retries Optuna gave up on, or one that --seeds added. A queued trial whose
        run finished meanwhile (a retry racing its original) is failed as a duplicate, never run twice."""
        trials = study.get_trials(deepcopy=False)
        done, active = set(), set()
        for t in trials:
            key = key_of(t)
            if t.state.name in ("COMPLETE", "PRUNED"):
                done.add(key)
            elif t.state.name in ("RUNNING", "WAITING"):
                active.add(key)
        planned = self.planned_runs()
        if all(k in done for k in planned):
            return DONE
        waiting = sum(t.state.name == "WAITING" for t in trials)
        # A run folder another process holds: its trial was failed as stale while its worker trains on (and will
        # record the result). Neither queued again nor taken meanwhile.
        busy = {key for key in planned if key not in done and key not in active and self.run_busy(key)}
        # A run that failed after some evaluations (e.g. in its scoring, after its training) resumes from its last
        # checkpoint: the learning curve it had measured so far goes with it, the latest trial's winning.
        curves = {key_of(t): t.user_attrs["val_loss_by_eval"] for t in trials
                  if t.state.name == "FAIL" and t.user_attrs.get("val_loss_by_eval")}
        for key in planned:
            if key not in done and key not in active and key not in busy:
                self.enqueue_run(study, key, curves.get(key))
                waiting += 1
        running = {key_of(t) for t in trials if t.state.name == "RUNNING"}
        while waiting:
            trial = study.ask()  # the oldest queued trial (RUNNING from here on)
            waiting -= 1
            key = key_of(trial)
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
        from sparknet.locks import run_busy
        from sparknet.run import run_dir_for

        dirs = self.__dict__.setdefault("_run_dirs", {})  # a config per key is read once, not at every take
        if key not in dirs:
            dirs[key] = run_dir_for(self.point_config(*key))
        return run_busy(dirs[key])

    def setup_trial(self, study, trial, frozen, origin: int) -> RunConfig:
        point, seed = key_of(frozen)
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
        print(f"trial {trial.number}: point {point} ({p.name}: {weights_text(self.names, p.weights)}), seed {seed}"
              + (f" (retry of trial {origin})" if origin != trial.number else ""), flush=True)
        return self.point_config(point, seed)

    def trial_tags(self, trial) -> dict[str, str]:
        point, seed = key_of(trial)
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
            raise SparknetError(f"--design {abl.design}: point {i} ({p.name}: {weights_text(abl.names, p.weights)}): "
                                f"{exc}") from None
    return plans


def prepare_stores(abl: Ablation, plans: list):
    """Prepare each source's store once for the largest share any point gives it, then check every point's plan
    against the stores (within each source's max_repeats), before the first run trains: a study never stops
    half-way on a store, and no store grows while the workers train on it."""
    from sparknet.locks import prepare_lock
    from sparknet.prepare import Prepared, _report, check_budget, prepare

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
        return (f"--design {abl.design}: point {i} ({p.name}: {weights_text(abl.names, p.weights)}) at "
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
# The design's base weights, the study's default name, the dry run


def base_weights(cfg: RunConfig, stage: int | None) -> tuple[float, ...]:
    """The weights the design starts from: the sources' own, or those of stage `stage` (one-line errors for a
    stage the mixture does not have, or a staged mixture without --stage)."""
    stages = cfg.mixture.stage_list()
    names = [s.name for s in cfg.mixture.sources]
    if not cfg.mixture.stages:
        if stage is not None:
            raise SparknetError(f"--stage {stage}: the mixture has no stages (fix: drop --stage; the sources' weights "
                                f"are what is ablated)")
        w = stages[0][1]
    else:
        starts = ", ".join(f"{i}: from {s:g}" for i, (s, _) in enumerate(stages))
        if stage is None:
            raise SparknetError(f"--stage: the mixture has {len(stages)} stages ({starts}) (fix: --stage I ablates "
                                f"stage I's weights; the other stages keep theirs)")
        if not 0 <= stage < len(stages):
            raise SparknetError(f"--stage {stage}: the mixture has stages 0 to {len(stages) - 1} ({starts}) (fix: "
                                f"--stage 0 to {len(stages) - 1})")
        w = stages[stage][1]
    total = sum(w.values())
    return tuple(w[n] / total for n in names)


def default_study_name(cfg: RunConfig, design: str, stage: int | None) -> str:
    label = Path(design).stem if Path(design).suffix in (".yaml", ".yml") else design
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-")
    return f"{cfg.name}-{label}" + (f"-stage{stage}" if stage is not None else "")


def seeds_text(abl: Ablation) -> str:
    """What the repeats of a point vary, with their seeds."""
    k = len(abl.seeds)
    init = f"train.seed {', '.join(map(str, abl.seeds))}"
    data = f"mixture.seed {', '.join(str(abl.data_seed + i) for i in range(k))}"
    return {"init": init, "data": data, "both": f"{init}; {data}"}[abl.seed_vary]


def dry_run_text(abl: Ablation, plans: list) -> str:
    names = abl.names
    runs = len(abl.points) * len(abl.seeds)
    lines = [f"ablation {abl.study_name}: design {abl.design_label()} over {', '.join(names)}"
             + (f" (stage {abl.stage})" if abl.stage is not None else "")
             + f": {len(abl.points)} points x {len(abl.seeds)} seed(s) ({seeds_text(abl)}) "
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
