"""README sections rendered from what a study keeps in its user attrs, apart from the code that computes it.

The "Transfer" section of an ablation's README: `sparknet.ablate_transfer` keeps each finished transfer's result in
the original study (`TRANSFER_ATTR`) and writes the section between its markers (`with_section`);
`sparknet.ablate_report` renders it again from the study whenever it rewrites the README, so a transfer survives a
rewritten summary.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from sparknet.ablate_stats import ALPHA

TRANSFER_ATTR = "sparknet.transfer"  # the original study's user attr: {transfer study name: result}
BEGIN = "<!-- sparknet:transfer:begin (written by python -m sparknet.ablate --transfer; rerunning it replaces this) -->"
END = "<!-- sparknet:transfer:end -->"
_BEGIN_RE = re.compile(r"<!-- sparknet:transfer:begin[^>]*-->")
VARIES = {"init": "the model initialization only", "data": "the data order only",
          "both": "both model initialization and data order"}


def pair_fraction(pair: list[int]) -> str:
    """[agreeing, pairs] as "a of n pairs (a/n)"."""
    a, n = pair
    return f"{a} of {n} pair{'s' if n != 1 else ''} ({a / n:.2f})" if n else "no pairs"


def _stat(side: Mapping[str, Any] | None) -> str:
    if side is None:
        return "not measured"
    sd = side.get("sd")
    return f"{side['mean']:.4f}" + (f" ± {sd:.4f}" if sd is not None else "") + f" ({side['n']})"


def _who(p: Mapping[str, Any]) -> str:
    """A point's name, and its roles where they say more."""
    roles = [r for r in p["roles"] if r != p["name"]]
    return p["name"] + (f" ({', '.join(roles)})" if roles else "")


def _one_transfer(r: Mapping[str, Any]) -> list[str]:
    unit, metric = r["unit"], r["metric"]
    small_b, large_b = f"{r['proxy_tokens']:,}", f"{r['budget_tokens']:,}"
    names = list(r["points"][0]["weights"]) if r["points"] else []
    what = f"{r['budget_tokens'] / r['proxy_tokens']:.3g}x the {small_b}-token proxy budget"
    over = f", with {' '.join(f'`{o}`' for o in r['overrides'])}" if r["overrides"] else ""
    lines = [f"### {r['label']}: {large_b} tokens{over} (study `{r['study']}`)", "",
             f"Retrained at {large_b} tokens ({what}){over}, with the study's seeds ({r['seeds']} per point, varying "
             f"{VARIES.get(r['seed_vary'], r['seed_vary'])}) and objective "
             f"{metric}: the study's answer (best.yaml), its best measured point, the base mixture and points spread "
             f"over its measured ranking. The transfer study's own answer is in `{r['folder']}/`; every number here is "
             f"in `transfer.csv`.", "",
             f"| mixture | role | {' | '.join(f'w {n}' for n in names)} | {metric} at {small_b} (mean ± sd (seeds)) "
             f"| rank | at {large_b} | rank |",
             "|---|---|" + "---:|" * len(names) + "---:|---:|---:|---:|"]
    for p in r["points"]:
        lines.append(f"| {p['name']} | {', '.join(p['roles'])} | "
                     + " | ".join(f"{p['weights'][n]:.3f}" for n in names)
                     + f" | {_stat(p['small'])} | {p['small_rank'] or ''} | {_stat(p['large'])} | "
                       f"{p['large_rank'] or ''} |")
    lines.append("")
    n = r["n"]
    facts = []
    if r["spearman"] is not None:
        sig = r["spearman_p"] < ALPHA
        facts.append(f"Spearman's rank correlation between the two budgets' means over the {n} points measured at "
                     f"both: {r['spearman']:+.2f} (scipy.stats.spearmanr; {r.get('spearman_p_method') or 'p'} p = "
                     f"{r['spearman_p']:.2g}); with {n} points "
                     + ("it is distinguishable from no correlation at the 5% level."
                        if sig else "it is not distinguishable from no correlation at the 5% level"
                        + (f" (no ranking of {n} points can be: the smallest exact p is 2/{n}! = "
                           f"{2 / math.factorial(n):.2g}; more points, --transfer-points, can)."
                           if 2 / math.factorial(n) >= ALPHA else ".")))
    else:
        facts.append(f"{n} point{'s' if n != 1 else ''} measured at both budgets"
                     + (" with differing values" if n >= 3 else "") + ": too few for a rank correlation.")
    pairs = r["pairs"]
    if pairs["all"][1]:
        text = (f"Decision accuracy (as DataDecide measures it: the fraction of pairs of points ordered the same way "
                f"at both budgets): {pair_fraction(pairs['all'])}.")
        if pairs["separated"][1] or pairs["noise"][1]:
            text += (f" Pairs whose {small_b}-token difference is beyond seed noise (Welch 95% interval excluding 0): "
                     f"{pair_fraction(pairs['separated'])}; inside seed noise: {pair_fraction(pairs['noise'])}.")
        if pairs["unmeasured"][1]:
            text += (f" {pairs['unmeasured'][1]} pair{'s' if pairs['unmeasured'][1] != 1 else ''} with a point of "
                     f"fewer than two seeds: seed noise not measured.")
        facts.append(text)
    have = [p for p in r["points"] if p["large"] is not None]
    if have:
        top = min(have, key=lambda p: p["large"]["mean"])
        facts.append(f"Best at {large_b} tokens: {_who(top)}, {top['large']['mean']:.4f} {unit}.")
    for p in r["points"]:
        if p["small"] is None and p["large"] is not None:
            facts.append(f"{_who(p)} was not measured at the proxy budget: at {large_b} tokens it ranks "
                         f"{p['large_rank_all']} of {len(have)} ({p['large']['mean']:.4f}).")
        if p["large"] is None:
            facts.append(f"{_who(p)} has no finished run at {large_b} tokens (failed or diverged: see `"
                         f"{r['folder']}/README.md`).")
    return lines + [f"- {f}" for f in facts] + [""]


def transfer_section(attrs: Mapping[str, Any]) -> str:
    """The README's "Transfer" section (markdown between its markers) from a study's user attrs, or "" when no
    transfer of the study has finished: `transfer_section(study.user_attrs)`."""
    results = (attrs or {}).get(TRANSFER_ATTR) or {}
    if not results:
        return ""
    lines = [BEGIN, "## Transfer", "",
             "Does the ranking hold at a larger budget or model? Each transfer retrains some of the study's mixtures "
             "(`python -m sparknet.ablate --transfer`) and compares their order with the proxy budget's.", ""]
    for key in sorted(results, key=lambda k: (results[k]["budget_tokens"], k)):
        lines += _one_transfer(results[key])
    return "\n".join([*lines, END])


def with_section(text: str, section: str) -> str:
    """`text` with its marked transfer section replaced by `section` (inserted at the end when it has none)."""
    m = _BEGIN_RE.search(text)
    if m and END in text[m.end():]:
        end = text.index(END, m.end()) + len(END)
        return text[:m.start()] + section + text[end:]
    return text.rstrip("\n") + ("\n\n" if text.strip() else "") + section + "\n"
