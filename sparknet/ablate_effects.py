"""Which source helps which task: the ablation's domain x metric table of effects, as Olmix shows it.

Rows are the mixture's sources; columns are every metric each run measured: each source's held-out loss
(`val/<source>`, nats/token) and each downstream task's correct-answer bits per byte on its report items
(`<task> bpb`). A cell is the signed change of that metric caused by the row's source, with its standard error:

- leave-one-out: `base - without <source>`, each side the mean over its seeds; standard error
  sqrt(sd_base^2 / n_base + sd_without^2 / n_without) from the seeds' spread (ddof 1), or none with one seed;
- other designs: the least-squares slope of the metric on the source's weight over all runs, per +0.1 of weight,
  with the slope's standard error (`scipy.stats.linregress`); the other sources move with it (weights sum to 1), so
  it is the effect of this source taking share from the rest.

Negative is good for every column (lower loss, lower bpb): a negative cell says the source helps that metric.
"""

from __future__ import annotations

import math

import numpy as np

LOO = "leave-one-out"
STEP = 0.1  # regression effects are per +0.1 of a source's weight


def metric_columns(abl, runs) -> list[tuple[str, str]]:
    """(results column, label) of every metric the runs have: held-out losses, then downstream bpb per task."""
    cols = [(f"val/loss/{n}", f"val/{n}") for n in abl.names]
    tasks = sorted({c.split("/")[1] for c in runs.columns if c.startswith("downstream/") and c.endswith("/bpb")})
    cols += [(f"downstream/{t}/bpb", f"{t} bpb") for t in tasks]
    return [(c, label) for c, label in cols if c in runs and runs[c].notna().any()]


def _mean_sd(values: np.ndarray) -> tuple[float, float, int]:
    v = values[~np.isnan(values)]
    if not len(v):
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def effects(abl, runs) -> list[dict]:
    """One record per (source, metric): effect, its standard error, and how it was computed."""
    from scipy import stats

    out = []
    cols = metric_columns(abl, runs)
    for i, name in enumerate(abl.names):
        for col, label in cols:
            rec = {"source": name, "metric": label, "effect": math.nan, "stderr": math.nan, "method": ""}
            if abl.design == LOO:
                base = runs[runs["mixture"] == "base"][col].to_numpy(dtype=float)
                without = runs[runs["mixture"] == f"without {name}"][col].to_numpy(dtype=float)
                (mb, sb, nb), (mw, sw, nw) = _mean_sd(base), _mean_sd(without)
                if nb and nw:
                    rec["effect"] = mb - mw
                    rec["stderr"] = math.sqrt(sb ** 2 / nb + sw ** 2 / nw) if nb > 1 and nw > 1 else math.nan
                    rec["method"] = f"base - without {name} ({nb} and {nw} seeds)"
            else:
                ok = runs[[f"weight.{name}", col]].dropna()
                x, y = ok[f"weight.{name}"].to_numpy(dtype=float), ok[col].to_numpy(dtype=float)
                if len(ok) >= 3 and len(np.unique(x)) >= 2:
                    fit = stats.linregress(x, y)
                    rec["effect"], rec["stderr"] = fit.slope * STEP, fit.stderr * STEP if len(ok) > 2 else math.nan
                    rec["method"] = f"slope per +{STEP} weight over {len(ok)} runs"
            rec["order"] = i
            out.append(rec)
    return out


def effects_markdown(abl, runs) -> str:
    """The table (sources x metrics), cells `effect ± stderr`; '' when the runs measured nothing to show."""
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
                cells.append(f"{r['effect']:+.3f}{se}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    how = ("base - without the source, means over seeds; ± from the seeds' spread (none with one seed)"
           if abl.design == LOO else f"least-squares slope per +{STEP} of the source's weight, ± its standard error")
    note = ""
    if "hellaswag bpb" in labels:
        from sparknet.downstream.tasks import HELLASWAG_CAVEAT

        note = f" hellaswag: {HELLASWAG_CAVEAT} (unless the runs read the hub)."
    return "\n".join(lines) + f"\n\nEach cell: {how}. Negative helps (lower loss, lower bpb).{note}"


def effects_frame(abl, runs):
    import pandas as pd

    return pd.DataFrame([{k: v for k, v in r.items() if k != "order"} for r in effects(abl, runs)])
