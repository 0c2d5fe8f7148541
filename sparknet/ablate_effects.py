"""Which source helps which task: the ablation's domain x metric table of effects, as Olmix shows it.

Rows are the mixture's sources; columns are every metric each run measured: each source's held-out loss
(`val/<source>`, nats/token) and each downstream task's correct-answer bits per byte on its report items
(`<task> bpb`). A cell is the signed change of that metric caused by the row's source, with its standard error, a 95%
confidence interval and a p-value:

- leave-one-out: `base - without <source>`, each side the mean over its finished seeds; Welch's standard error
  sqrt(sd_base^2 / n_base + sd_without^2 / n_without) from the seeds' spread (ddof 1), t interval at the
  Welch-Satterthwaite degrees of freedom (`sparknet.ablate_stats.welch`), none with one seed on a side;
- other designs: the least-squares slope of the metric on the source's weight over all finished runs (every seed a
  run), per +0.1 of weight, with the slope's standard error, t interval and p-value at n - 2 degrees of freedom
  (`scipy.stats.linregress`); the other sources move with it (weights sum to 1), so it is the effect of this source
  taking share from the rest.

The table is one family: the p-values are Holm-corrected over all its cells that have one (`p_holm`), and a cell is
`significant` (marked * in the markdown) when its Holm p is below 0.05; any other cell is not told apart from noise.
Negative is good for every column (lower loss, lower bpb): a negative cell says the source helps that metric.
"""

from __future__ import annotations

import math

import numpy as np

from sparknet.ablate_stats import LEVEL, holm, significant, welch

LOO = "leave-one-out"
STEP = 0.1  # regression effects are per +0.1 of a source's weight


def metric_columns(abl, runs) -> list[tuple[str, str]]:
    """(results column, label) of every metric the runs have: held-out losses, then downstream bpb per task."""
    cols = [(f"val/loss/{n}", f"val/{n}") for n in abl.names]
    tasks = sorted({c.split("/")[1] for c in runs.columns if c.startswith("downstream/") and c.endswith("/bpb")})
    cols += [(f"downstream/{t}/bpb", f"{t} bpb") for t in tasks]
    return [(c, label) for c, label in cols if c in runs and runs[c].notna().any()]


def effects(abl, runs) -> list[dict]:
    """One record per (source, metric): effect, its standard error, 95% interval, degrees of freedom, p-value,
    Holm-adjusted p over the table's cells, whether that is significant, how many seeds or runs, and the method."""
    from scipy import special, stats

    out = []
    cols = metric_columns(abl, runs)
    for i, name in enumerate(abl.names):
        for col, label in cols:
            rec = {"source": name, "metric": label, "effect": math.nan, "stderr": math.nan, "ci_low": math.nan,
                   "ci_high": math.nan, "df": math.nan, "p": math.nan, "p_holm": math.nan, "significant": False,
                   "n": 0, "method": ""}
            if abl.design == LOO:
                base = runs[runs["mixture"] == "base"][col].to_numpy(dtype=float)
                without = runs[runs["mixture"] == f"without {name}"][col].to_numpy(dtype=float)
                d = welch(base, without)
                if d.n_a and d.n_b:
                    rec |= {"effect": d.estimate, "stderr": d.se, "ci_low": d.low, "ci_high": d.high, "df": d.df,
                            "p": d.p, "n": d.n_a + d.n_b,
                            "method": f"base - without {name} ({d.n_a} and {d.n_b} seeds, Welch)"}
            else:
                ok = runs[[f"weight.{name}", col]].dropna()
                x, y = ok[f"weight.{name}"].to_numpy(dtype=float), ok[col].to_numpy(dtype=float)
                if len(ok) >= 3 and len(np.unique(x)) >= 2:
                    fit = stats.linregress(x, y)
                    df = len(ok) - 2
                    half = float(special.stdtrit(df, 0.5 + LEVEL / 2)) * fit.stderr
                    rec |= {"effect": fit.slope * STEP, "stderr": fit.stderr * STEP,
                            "ci_low": (fit.slope - half) * STEP, "ci_high": (fit.slope + half) * STEP, "df": df,
                            "p": float(fit.pvalue), "n": len(ok),
                            "method": f"slope per +{STEP} weight over {len(ok)} runs"}
            rec["order"] = i
            out.append(rec)
    for rec, q in zip(out, holm([r["p"] for r in out])):
        rec["p_holm"] = float(q)
        rec["significant"] = significant(q)
    return out


def effects_markdown(abl, runs) -> str:
    """The table (sources x metrics), cells `effect ± stderr`, * when significant after Holm over the cells; '' when
    the runs measured nothing to show."""
    recs = effects(abl, runs)
    if not recs:
        return ""
    labels = list(dict.fromkeys(r["metric"] for r in recs))
    lines = ["| source | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for name in abl.names:
        cells = []
        for label in labels:
            r = next(x for x in recs if x["source"] == name and x["metric"] == label)
            if math.isnan(r["effect"]):
                cells.append("")
            else:
                se = "" if math.isnan(r["stderr"]) else f" ± {r['stderr']:.3f}"
                cells.append(f"{r['effect']:+.3f}{se}{' *' if r['significant'] else ''}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    how = ("base - without the source, means over seeds; ± one standard error from the seeds' spread (Welch; none "
           "with one seed)" if abl.design == LOO else
           f"least-squares slope per +{STEP} of the source's weight over the runs, ± its standard error")
    tested = sum(not math.isnan(r["p"]) for r in recs)
    marks = sum(r["significant"] for r in recs)
    family = (f"* marks a cell told apart from noise: Holm-corrected p below 0.05 over the table's {tested} cells with "
              f"a standard error ({marks} of them); unmarked cells are within noise, and `effects.csv` has each "
              f"cell's 95% confidence interval and p-values." if tested else
              "No cell has a standard error (one seed): none is told apart from noise.")
    note = ""
    if "hellaswag bpb" in labels:
        from sparknet.downstream.tasks import HELLASWAG_CAVEAT

        note = f" hellaswag, where the runs read the local copy (as every offline run does): {HELLASWAG_CAVEAT}."
    return "\n".join(lines) + f"\n\nEach cell: {how}. Negative helps (lower loss, lower bpb). {family}{note}"


def effects_frame(abl, runs):
    import pandas as pd

    return pd.DataFrame([{k: v for k, v in r.items() if k != "order"} for r in effects(abl, runs)])
