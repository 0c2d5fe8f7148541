"""python -m sparknet.sweep: Optuna over the secondary hyperparameters, resumable and multi-machine.

    python -m sparknet.sweep [--mixture M.yaml] [--space experiments/S.yaml] [--objective val] [--trials 20]
                             [--timeout 8h] [--proxy-tokens 50M] [--study NAME] [--storage URL] [--out DIR]
                             [--confirm] [key=value ...]

A kind of study (`sparknet.study.StudyKind`): the study's lifecycle (create or load, identity, parent MLflow run,
workers, resume, the summary once per study) is `sparknet.study`'s; this module says what a sweep's trial is, what
is concluded and what is written. Each trial is a `sparknet.run` training at the proxy budget (the same cached token
stores, schedules scaled by their fractions), reporting the objective's intermediate value at `eval_points`
evaluations so the median pruner can stop bad trials; what is minimized comes from `sparknet.objective` (val,
val/<source>, wikitext-valid). The first trial is the mixture's own config (the baseline). Trailing key=value
overrides apply to every trial (e.g. model.preset=cpu-small).

The space (`sparknet.sweep_space`) is checked whole before anything starts. A study remembers what it is (proxy
budget, objective, space, recipe, overrides): rerunning `--study NAME` with other settings is an error naming the
difference, not a study that silently mixes two questions.

Exactly N finished trials, with any number of workers: a worker takes a trial only while finished + running < N,
deciding under the per-study lock, so two workers never overshoot. When the study is complete, one worker writes
the summary to `--out` (default experiments/<study>/: best.yaml, best_overrides.yaml, trials.csv, README.md, plots)
and runs `--confirm`; the others say who does. The summary first states whether the baseline and the best trial
learned past a bigram table of their own training tokens (`sparknet.adequacy`; the baseline is the learning curve
that says how far short a budget is), and `--proxy-tokens auto` chooses the budget by probing the baseline once.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sparknet.adequacy import adequacy_section, plot_curve, run_pasts, study_verdict
from sparknet.config import RunConfig, load_config, to_dict
from sparknet.errors import SparknetError, cli_main
from sparknet.objective import Objective
from sparknet.study import Confirmation, StudyKind, Summary, parse_budget, study_parser, study_settings
from sparknet.study_files import markdown_table, write_csv, write_text
from sparknet.study_storage import (
    complete_trials,
    counts,
    enqueue,
    median_pruner,
    optuna_plots,
    redact,
    tpe_sampler,
)
from sparknet.study_worker import DONE, TrialPruned
from sparknet.sweep_space import (
    Space,
    baseline_params,
    config_for,
    load_space,
    overrides_args,
    parse_overrides,
    pretty,
    suggest,
    trial_overrides,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MIXTURE = "mixtures/codelion_502030.yaml"
DEFAULT_SPACE = "experiments/default_space.yaml"


@dataclass(kw_only=True)
class Sweep(StudyKind):
    kind = "sweep"
    lab_folder = "sweeps"
    requeue_keep = ("baseline", "val_loss_by_eval")

    space: Space
    n_trials: int

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
        return config_for(self.mixture, self.base_overrides, params,
                          [*self.trial_extra(), f"name={self.study_name[:48]}-t{origin}"])

    # -- the lifecycle's hooks (sparknet.study) ----------------------------------------------------

    def base_config(self) -> RunConfig:
        return config_for(self.mixture, self.base_overrides, {})

    def identity(self) -> dict[str, Any]:
        return {"sparknet.space": self.space.identity()}

    def identity_difference(self, stored: dict[str, Any], now: dict[str, Any]) -> str | None:
        def short(v: Any) -> str:
            return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)

        old_space = stored.get("sparknet.space")
        if isinstance(old_space, list):  # studies from before the space was stored whole kept only its keys
            old_space = {"params": {k: None for k in old_space}}
        if old_space is None:
            return None
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
        return None

    def sampler_and_pruner(self):
        pruner = self.space.pruner
        return make_sampler(self.space, 0), median_pruner(pruner.get("n_startup_trials", 3),
                                                          pruner.get("n_warmup_steps", 1))

    def queue(self, study) -> None:
        if not study.trials:  # trial 0: the mixture's own config, the baseline the summary compares with
            enqueue(study, baseline_params(self.base_config(), self.space), {"baseline": True})

    def parent_params(self) -> dict[str, str]:
        return {"trials": str(self.n_trials), "space": str(self.space.path),
                "space.params": ",".join(d.key for d in self.space.dims),
                "sampler.seed": str(self.space.sampler.get("seed", 42))}

    def planned(self) -> int:
        return self.n_trials

    def summarize(self, study) -> Summary:
        return write_sweep_summary(self, study)

    def confirmation(self, study) -> Confirmation | None:
        if not complete_trials(study):
            return None
        best = study.best_trial
        # best.yaml's config, recorded in the study's MLflow experiment next to its parent run.
        full = config_for(self.mixture, self.base_overrides, best.params, [f"tracking.experiment={self.study_name}"])
        return Confirmation(best.number, full, f"trial {best.number}'s config", f"trial {best.number}'s full-budget run")

    # -- the worker's hooks (sparknet.study_worker) ------------------------------------------------

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
        print(f"trial {trial.number}: {pretty(params)}" + (f" (retry of trial {origin})" if origin != trial.number
                                                            else ""), flush=True)
        return self.trial_config(params, origin)

    def report(self, trial, index: int, tokens: int, val: dict[str, float]) -> None:
        value = self.objective.intermediate(val)
        trial.report(value, step=index)
        if trial.should_prune():
            raise TrialPruned(f"pruned at {tokens:,} tokens: {self.objective.intermediate_metric} {value:.4f} is "
                              f"worse than the median of earlier trials at this point")

    def curve_run(self, frozen, cfg: RunConfig) -> bool:
        """The baseline (trial 0, the mixture's own config) is the sweep's learning curve (every trial evaluates along
        the way; the references of each evaluation's budget are counted for this one only)."""
        return bool(frozen.user_attrs.get("baseline"))

    def unbuildable_fix(self) -> str:
        return f"narrow {self.space.path} so that every combination is a valid config"


def make_sampler(space: Space, offset: int):
    return tpe_sampler(space.sampler.get("seed", 42) + offset, space.sampler.get("n_startup_trials", 5))


# ---------------------------------------------------------------------------------------------
# The summary, once per study: table, best config, plots


def summary_frame(study, objective: Objective):
    """One row per trial: its state, objective, parameters, and how far it is past its bigram reference on each slice
    the objective reads (`past bigram <slice>`: reference minus loss, negative: not yet; `sparknet.adequacy`)."""
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        retry = t.system_attrs.get("failed_trial")
        note = t.user_attrs.get("reason", "") or (f"retry of trial {retry}" if retry is not None else "")
        pasts = run_pasts(t.user_attrs, objective, 0.0) if t.state.name == "COMPLETE" else None
        rows.append({"trial": t.number, "state": t.state.name, objective.metric: t.value,
                     **{k: v for k, v in t.params.items()},
                     "baseline": bool(t.user_attrs.get("baseline")),
                     **{f"past bigram {p.slice.removeprefix('val/')}": p.past for p in pasts or []},
                     "seconds": t.user_attrs.get("seconds"),
                     "note": note[:70]})
    df = pd.DataFrame(rows)
    return df.sort_values([objective.metric, "trial"], na_position="last").reset_index(drop=True) if len(df) else df


def dry_run_text(sweep: Sweep) -> str:
    """What the sweep would train: its trials, their budget and time at this machine's estimated speed."""
    from sparknet.device import config_shape, describe_device, device_report

    first = sweep.trial_config({}, 0)
    eta = [line for line in device_report(first, config_shape(first), 1, describe_device(first, 1))
           if line.startswith("eta")]
    auto = sweep.auto_budget is not None and "chosen" not in sweep.auto_budget
    return "\n".join([
        f"sweep {sweep.study_name}: {sweep.n_trials} trials of {sweep.proxy_tokens:,} tokens"
        + (" (the cap: --proxy-tokens auto chooses the budget first)" if auto else "")
        + f", searching {', '.join(d.key for d in sweep.space.dims)} ({sweep.space.path}); minimizing "
        f"{sweep.objective.metric}, pruned at {sweep.space.eval_points} evaluations a trial",
        f"  a trial (the baseline): {eta[0] if eta else 'no time estimate for this device'}"])


def command_line(sweep: Sweep) -> str:
    """The command that reruns (continues) this study."""
    parts = ["python", "-m", "sparknet.sweep", "--mixture", str(sweep.mixture), "--space", str(sweep.space.path),
             "--objective", sweep.objective.name, "--trials", str(sweep.n_trials), "--proxy-tokens",
             str(sweep.proxy_tokens), "--study", sweep.study_name, "--storage", redact(sweep.storage_url),
             *(["--out", str(sweep.out_dir)] if sweep.out_dir is not None else []), *sweep.base_overrides]
    return " ".join(shlex.quote(p) for p in parts)


def reference_frame(study):
    """trials.csv's reference columns, one row per completed trial: each source's count-table references
    (`ref_unigram/<source>`, `ref_bigram/<source>`, nats/token) and WikiText-2's when scored
    (`wikitext-valid/ref_unigram_bpb`, `wikitext-valid/ref_bigram_bpb`)."""
    import pandas as pd

    rows = []
    for t in complete_trials(study):
        a = t.user_attrs
        row = {"trial": t.number}
        row |= {f"ref_unigram/{k}": v for k, v in (a.get("val_ref_unigram") or {}).items()}
        row |= {f"ref_bigram/{k}": v for k, v in (a.get("val_ref_bigram") or {}).items()}
        for key in ("unigram", "bigram"):
            if a.get(f"wikitext_valid_ref_{key}_bpb") is not None:
                row[f"wikitext-valid/ref_{key}_bpb"] = a[f"wikitext_valid_ref_{key}_bpb"]
        rows.append(row)
    return pd.DataFrame(rows)


def write_sweep_summary(sweep: Sweep, study) -> Summary:
    """Print the table, write the sweep's folder: best.yaml (the full config at the mixture's full budget),
    best_overrides.yaml, trials.csv, README.md and Optuna's plots. The adequacy verdict (`sparknet.adequacy`) comes
    first, in the terminal and at the top of the README; when the proxies have not learned past a bigram table, the
    best trial is only the best measured one, and best.yaml says so."""
    objective = sweep.objective
    metric = objective.metric
    df = summary_frame(study, objective)
    done = complete_trials(study)
    if not done:
        raise SparknetError(f"study {sweep.study_name}: no trial completed (fix: widen the space or raise "
                            f"--proxy-tokens; see the trials' notes with --trials {sweep.n_trials})")
    best = study.best_trial
    baseline = next((t for t in done if t.user_attrs.get("baseline")), None)
    out_dir = sweep.out
    out_dir.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    # Judged: the baseline (the recipe at this budget: its learning curve) and the best trial (the answer). A trial
    # whose hyperparameters do not learn at this budget is a result of the sweep, not a sign that the proxy is small.
    first = baseline or min(done, key=lambda t: t.number)
    verdict = study_verdict(sweep, done, lambda t: t.number == first.number, lambda t: f"trial {t.number}"
                            + (" (baseline)" if t.number == first.number else ""), noun="trials",
                            judged=lambda t: t.number in (first.number, best.number),
                            judged_text="a sweep judges its baseline (the recipe at this budget) and its best trial "
                                        "(the answer); a trial whose hyperparameters do not learn at this budget is a "
                                        "result of the sweep, listed in `past bigram` of the table")
    print(("warning: " if verdict.blocks else "adequacy: ") + verdict.headline(), flush=True)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(df.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    caveat = " (the best measured; see the adequacy verdict above)" if verdict.blocks else ""
    if baseline is not None:
        gain = baseline.value - best.value
        print(f"best: trial {best.number} {metric} {best.value:.4f}; baseline (trial {baseline.number}) "
              f"{baseline.value:.4f}: {gain:+.4f} {objective.unit} ({gain / baseline.value:+.2%}){caveat}")
    full = config_for(sweep.mixture, sweep.base_overrides, best.params)
    # Real config keys only (train.min_lr, never the pseudo-key min_lr_ratio), the user's overrides included:
    # applied to the mixture they give exactly best.yaml.
    overrides = parse_overrides(sweep.base_overrides) | trial_overrides(sweep.mixture, sweep.base_overrides,
                                                                        best.params)
    tuned = (f"# Its {objective.tuned_on} figures are tuned (the study selected on them): report the test split.\n"
             if objective.tuned_on else "")
    if verdict.blocks:  # after the tuned line (tools read the comment lines by position)
        tuned += f"# Caveat: the best measured trial, not an answer: {verdict.headline()}\n"
    refs = reference_frame(study)
    csv = df.merge(refs, on="trial", how="left") if len(refs) else df
    files = [write_text(out_dir / "best_overrides.yaml",
                        f"# Best trial {best.number} of study {sweep.study_name}: {metric} {best.value:.4f} at "
                        f"{sweep.proxy_tokens:,} tokens.\n# The keys that turn {sweep.mixture} into best.yaml:\n"
                        f"#   python -m sparknet.run {shlex.quote(str(sweep.mixture))} "
                        f"{' '.join(shlex.quote(a) for a in overrides_args(overrides))}\n" + tuned
                        + yaml.safe_dump(overrides, sort_keys=True)),
             write_text(out_dir / "best.yaml",
                        f"# The best config of study {sweep.study_name} ({metric}) at the mixture's full budget.\n"
                        f"# Train it: python -m sparknet.run {out_dir / 'best.yaml'}\n" + tuned
                        + yaml.safe_dump(to_dict(full), sort_keys=False)),
             write_csv(out_dir / "trials.csv", csv)]
    wik = study.user_attrs.get("sparknet.objective_data") or {}
    curve_png = plot_curve(verdict, out_dir / "learning_curve.png", sweep.study_name,
                           sweep.auto_budget)
    files.append(write_text(out_dir / "README.md",
        f"# Sweep {sweep.study_name}\n\n" + (f"> **Not an answer about hyperparameters.** {verdict.headline()}\n\n"
                                              if verdict.blocks else "")
        + f"Question: best {', '.join(d.key for d in sweep.space.dims)} for "
        f"`{sweep.mixture}` at a {sweep.proxy_tokens:,}-token proxy budget, minimizing {metric} "
        f"({objective.unit}"
        + (f"; pruned on {objective.intermediate_metric}" if objective.intermediate_metric != metric else "")
        + (f"; WikiText-2 validation text sha256 {wik.get('sha256', '')[:12]}, tuned on" if objective.tuned_on else "")
        + ").\n\n"
        f"Command: `{command_line(sweep)}`\n\n"
        f"MLflow experiment: `{sweep.study_name}` (parent run {study.user_attrs.get('mlflow_parent_run_id')}).\n\n"
        + markdown_table(df) + "\n\n"
        + (f"Best{' measured' if verdict.blocks else ''}: trial {best.number}, {metric} {best.value:.4f}"
           + (f"; baseline {baseline.value:.4f} ({baseline.value - best.value:+.4f} {objective.unit})." if baseline
              else ".")
           + " Full-budget config: `best.yaml`.\n\n")
        + adequacy_section(verdict, curve_png, sweep.auto_budget)))
    plots = optuna_plots(study, out_dir, metric) + ([curve_png] if curve_png else [])
    c = counts(study)
    metrics = {"best_value": best.value, "trials_complete": c["COMPLETE"], "trials_pruned": c["PRUNED"],
               "trials_failed": c["FAIL"]} | ({"baseline_value": baseline.value} if baseline else {})
    result = {"best_trial": best.number, "best_value": best.value, "best_params": best.params,
              "baseline_value": baseline.value if baseline else None, "dir": str(out_dir),
              "adequacy": verdict.to_dict()}
    tags = {"sparknet.best_trial": str(best.number), "sparknet.adequate": str(verdict.adequate).lower()}
    return Summary(result, metrics, tags, [*plots, *files],
                   "best.yaml, best_overrides.yaml, trials.csv, README.md, plots")


# ---------------------------------------------------------------------------------------------


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = study_parser("sweep", __doc__, running="trial", noun="trial", proxy_default="50M",
                      study_default="<mixture>-<space>", keeps="budget, objective, space and recipe",
                      confirm_what="the best config")
    ap.add_argument("overrides", nargs="*", help="key=value overrides applied to every trial")
    ap.add_argument("--mixture", default=DEFAULT_MIXTURE, help=f"mixture YAML (default {DEFAULT_MIXTURE})")
    ap.add_argument("--space", default=DEFAULT_SPACE, help=f"search space YAML (default {DEFAULT_SPACE})")
    ap.add_argument("--objective", default=None,
                    help="what to minimize: val (mean held-out loss over the sources), val/<source>, or "
                         "wikitext-valid (WikiText-2 validation bits per byte of the final model; pruned on val) "
                         "(default: the space's objective, else val)")
    ap.add_argument("--trials", type=int, default=20, help="finished trials the study should end with (default 20)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the study's plan (and with --proxy-tokens auto, what the probe would do and its time); "
                         "train nothing")
    args = ap.parse_intermixed_args(argv)
    if args.trials < 1:
        raise SparknetError(f"--trials: must be >= 1, got {args.trials} (fix: --trials 20)")
    budget = parse_budget(args, "50M")
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
    sweep = Sweep(mixture=mixture, space=space, base_overrides=list(args.overrides), n_trials=args.trials,
                  objective=objective, **study_settings(args, budget, base, f"{base.name}-{Path(args.space).stem}",
                                                        objective=objective))
    if args.dry_run:
        print(dry_run_text(sweep))
        return 0
    # Before any trial trains: WikiText-2 validation must be readable if it is the objective, and the held-out slices
    # it reads must hold a window once prepared (every trial trains on the same stores: prepared here, once).
    first = sweep.trial_config({}, 0)
    objective.check(first)
    from sparknet.locks import prepare_lock
    from sparknet.prepare import prepare

    with prepare_lock(base.lab_path):
        prepared = prepare(first, progress=args.progress, write_report=False)
    try:  # the pruner reads every evaluation's objective.intermediate: for wikitext-valid, every source's loss
        objective.check_prepared(prepared, first, pruned=True)
    except SparknetError as exc:
        raise SparknetError(f"{'--objective' if args.objective else f'{space.path}: objective'}: {exc}") from None
    return sweep.run(confirm=args.confirm)


if __name__ == "__main__":
    sys.exit(main())
