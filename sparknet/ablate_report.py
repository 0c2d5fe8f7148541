"""What an ablation (`sparknet.ablate`) writes once per study into its folder (`--out`, default
experiments/<study>/): the table sorted by the objective with the mean and spread over seeds, what was found in plain
sentences, the fitted model's verdict (`sparknet.mixfit`), results.csv (one row per run), plots (each source's
held-out loss against its own weight; the objective against the weights: bars for leave-one-out, a ternary plot for
three sources), README.md, and best.yaml: the fitted model's predicted mixture when its held-out rank correlation is
trusted, else the best measured one, at the mixture's full budget.

Before any of that, the adequacy verdict (`sparknet.adequacy`): when the proxies have not learned past a bigram table
on the slices the objective reads, the README and the terminal say so first, and the summary concludes nothing: no
effect sentences, no effects table, no fit; best.yaml is the best measured point, with that caveat in its comment.

`abl` below is a `sparknet.ablation.Ablation` (its design, sources, seeds, objective and configs).
"""

from __future__ import annotations

import math
import os
import shlex
from pathlib import Path

import numpy as np
import yaml

from sparknet.ablate_effects import effects_frame, effects_markdown
from sparknet.ablate_sections import transfer_section
from sparknet.ablate_stats import Difference, fmt_p, holm, noise_note, significant, summarize, welch_from_stats
from sparknet.adequacy import plot_curve
from sparknet.config import load_config, to_dict
from sparknet.errors import SparknetError
from sparknet.full_budget import source_limits
from sparknet.mixfit import Fit, design_supports_fit, fit_objective, spearman
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
        # The run's count-table references (sparknet.references) and how far it is past its bigram one (negative: not
        # yet), per held-out slice, and on WikiText-2 in bits per byte when it was scored.
        a = t.user_attrs
        for key, attr in (("ref_unigram", "val_ref_unigram"), ("ref_bigram", "val_ref_bigram")):
            if a.get(attr):
                row |= {f"{key}/{n}": a[attr].get(n) for n in abl.names}
        if a.get("val_ref_bigram"):
            row |= {f"past_bigram/{n}": a["val_ref_bigram"][n] - val[n] for n in abl.names
                    if n in val and n in a["val_ref_bigram"]}
        for key in ("unigram", "bigram"):
            if a.get(f"wikitext_valid_ref_{key}_bpb") is not None:
                row[f"wikitext-valid/ref_{key}_bpb"] = a[f"wikitext_valid_ref_{key}_bpb"]
        if a.get("wikitext_valid_ref_bigram_bpb") is not None and "wikitext_valid_bpb" in a:
            row["past_bigram/wikitext-valid"] = a["wikitext_valid_ref_bigram_bpb"] - a["wikitext_valid_bpb"]
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
    and standard deviation over the seeds that finished, how many finished (`seeds`) and how many failed or
    diverged (`failed`: not in the means, never dropped silently), sorted by the mean objective.

    The frame's `attrs` keep what the sentences need beyond the table (they follow the frame through dropna and
    sorting): "seed_values", {mixture: {column: finished seeds' values}} for the objective and every held-out loss,
    and "failed_seeds", {mixture: {"seeds": finished, "failed": count, "notes": ["seed S diverged: reason", ...]}}
    for every point with a failed or diverged seed (a point none of whose seeds finished included)."""
    import pandas as pd

    metric = abl.objective.metric
    cols = list(dict.fromkeys([metric, "val/loss", *(f"val/loss/{n}" for n in abl.names)]))
    rows, seed_values, failed_seeds = [], {}, {}
    for point, g in runs.groupby("point", sort=True):
        done = g[g[metric].notna() & (g["state"] == "COMPLETE" if "state" in g else True)]
        bad = g.drop(index=done.index)
        values = done[metric].to_numpy(dtype=float)
        name = g["mixture"].iloc[0]
        row = {"point": int(point), "mixture": name}
        row |= {f"weight.{n}": float(g[f"weight.{n}"].iloc[0]) for n in abl.names}
        # Identical over seeds (the plan does not depend on train.seed): the first run's count stands for all.
        row |= {f"tokens.{n}": g[f"tokens.{n}"].iloc[0] for n in abl.names}
        row |= {f"val/loss/{n}": float(done[f"val/loss/{n}"].mean()) for n in abl.names}
        if metric != "val/loss":
            row["val/loss"] = float(done["val/loss"].mean())
        row[metric] = float(values.mean()) if len(values) else math.nan
        row["sd"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        row["seeds"] = len(values)
        row["failed"] = len(bad)
        for c in (f"past_bigram/{n}" for n in (*abl.names, "wikitext-valid")):  # mean over the finished seeds
            if c in g:
                row[c] = float(done[c].mean()) if done[c].notna().any() else math.nan
        rows.append(row)
        seed_values[name] = {c: tuple(float(v) for v in done[c]) for c in cols if c in done}
        if len(bad):
            notes = []
            for _, r in bad.sort_values("seed").iterrows():
                state = str(r.get("state", ""))
                what = {"PRUNED": "diverged", "FAIL": "failed"}.get(state, f"has no {metric}")
                note = str(r.get("note") or "").strip()
                notes.append(f"seed {r['seed']} {what}" + (f": {note}" if note else ""))
            failed_seeds[name] = {"seeds": len(values), "failed": len(bad), "notes": notes}
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values([metric, "point"], na_position="last").reset_index(drop=True)
    df.attrs["seed_values"] = Kept(seed_values)
    df.attrs["failed_seeds"] = Kept(failed_seeds)
    return df


class Kept(dict):
    """What `points_frame` keeps in a frame's attrs: read, never changed, so pandas's copy of the attrs on every
    operation (a deep copy) hands on this one object instead of copying every seed's value each time."""

    def __deepcopy__(self, memo):
        return self


def _change(delta: float) -> str:
    return "raised" if delta > 0 else "lowered" if delta < 0 else "left"


SEED_VARY = {  # what differs between a point's seeds (`abl.seed_vary`), as the spread sentence says it
    "init": "model initialization only (the data order is the same for every seed, so data-order noise is in neither "
            "this spread nor the tests)",
    "data": "the data order only (the initialization is the same for every seed, so initialization noise is in "
            "neither this spread nor the tests)",
    "both": "both model initialization and data order",
}


def _side(pts, row, col: str, metric: str) -> tuple[float, float, int]:
    """(mean, sd, finished seeds) of one point's column: from the seeds' values `points_frame` kept, else (a frame
    built by hand) the table's own columns, which give a spread for the objective only."""
    values = pts.attrs.get("seed_values", {}).get(row["mixture"], {}).get(col)
    if values is not None:
        return summarize(values)
    n = int(row["seeds"]) if "seeds" in row and row["seeds"] == row["seeds"] else 1
    sd = float(row["sd"]) if col == metric and "sd" in row else math.nan
    return float(row[col]), sd, n


def _diff(pts, a, b, col: str, metric: str) -> Difference:
    """Point a's column minus point b's, over their seeds (Welch)."""
    return welch_from_stats(*_side(pts, a, col, metric), *_side(pts, b, col, metric))


def _kind(d: Difference, q: float) -> str:
    return "claim" if significant(q) else "null" if d.measured else "unmeasured"


def _numbers(d: Difference, q: float, digits: int, unit: str, names: tuple[str, str] = ("", ""),
             means: str = "") -> str:
    """The parenthesis after a difference's sentence: for a claim the means, its interval in the claimed direction and
    Holm p; inside noise the signed difference, interval, Holm p and the means; without a spread the means and why
    (the sentence itself gives the signed difference)."""
    kind = _kind(d, q)
    lead = f"{means}; " if means else ""
    if kind == "claim":
        lo, hi = (d.low, d.high) if d.estimate > 0 else (-d.high, -d.low)
        return f"{lead}95% CI {lo:.{digits}f}..{hi:.{digits}f}, Holm p {fmt_p(q)}"
    if kind == "null":
        # An interval of its own that misses 0 while the corrected p does not pass: said, so it reads as a hint.
        hint = " (uncorrected for the comparisons: a hint, not an effect)" if d.low > 0 or d.high < 0 else ""
        return (f"{d.estimate:+.{digits}f} {unit}, 95% CI {d.low:+.{digits}f}..{d.high:+.{digits}f}{hint}, "
                f"Holm p {fmt_p(q)}" + (f"; {means}" if means else ""))
    return f"{lead}{noise_note(d, *names)}, so not tested"


def point_pairs(abl, pts) -> tuple[dict[tuple[int, int], Difference], dict[tuple[int, int], float], int]:
    """Every pair (i, j), i < j, of the measured points (rows of `pts`, best first): row j's objective minus row
    i's over their seeds, and Holm's adjusted p over the family of all pairs with a spread on both sides (the best,
    runner-up and worst are picked after looking at every point, so every pair is a comparison made). Returns the
    differences, the adjusted p-values and the family's size."""
    metric = abl.objective.metric
    sides = [_side(pts, r, metric, metric) for r in pts.to_dict("records")]
    diffs = {(i, j): welch_from_stats(*sides[j], *sides[i]) for i in range(len(sides)) for j in range(i + 1, len(sides))}
    keys = list(diffs)
    adjusted = holm([diffs[k].p for k in keys])
    return diffs, dict(zip(keys, (float(q) for q in adjusted))), int(np.isfinite(adjusted).sum())


def _seed_notes(abl, pts) -> list[str]:
    """Failed or diverged seeds (not in the means), and points with fewer than two finished seeds (no spread)."""
    out = []
    failed = pts.attrs.get("failed_seeds")
    if failed is None and "failed" in pts:  # a frame built by hand: its counts only
        failed = {r["mixture"]: {"seeds": int(r["seeds"]), "failed": int(r["failed"]), "notes": []}
                  for _, r in pts.iterrows() if r["failed"] > 0}
    if failed:
        parts = []
        for name, f in failed.items():
            total = f["seeds"] + f["failed"]
            parts.append(f"{name}, {f['failed']} of {total}" + (", none finished: no result" if not f["seeds"] else "")
                         + (f" ({'; '.join(f['notes'])})" if f["notes"] else ""))
        out.append(f"Failed or diverged seeds, left out of the means and the tests: {'; '.join(parts)}.")
    if "seeds" in pts and (pts["seeds"] > 1).any():
        short = [f"{r['mixture']} ({int(r['seeds'])} seed)" for _, r in pts.iterrows() if r["seeds"] < 2]
        if short:
            out.append(f"Fewer than two finished seeds, so no spread measured and no test made with: "
                       f"{', '.join(short)}.")
    return out


def findings(abl, pts) -> list[str]:
    """What the table says, in plain sentences: every difference stated with its 95% confidence interval over the
    seeds (Welch) and a Holm-corrected p-value, claimed ("raised", "beats", "needs most") only when that p is below
    0.05, else said to be inside seed noise; a point with one finished seed gives its difference untested. The
    family each correction runs over is stated in the sentences. `pts` is `points_frame`'s (a point without a result
    is skipped but for the failed-seeds sentence)."""
    metric, unit = abl.objective.metric, abl.objective.unit
    pts = pts[pts[metric].notna()]  # a point none of whose seeds finished: in the failed-seeds sentence only
    m = pts.set_index("mixture", drop=False)
    sds = pts["sd"].dropna()
    noise = float(sds.median()) if len(sds) else None
    out = []

    if abl.design == LOO and "base" in m.index:
        base = m.loc["base"]
        removed = [n for n in abl.names if f"without {n}" in m.index]
        family: dict[tuple[str, str], Difference] = {}  # the comparisons these sentences state
        for n in removed:
            row = m.loc[f"without {n}"]
            family["objective", n] = _diff(pts, row, base, metric, metric)
            if metric != f"val/loss/{n}":
                family["own", n] = _diff(pts, row, base, f"val/loss/{n}", metric)
        effect = {n: family["objective", n] for n in removed}
        ranked = sorted((n for n in removed if not math.isnan(effect[n].estimate)), key=lambda n: -effect[n].estimate)
        if len(ranked) > 1:  # the largest removal effect against the next: the two removals' seeds compared
            family["gap", ""] = _diff(pts, m.loc[f"without {ranked[0]}"], m.loc[f"without {ranked[1]}"], metric,
                                      metric)
        q = dict(zip(family, (float(x) for x in holm([d.p for d in family.values()]))))
        size = sum(d.measured for d in family.values())
        for n in removed:
            row = m.loc[f"without {n}"]
            d, qd, names = family["objective", n], q["objective", n], (f"without {n}", "base")
            nums = _numbers(d, qd, 4, unit, names, f"{base[metric]:.4f} -> {row[metric]:.4f}")
            text = {"claim": f"Removing {n} {_change(d.estimate)} {metric} by {abs(d.estimate):.4f} {unit} ({nums})",
                    "null": f"Removing {n}: no effect on {metric} distinguishable from seed noise ({nums})",
                    "unmeasured": f"Removing {n} changed {metric} by {d.estimate:+.4f} {unit} ({nums})"}[_kind(d, qd)]
            if ("own", n) in family:
                col = f"val/loss/{n}"
                d, qd = family["own", n], q["own", n]
                nums = _numbers(d, qd, 3, "nats/token", names, f"{base[col]:.3f} -> {row[col]:.3f}")
                text += "; its own held-out loss " + {
                    "claim": f"val/{n} {'rose' if d.estimate > 0 else 'fell'} by {abs(d.estimate):.3f} nats/token "
                             f"({nums})",
                    "null": f"val/{n}: no change distinguishable from seed noise ({nums})",
                    "unmeasured": f"val/{n} changed by {d.estimate:+.3f} nats/token ({nums})"}[_kind(d, qd)]
            out.append(text + ".")
        if ("gap", "") in family:
            top, nxt = ranked[0], ranked[1]
            gap, qg = family["gap", ""], q["gap", ""]
            both = (f"removing {top} {effect[top].estimate:+.4f} {unit}, removing {nxt} {effect[nxt].estimate:+.4f} "
                    f"{unit}")
            top_counts = _kind(effect[top], q["objective", top]) == "claim" and effect[top].estimate > 0
            if top_counts and _kind(gap, qg) == "claim":
                out.append(f"The source {metric} needs most is {top}: removing it costs {gap.estimate:.4f} {unit} more "
                           f"than removing {nxt}, the next ({both}; {_numbers(gap, qg, 4, unit)}).")
            elif not top_counts:
                out.append(f"No single source is shown to matter most: no removal raised {metric} beyond seed noise "
                           f"(the largest change: removing {top}, {effect[top].estimate:+.4f} {unit}).")
            else:
                nums = _numbers(gap, qg, 4, unit, (f"without {top}", f"without {nxt}"))
                out.append(f"No single source is shown to matter most: the two largest effects ({both}) differ by "
                           f"{gap.estimate:.4f} {unit}, " + ("within seed noise" if gap.measured else "untested")
                           + f" ({nums}).")
        if size:
            out.append(f"How these are tested: each difference is a mean over one point's seeds minus another's, with "
                       f"Welch's standard error and a 95% confidence interval (t); the p-values are Holm-corrected "
                       f"over the {size} comparison{'s' if size != 1 else ''} with a spread stated here (each removal "
                       f"against base on {metric}"
                       + (", and on the removed source's own held-out loss"
                          if any(k == "own" and d.measured for (k, _), d in family.items()) else "")
                       + (", and the largest removal effect against the next" if ("gap", "") in family else "")
                       + "); an effect is claimed only when its Holm p is below 0.05.")
    else:
        best, worst = pts.iloc[0], pts.iloc[-1]
        weights = weights_text(abl.names, tuple(best[f"weight.{n}"] for n in abl.names))
        if len(pts) > 1:
            out.append(f"The best measured mixture is {best['mixture']} ({weights}): {metric} {best[metric]:.4f} "
                       f"{unit}; the worst is {worst['mixture']} ({worst[metric]:.4f}).")
            diffs, q, size = point_pairs(abl, pts)
            last = len(pts) - 1
            for j, who in ((1, "the runner-up"), *(((last, "the worst"),) if last > 1 else ())):
                other = pts.iloc[j]
                d, qj = diffs[(0, j)], q[(0, j)]
                nums = _numbers(d, qj, 4, unit, (other["mixture"], best["mixture"]),
                                f"{best[metric]:.4f} -> {other[metric]:.4f}")
                out.append({
                    "claim": f"{best['mixture']} beats {who}, {other['mixture']}, by {d.estimate:.4f} {unit} ({nums}).",
                    "null": f"{best['mixture']} against {who}, {other['mixture']}: no difference in {metric} "
                            f"distinguishable from seed noise ({nums}).",
                    "unmeasured": f"{who[:1].upper()}{who[1:]}, {other['mixture']}, is {d.estimate:.4f} {unit} behind "
                                  f"{best['mixture']} ({nums})."}[_kind(d, qj)])
            if size:
                out.append(f"How these are tested: each difference is a mean over one point's seeds minus another's, "
                           f"with Welch's standard error and a 95% confidence interval (t); the p-values are "
                           f"Holm-corrected over all {size} pairs of points with a spread (the best, the runner-up "
                           f"and the worst are picked after looking at every point, so every pair is a comparison "
                           f"made); a difference is claimed only when its Holm p is below 0.05.")
        else:
            out.append(f"One point measured: {best['mixture']} ({weights}): {metric} {best[metric]:.4f} {unit}.")
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
    out += _seed_notes(abl, pts)
    vary = SEED_VARY.get(getattr(abl, "seed_vary", "init"), getattr(abl, "seed_vary", "init"))
    if noise is not None:
        out.append(f"The spread between seeds is {noise:.4f} {unit} (the standard deviation of {metric} over the "
                   f"{len(abl.seeds)} seeds of a point, median over points; largest {float(sds.max()):.4f}); the "
                   f"seeds vary {vary}.")
    else:
        out.append("One seed per point: the noise between seeds is not measured and no difference is tested (rerun "
                   "with --seeds 2 or more: the study grows).")
    return out


def command_line(abl) -> str:
    """The command that reruns (continues) this study."""
    parts = ["python", "-m", "sparknet.ablate", str(abl.mixture), "--design", abl.design, "--proxy-tokens",
             str(abl.proxy_tokens), "--objective", abl.objective.name, "--seeds", str(len(abl.seeds))]
    if len(abl.seeds) > 1 or abl.seed_vary != "both":
        parts += ["--seed-vary", abl.seed_vary]
    if abl.stage is not None:
        parts += ["--stage", str(abl.stage)]
    if abl.design.startswith(("random:", "prior:")) and abl.design_seed:
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


def mean_noise(pts) -> float | None:
    """The noise of one point's mean objective, for the fit: the seed spread pooled over the points with two or more
    finished seeds (root mean square of their standard deviations), over the square root of the typical number of
    seeds; None when no point has two."""
    two = pts[pts["seeds"] >= 2] if "seeds" in pts else pts.iloc[:0]
    if not len(two) or two["sd"].isna().all():
        return None
    return float(np.sqrt(np.nanmean(two["sd"].to_numpy(float) ** 2)) / np.sqrt(float(np.median(pts["seeds"]))))


def choose_best(abl, pts, fit: Fit, limits=None) -> tuple[tuple[float, ...], str]:
    """The mixture best.yaml holds and why: the fit's prediction when trusted (its candidates were trainable at the
    full budget already), else the best measured point; a measured point that runs out of a source at the full
    budget (`limits`, `sparknet.full_budget`) gives way to the best one that does not, or to itself with that source
    capped, and the reason says which source ran out."""
    metric = abl.objective.metric
    if fit.trusted and fit.predicted_best is not None:
        w = _round_weights(fit.predicted_best)
        return w, (f"predicted by the fitted {fit.model} model ({metric} {fit.predicted_value:.4f} predicted, 95% "
                   f"prediction interval {fit.interval_lo:.4f}..{fit.interval_hi:.4f}; held-out rank correlation "
                   f"{fit.cv_spearman:.2f}, permutation p {fmt_p(fit.p_value)}): not measured yet, confirm it "
                   f"(--confirm)")
    best = pts.iloc[0]
    w = tuple(float(best[f"weight.{n}"]) for n in abl.names)
    why = f"the best measured point, {best['mixture']} ({metric} {best[metric]:.4f} at the proxy budget)"
    if len(pts) > 1:  # the test `findings` states: best against runner-up, Holm over every pair of points
        diffs, q, size = point_pairs(abl, pts)
        d, second = diffs[(0, 1)], pts.iloc[1]
        if not significant(q[(0, 1)]):
            why += (f", {d.estimate:.4f} ahead of the runner-up {second['mixture']} ({second[metric]:.4f}; "
                    + (f"95% CI {d.low:+.4f}..{d.high:+.4f}, Holm p {fmt_p(q[(0, 1)])} over {size} pairs of points"
                       if d.measured else noise_note(d, second["mixture"], best["mixture"]))
                    + "): not a clear winner")
    short = limits.shortfall(w) if limits is not None else None
    if short is None:
        return w, why
    for k in range(1, len(pts)):  # the best measured point that is trainable at the full budget
        row = pts.iloc[k]
        alt = tuple(float(row[f"weight.{n}"]) for n in abl.names)
        if limits.shortfall(alt) is None:
            return alt, (f"the best measured point that is trainable at the full budget, {row['mixture']} ({metric} "
                         f"{row[metric]:.4f} at the proxy budget; {row[metric] - best[metric]:+.4f} from the best, "
                         f"{best['mixture']}, which cannot be trained as measured: {short})")
    capped = limits.nearest_feasible(w)
    if capped is None:
        raise SparknetError(f"study {abl.study_name}: no measured mixture is trainable at the full budget ({short}) "
                            f"and capping the short sources cannot fill it (fix: add data to the sources, raise "
                            f"their max_repeats, or lower mixture.total_tokens)")
    capped = _round_weights(capped)
    return capped, (f"{why}, with the sources that run out capped at the share their data allow (not measured: "
                    f"confirm it): as measured it cannot be trained, {short}")


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
    limits = source_limits(abl.base_config(), abl.names, abl.full_config)
    verdict = ablation_verdict(abl, study)
    print(("warning: " if verdict.blocks else "adequacy: ") + verdict.headline(), flush=True)
    if verdict.blocks:  # nothing is concluded from proxies that have not learned past a bigram table: no fit
        fit = Fit(model="none", n_points=len(measured), cv_spearman=math.nan,
                  verdict="not fitted: the proxies have not learned past a bigram table (see Adequacy)")
    else:
        fit = fit_objective(np.array([[r[f"weight.{n}"] for n in abl.names] for _, r in measured.iterrows()]),
                            measured[metric].to_numpy(dtype=float), abl.names, seed_sd=mean_noise(measured),
                            supports_fit=design_supports_fit(abl.design), design=abl.design,
                            feasible=limits.feasible if limits is not None else None, seed=abl.design_seed)
    weights, why = choose_best(abl, measured, fit, limits)
    study.set_user_attr("sparknet.best_weights", list(weights))  # what --confirm trains, by whichever worker
    mismatched = [f"{r['mixture']} seed {r['seed']}" for _, r in runs.iterrows()
                  if any(r[f"tokens.{n}"] != r[f"planned.{n}"] for n in abl.names) and r["state"] == "COMPLETE"]

    # The table a person reads: weights, realized tokens, held-out losses, the objective's mean and spread.
    show = pts.rename(columns={**{f"weight.{n}": f"w {n}" for n in abl.names},
                               **{f"tokens.{n}": f"tokens {n}" for n in abl.names},
                               **{f"val/loss/{n}": f"val/{n}" for n in abl.names},
                               **{f"past_bigram/{n}": f"past bigram {n}" for n in (*abl.names, "wikitext-valid")},
                               "sd": "sd over seeds"}).drop(columns=["point"])
    formats = {**{f"w {n}": ".3f" for n in abl.names}, **{f"tokens {n}": ",d" for n in abl.names},
               **{f"val/{n}": ".4f" for n in abl.names}, "val/loss": ".4f", metric: ".4f", "sd over seeds": ".4f",
               **{f"past bigram {n}": "+.3f" for n in (*abl.names, "wikitext-valid")}}
    for n in abl.names:
        show[f"tokens {n}"] = show[f"tokens {n}"].map(lambda v: int(v) if v is not None and v == v else None)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(show.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    # Inadequate proxies: the failed seeds are still said (facts about the runs), no effect is.
    facts = _seed_notes(abl, measured) if verdict.blocks else findings(abl, measured)
    for line in facts:
        print(line)
    print(f"fit: {fit.verdict}")
    if verdict.blocks:
        print(f"warning: {verdict.headline()}", flush=True)  # again, under the table it qualifies
    results = write_csv(out_dir / "results.csv", runs)
    plots = make_plots(abl, runs, pts, fit, out_dir)
    curve_png = plot_curve(verdict, out_dir / "learning_curve.png", abl.study_name,
                           getattr(abl, "auto_budget", None))
    full = abl.full_config(weights)
    tuned = (f"# Its {obj.tuned_on} figures are tuned (the study selected on them): report the test split.\n"
             if obj.tuned_on else "")
    best = write_text(
        out_dir / "best.yaml",
        f"# The mixture of ablation {abl.study_name} ({metric}) at the mixture's full budget: {why}.\n"
        f"# Weights: {weights_text(abl.names, weights)}"
        + (f" (stage {abl.stage}; the other stages keep theirs)" if abl.stage is not None else "") + ".\n"
        f"# Train it: python -m sparknet.run {out_dir / 'best.yaml'}\n" + tuned
        + (f"# Caveat: the best measured point, not an answer: {verdict.headline()}\n" if verdict.blocks else "")
        + yaml.safe_dump(to_dict(full), sort_keys=False))
    effects_md = "" if verdict.blocks else effects_markdown(abl, done)
    if effects_md:
        print(effects_md)
        plots.append(write_csv(out_dir / "effects.csv", effects_frame(abl, done)))
    text = readme(abl, study, show, formats, facts, fit, weights, why, [p for p in plots if p.suffix == ".png"],
                  mismatched, len(runs), effects_md, limits, verdict=verdict, curve_png=curve_png)
    files = [*plots, *([curve_png] if curve_png else []), results, best, write_text(out_dir / "README.md", text)]
    best_value = float(measured[metric].iloc[0])
    c = counts(study)
    metrics = {"best_value": best_value, "runs_complete": c["COMPLETE"], "runs_diverged": c["PRUNED"],
               "trials_failed": c["FAIL"]}
    if not math.isnan(fit.cv_spearman):
        metrics["fit_cv_spearman"] = fit.cv_spearman
    tags = {"sparknet.fit": fit.model, "sparknet.fit_trusted": str(fit.trusted).lower(),
            "sparknet.adequate": str(verdict.adequate).lower()}
    result = {"dir": str(out_dir), "best_weights": weights, "best_value": best_value, "fit": fit, "findings": facts,
              "adequacy": verdict.to_dict()}
    return Summary(result, metrics, tags, files, f"README.md, results.csv, best.yaml, "
                   f"{', '.join(p.name for p in [*plots, *([curve_png] if curve_png else [])])}")


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


def ablation_verdict(abl, study):
    """The adequacy verdict over the study's completed runs (`sparknet.adequacy`): the base point is point 0 with
    the first seed, whose run evaluated along the way (its learning curve)."""
    from sparknet.adequacy import study_verdict

    def label(t) -> str:
        point, seed = key_of(t)
        name = abl.points[point].name if point < len(abl.points) else f"point {point}"
        return f"{name} (seed {seed})"

    trials = [t for t in finished_trials(study) if key_of(t) is not None and key_of(t)[0] < len(abl.points)]
    return study_verdict(abl, trials, lambda t: key_of(t) == (0, abl.seeds[0]), label, noun="points")


def readme(abl, study, show, formats, facts, fit: Fit, weights, why, plots, mismatched, n_runs,
           effects_md: str = "", limits=None, *, verdict=None, curve_png: Path | None = None) -> str:
    obj = abl.objective
    full = abl.full_config(weights).mixture.total_tokens
    if limits is None:
        budget_note = (f"Trainable at the full budget ({full:,} tokens): not checked (the token stores were not found "
                       f"here); `python -m sparknet.run best.yaml --dry-run` checks it.")
    else:
        budget_note = (f"Trainable at the full budget ({full:,} tokens): the fit's candidates and `best.yaml` are "
                       f"checked against every source's training tokens and max_repeats, as `sparknet.prepare` "
                       f"checks a run" + (f"; {', '.join(limits.unknown)}: only partly tokenized so far, so assumed "
                                          f"to have enough (prepare checks it before training)"
                                          if limits.unknown else "") + ".")
    if abl.proxy_tokens > full:  # the study then ranks mixtures trained longer than the run best.yaml asks for
        budget_note += (f" The proxies ({abl.proxy_tokens:,} tokens) train longer than the full budget: `best.yaml` "
                        f"at {full:,} tokens is not what the study measured (fix: rerun the study's command with "
                        f"mixture.total_tokens=N, N at least {abl.proxy_tokens:,}: nothing is trained again, the "
                        f"summary is written for that budget).")
    elif abl.proxy_tokens == full:
        budget_note += (" The runs trained the full budget itself: the study measured these mixtures at the budget "
                        "`best.yaml` trains, not proxies of it.")
    metric = obj.metric
    wik = study.user_attrs.get("sparknet.objective_data") or {}
    base = load_config(abl.mixture, list(abl.base_overrides))
    from sparknet.adequacy import adequacy_section

    blocks = verdict is not None and verdict.blocks
    lines = [f"# Mixture ablation {abl.study_name}", "",
             *([f"> **Not an answer about data.** {verdict.headline()}", ""] if blocks else []),
             f"Question: {question(abl)}", "",
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
             *(adequacy_section(verdict, curve_png, getattr(abl, "auto_budget", None)).splitlines() + [""]
               if verdict is not None else []),
             *(["## What it says", "", "Nothing about the data: the proxies have not learned past a bigram table "
                "(Adequacy, above). The table is what was measured."] + [f"- {f}" for f in facts] + [""] if blocks else
               ["## What it says", "", *[f"- {f}" for f in facts], "",
                "## Fitted model", "",
                f"{fit.verdict[:1].upper()}{fit.verdict[1:]}."
                + (f" Each family's own held-out rank correlation (for reading: the family was chosen inside the "
                   f"folds, not by these): {', '.join(f'{k} {v:.2f}' for k, v in fit.candidates.items())}."
                   if fit.candidates else "")
                + (f" Predicted best: {weights_text(abl.names, fit.predicted_best)} ({metric} "
                   f"{fit.predicted_value:.4f}, 95% prediction interval {fit.interval_lo:.4f}..{fit.interval_hi:.4f})."
                   if fit.predicted_best is not None and math.isfinite(fit.interval_lo) else ""), ""]),
             budget_note, "",
             f"`best.yaml`: {why}; weights {weights_text(abl.names, weights)} at the mixture's full budget. Train it "
             f"with `python -m sparknet.run {abl.out / 'best.yaml'}`.", ""]
    if effects_md:
        lines += ["## Which source helps which metric", "",
                  "Held-out losses per source and each downstream task's correct-answer bpb on its report items "
                  "(the items no study selects by; `effects.csv` has every number).", "", effects_md, ""]
    transfer = transfer_section(study.user_attrs)  # a finished --transfer of this study survives a rewrite
    if transfer:
        lines += [transfer, ""]
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


