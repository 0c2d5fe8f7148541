"""What an ablation (`sparknet.ablate`) writes once per study into its folder (`--out`, default
experiments/<study>/): the table sorted by the objective with the mean and spread over seeds, what was found in plain
sentences, the fitted model's verdict (`sparknet.mixfit`), results.csv (one row per run), plots (each source's
held-out loss against its own weight; the objective against the weights: bars for leave-one-out, a ternary plot for
three sources), README.md, and best.yaml: the fitted model's predicted mixture when its held-out rank correlation is
trusted, else the best measured one, at the mixture's full budget.

`abl` below is a `sparknet.ablate.Ablation` (its design, sources, seeds, objective and configs).
"""

from __future__ import annotations

import math
import os
import shlex
from pathlib import Path

import numpy as np
import yaml

from sparknet.ablate_effects import effects_frame, effects_markdown
from sparknet.config import load_config, to_dict
from sparknet.errors import SparknetError
from sparknet.mixfit import Fit, fit_objective, spearman
from sparknet.objective import DOWNSTREAM, WIKITEXT_VALID
from sparknet.study import Summary
from sparknet.study_files import markdown_table, save_figure, write_csv, write_text
from sparknet.study_storage import counts, finished_trials, redact

LOO = "leave-one-out"


def key_of(trial) -> tuple[int, int] | None:
    """(point index, model seed) of a trial: its params once drawn, else the user attrs it was queued with (kept by
    Optuna's heartbeat retry and by our requeue, so a trial killed before it drew its params still says)."""
    for source in (trial.params, trial.user_attrs):
        if "point" in source and "seed" in source:
            return int(source["point"]), int(source["seed"])
    return None


def weights_text(names: tuple[str, ...], weights: tuple[float, ...]) -> str:
    return " ".join(f"{n}={f'{w:.3f}'.rstrip('0').rstrip('.')}" for n, w in zip(names, weights))


def results_frame(abl, study):
    """One row per finished run (the planned point x seed), sorted by the objective."""
    import pandas as pd

    metric = abl.objective.metric
    rows = []
    for t in finished_trials(study):
        key = key_of(t)
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
        for task, figures in (t.user_attrs.get("downstream") or {}).items():  # report items, every run's end
            row[f"downstream/{task}/bpb"] = figures.get("bpb")
        row[metric] = t.value
        row |= {"seconds": t.user_attrs.get("seconds"), "note": (t.user_attrs.get("reason") or "")[:80]}
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values([metric, "point", "seed"], na_position="last").reset_index(drop=True)
    return df


def points_frame(abl, runs):
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


def findings(abl, pts) -> list[str]:
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
                   f"({weights_text(abl.names, tuple(best[f'weight.{n}'] for n in abl.names))}): {metric} "
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
            rho = spearman(w, loss)
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


def command_line(abl) -> str:
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
    if abl.out_dir is not None:
        parts += ["--out", str(abl.out_dir)]
    env = ""
    wikitext = os.environ.get("SPARKNET_WIKITEXT")
    if abl.objective.kind == WIKITEXT_VALID and wikitext and not any(o.startswith("eval.wikitext_path=")
                                                                     for o in abl.base_overrides):
        env = f"SPARKNET_WIKITEXT={shlex.quote(wikitext)} "  # where the objective's text came from
    downstream = os.environ.get("SPARKNET_DOWNSTREAM")
    if downstream and not any(o.startswith("eval.downstream_path=") for o in abl.base_overrides) and (
            abl.objective.kind == DOWNSTREAM or load_config(abl.mixture, list(abl.base_overrides)).eval.downstream):
        env += f"SPARKNET_DOWNSTREAM={shlex.quote(downstream)} "  # where the task files came from
    return env + " ".join(shlex.quote(p) for p in [*parts, *abl.base_overrides])


def _round_weights(w: tuple[float, ...]) -> tuple[float, ...]:
    """Three decimals (the config normalizes them again): a mixture a person can read."""
    r = [round(float(x), 3) for x in w]
    return tuple(x / sum(r) if sum(r) else x for x in r) if abs(sum(r) - 1) > 1e-9 else tuple(r)


def choose_best(abl, pts, fit: Fit) -> tuple[tuple[float, ...], str]:
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


