"""The statistics behind an ablation's claims: a difference between two design points, measured over their seeds.

A claim in an ablation's README is a difference of means between two points (two mixtures), each mean over the
seeds that finished there. Its uncertainty comes from those seeds only:

- `welch(a, b)`: the difference mean(a) - mean(b) with Welch's standard error sqrt(s_a^2/n_a + s_b^2/n_b) (each
  side's sample standard deviation, ddof 1; the two sides may have different spreads and seed counts), the
  Welch-Satterthwaite degrees of freedom, a 95% confidence interval from Student's t at those degrees of freedom, and
  the two-sided p-value of "no difference". It equals `scipy.stats.ttest_ind(a, b, equal_var=False)`.
- `holm(p)`: Holm's step-down correction over the family of comparisons a README makes, as adjusted p-values
  (a comparison is claimed when its adjusted p is below `ALPHA`): the chance that any claim of the family is a
  false positive stays under ALPHA whatever the comparisons' dependence. The caller says which family it corrects
  over (`sparknet.ablate_report.findings` states it in the README).

A side with fewer than two values has no spread: the difference is still given, without standard error, interval or
p-value (`Difference.measured` is False), and `noise_note` says "one seed: no spread measured". No test is made with
it, and it takes no part in a correction (`holm` skips NaN). The same holds when every seed on both sides gave the
same value (a spread of exactly zero measures no noise).

Pure functions over arrays; the numbers carry no unit: the caller knows it (nats/token, bits/byte) and writes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05  # a claim: Holm-adjusted p below this
LEVEL = 0.95  # confidence intervals (not adjusted for the family: the p-values are)


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) over the finite values of each side, with its Welch uncertainty (NaN where unmeasured)."""

    estimate: float
    se: float  # Welch's standard error; NaN when a side has fewer than two values
    df: float  # Welch-Satterthwaite degrees of freedom
    low: float  # the confidence interval at `level`
    high: float
    p: float  # two-sided p-value of "no difference" (Welch's t), uncorrected
    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    level: float = LEVEL

    @property
    def measured(self) -> bool:
        """Both sides have a spread (two or more values each), so the difference has an uncertainty and a p-value."""
        return not math.isnan(self.p)


def summarize(values) -> tuple[float, float, int]:
    """(mean, sample standard deviation with ddof 1, count) of the finite values; sd NaN under two values."""
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    if not len(v):
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def welch_from_stats(mean_a: float, sd_a: float, n_a: int, mean_b: float, sd_b: float, n_b: int,
                     level: float = LEVEL) -> Difference:
    """`welch` from each side's mean, sample standard deviation (ddof 1) and count.

    Both spreads zero (every seed of both sides gave the same value): the standard error is 0 but no noise was
    measured, so there is no interval and no p-value (`measured` False), as with one seed."""
    from scipy import special  # Student's t as ufuncs: the same numbers as scipy.stats.t, without its overhead

    n_a, n_b = int(n_a), int(n_b)
    est = float(mean_a) - float(mean_b) if n_a and n_b else math.nan
    nan = math.nan
    if n_a < 2 or n_b < 2 or math.isnan(sd_a) or math.isnan(sd_b):
        return Difference(est, nan, nan, nan, nan, nan, n_a, n_b, float(mean_a), float(mean_b), level)
    va, vb = sd_a ** 2 / n_a, sd_b ** 2 / n_b
    se = math.sqrt(va + vb)
    if se == 0:  # every seed gave the same value: nothing measures the noise, so nothing is tested
        return Difference(est, 0.0, nan, nan, nan, nan, n_a, n_b, float(mean_a), float(mean_b), level)
    df = (va + vb) ** 2 / (va ** 2 / (n_a - 1) + vb ** 2 / (n_b - 1))
    half = float(special.stdtrit(df, 0.5 + level / 2)) * se
    p = float(2 * special.stdtr(df, -abs(est) / se))
    return Difference(est, se, df, est - half, est + half, min(p, 1.0), n_a, n_b, float(mean_a), float(mean_b),
                      level)


def welch(a, b, level: float = LEVEL) -> Difference:
    """mean(a) - mean(b) with Welch's standard error, degrees of freedom, `level` confidence interval and two-sided
    p-value; `a` and `b` are the seeds' values of the two points (NaN values, a failed seed's, are left out)."""
    return welch_from_stats(*summarize(a), *summarize(b), level=level)


def holm(pvalues) -> np.ndarray:
    """Holm's adjusted p-values, in the input's order: sorted ascending, the i-th smallest (from 0) becomes
    max over j <= i of min(1, (m - j) * p_(j)), m the number of finite p-values. NaN (a comparison without a spread)
    stays NaN and does not count in m."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, math.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if not m:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for j, idx in enumerate(order):
        running = max(running, min(1.0, (m - j) * p[idx]))
        out[idx] = running
    return out


def significant(adjusted_p: float, alpha: float = ALPHA) -> bool:
    """A claim: the family-corrected p-value is below alpha (False when there is no p-value)."""
    return not math.isnan(adjusted_p) and adjusted_p < alpha


def fmt_p(p: float) -> str:
    """A p-value with its relation, as a README writes it after "p": "= 0.012" (two significant figures),
    "< 0.0001" below that, "= 1" at one, "n/a" without one."""
    if math.isnan(p):
        return "n/a"
    if p < 1e-4:
        return "< 0.0001"
    return "= 1" if p >= 1 else f"= {p:.2g}"


def noise_note(d: Difference, a: str = "", b: str = "") -> str:
    """Why a difference has no uncertainty, naming the side(s) (`a`, `b`) with fewer than two finished seeds."""
    short = [name for name, n in ((a, d.n_a), (b, d.n_b)) if n < 2]
    if not short:
        return "the seeds gave identical values: no spread measured" if d.se == 0 else "no spread measured"
    named = [s for s in short if s]
    return "one seed: no spread measured" + (f" ({' and '.join(named)})" if named else "")