def write_ablation_summary(abl, study) -> Summary:
    """Print the table and write the ablation's folder: README.md, results.csv, plots, best.yaml."""
    import pandas as pd

    obj = abl.objective
    metric = obj.metric
    runs = results_frame(abl, study)
    done = runs.dropna(subset=[metric]) if len(runs) else runs
    if not len(done):
        raise SparknetError(f"study {abl.study_name}: no run completed (fix: see the trials' reasons in MLflow, "
                            f"experiment {abl.study_name}, or lower train.lr if they diverged)")
    pts = points_frame(abl, runs)
    out_dir = abl.out
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
    results = write_csv(out_dir / "results.csv", runs)
    plots = make_plots(abl, runs, pts, fit, out_dir)
    full = abl.full_config(weights)
    tuned = (f"# Its {obj.tuned_on} figures are tuned (the study selected on them): report the test split.\n"
             if obj.tuned_on else "")
    best = write_text(
        out_dir / "best.yaml",
        f"# The mixture of ablation {abl.study_name} ({metric}) at the mixture's full budget: {why}.\n"
        f"# Weights: {weights_text(abl.names, weights)}"
        + (f" (stage {abl.stage}; the other stages keep theirs)" if abl.stage is not None else "") + ".\n"
        f"# Train it: python -m sparknet.run {out_dir / 'best.yaml'}\n" + tuned
        + yaml.safe_dump(to_dict(full), sort_keys=False))
    effects_md = effects_markdown(abl, done)
    if effects_md:
        print(effects_md)
        plots.append(write_csv(out_dir / "effects.csv", effects_frame(abl, done)))
    text = readme(abl, study, show, formats, facts, fit, weights, why, [p for p in plots if p.suffix == ".png"],
                  mismatched, len(runs), effects_md)
    files = [*plots, results, best, write_text(out_dir / "README.md", text)]
    best_value = float(measured[metric].iloc[0])
    c = counts(study)
    metrics = {"best_value": best_value, "runs_complete": c["COMPLETE"], "runs_diverged": c["PRUNED"],
               "trials_failed": c["FAIL"]}
    if not math.isnan(fit.cv_spearman):
        metrics["fit_cv_spearman"] = fit.cv_spearman
    tags = {"sparknet.fit": fit.model, "sparknet.fit_trusted": str(fit.trusted).lower()}
    result = {"dir": str(out_dir), "best_weights": weights, "best_value": best_value, "fit": fit, "findings": facts}
    return Summary(result, metrics, tags, files, f"README.md, results.csv, best.yaml, {', '.join(p.name for p in plots)}")


def question(abl) -> str:
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


def _objective_note(obj, wik: dict, base) -> str:
    if obj.kind == DOWNSTREAM:
        return (f"; mean over {', '.join(obj.tasks(base))} of the correct-answer bpb on their select items "
                f"(validation files or a fixed half), disjoint from the report items every run ends with")
    if obj.tuned_on:
        return (f"; WikiText-2 validation split, text sha256 {wik.get('sha256', '')[:12]}, {wik.get('rows', '?')} "
                f"rows; the study selects on it, so its figures for the chosen mixture are tuned: report the test "
                f"split")
    return ""


def readme(abl, study, show, formats, facts, fit: Fit, weights, why, plots, mismatched, n_runs,
           effects_md: str = "") -> str:
    obj = abl.objective
    metric = obj.metric
    wik = study.user_attrs.get("sparknet.objective_data") or {}
    base = load_config(abl.mixture, list(abl.base_overrides))
    lines = [f"# Mixture ablation {abl.study_name}", "", f"Question: {question(abl)}", "",
             f"Objective: {metric} ({obj.unit}, lower is better" + _objective_note(obj, wik, base)
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
             + (f" Predicted best: {weights_text(abl.names, fit.predicted_best)} ({metric} {fit.predicted_value:.4f})."
                if fit.predicted_best is not None else ""), "",
             f"`best.yaml`: {why}; weights {weights_text(abl.names, weights)} at the mixture's full budget. Train it "
             f"with `python -m sparknet.run {abl.out / 'best.yaml'}`.", ""]
    if effects_md:
        lines += ["## Which source helps which metric", "",
                  "Held-out losses per source and each downstream task's correct-answer bpb on its report items "
                  "(the items no study selects by; `effects.csv` has every number).", "", effects_md, ""]
    for p in plots:
        lines += [f"![{p.stem}]({p.name})", ""]
    return "\n".join(lines)


def make_plots(abl, runs, pts, fit: Fit, out_dir: Path) -> list[Path]:
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
    made.append(save_figure(fig, out_dir / "loss_vs_weight.png"))
    plt.close(fig)

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
    made.append(save_figure(fig, out_dir / "objective.png"))
    plt.close(fig)
    return made


