"""Is a proxy big enough to answer? The verdict a study (`sparknet.ablate`, `sparknet.sweep`) states before any
conclusion, the learning curve that says how far short it is, and the README section that tells both.

A proxy run whose held-out loss is not below the cross-entropy of a bigram table of its own training tokens
(`sparknet.references`) has learned no more than adjacent-token statistics: the differences between such runs say
how fast each mixture's bigram statistics are picked up early in optimization, not what a model trained further
would learn from the data. So:

- The verdict (`judge`): every finished run must be past its bigram reference by at least `MARGIN` on every slice
  the study's objective reads (val/<source>: that source's held-out slice; val: every source's; downstream: every
  source's held-out slice, as the tasks themselves have no count-table reference; wikitext-valid: WikiText-2
  validation bits per byte against its bigram reference, the margin converted with the run's own tokens per byte).
  A study that fails it says so at the top of its README and in the terminal, and concludes nothing: no effect
  sentences, no fit, only the measured table (`Verdict.blocks`).
- How far short (`crossing`): the base point (an ablation's point 0 with its first seed, a sweep's baseline trial)
  is evaluated along the way (`CURVE_POINTS` evaluations) and the references of a run of each of those budgets are
  counted from the stores (`reference_curve`). Loss and reference are each fitted with a power law in tokens,
  L(D) = E + A D^-alpha (a floor E by least squares over a grid, log-log linear for the rest; with fewer than
  `MIN_FLOOR_POINTS` budgets, a pure power law, log-log linear, E = 0), and the budget N where R(D) - L(D) reaches the
  margin is read off the fits, with a 90% interval from a residual bootstrap of both fits (`BOOTSTRAP` draws). Not
  past within `EXTRAPOLATE` x the proxy budget: said so.
- `--proxy-tokens auto` measures the budget instead (a probe of the base point): `sparknet.proxy_auto`, which reads
  this module's slices and references; how it chose is told in the README section here (`auto_text`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# The margin a proxy must clear its bigram reference by, in nats per token (5% in perplexity). Why this size:
# - It is well above the measurement noise of the comparison. The model and the table score the same held-out tokens
#   (a paired difference), whose standard error at the lab's slice sizes (eval.val_tokens of 64k-1M tokens, per-token
#   loss sd ~2-3 nats, windows correlated) is ~0.005-0.02 nats; so a run past the table by the margin is past it by
#   more than noise, and a run short of it is not hidden by noise.
# - It is at the low end of the effects mixture ablations measure at proxy scale (0.02-0.2 nats on a held-out slice):
#   a proxy that beats a bigram table by less than the differences it is asked to rank has learned little beyond
#   adjacent-token statistics, and its ranking follows how fast each mixture's bigram statistics are picked up (the
#   issue's example: a model trained only on OpenStax "beat" one trained on FineWeb-Edu on FineWeb-Edu's own slice,
#   while both sat ~1 nat above their bigram tables, whose own order was the opposite).
# - Stricter margins only move the budget a little further along a curve that is flattening; 0.05 asks for a model
#   that has clearly started to use more than the previous token, not for a converged one.
# In bits per byte (the wikitext-valid objective) it is MARGIN / ln 2 x the text's tokens per byte, from each run's own
# WikiText-2 references: about 0.017 bits/byte for GPT-2's BPE (~0.24 tokens per byte of WikiText-2), more for a
# small trained BPE, which cuts the text into more tokens.
MARGIN = 0.05
CURVE_POINTS = 8  # evaluations of the base point along the way (the last is its final evaluation)
MIN_FLOOR_POINTS = 4  # budgets a fit with a floor E needs; fewer: a pure power law (log-log linear)
EXTRAPOLATE = 100  # how far past the proxy budget the curve is followed before "not within 100x"
BOOTSTRAP = 300  # residual-bootstrap draws for N's interval
INTERVAL = 0.90  # N's interval: the central 90% of the bootstrap draws


def margin_in(unit: str, margin: float, tokens_per_byte: float | None) -> float:
    """The margin in `unit` ("nats/token" or "bits/byte", the latter with the text's tokens per byte; 0.25 when not
    known, about GPT-2's BPE on English)."""
    if unit == "bits/byte":
        return margin / math.log(2) * (tokens_per_byte or 0.25)
    return margin


def fmt_tokens(n: float) -> str:
    """4100000 -> '4.1M', 65536 -> '66k', 5e9 -> '5B'."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            v = n / div
            return f"{v:.2g}{suffix}" if v < 10 else f"{v:.0f}{suffix}"
    return f"{n:.0f}"


# ---------------------------------------------------------------------------------------------
# What a run says: its distance to the bigram reference on the slices the objective reads


def reads(objective) -> list[str]:
    """The slices the objective's verdict reads: "val/<source>" per held-out slice, or "wikitext-valid"."""
    from sparknet.objective import WIKITEXT_VALID

    if objective.kind == WIKITEXT_VALID:
        return ["wikitext-valid"]
    if objective.kind == "source":
        return [f"val/{objective.source}"]
    return [f"val/{s}" for s in objective.sources]  # val, and downstream (its tasks have no count-table reference)


def reads_text(objective) -> str:
    """The slices read, in words (for the README and the lines printed)."""
    from sparknet.objective import DOWNSTREAM, WIKITEXT_VALID

    if objective.kind == WIKITEXT_VALID:
        return "WikiText-2 validation bits per byte against its bigram reference"
    if objective.kind == "source":
        return f"the held-out slice of {objective.source}"
    what = f"every source's held-out slice ({', '.join(objective.sources)})"
    if objective.kind == DOWNSTREAM:
        return what + ": the downstream tasks have no count-table reference, so the sources' held-out slices stand in"
    return what


def probe_reads(objective) -> list[str]:
    """The held-out slices the probe and the learning curve read (evaluations along the way score only these): the
    objective's own source, else every source."""
    return [objective.source] if objective.kind == "source" else list(objective.sources)


@dataclass
class SlicePast:
    slice: str  # val/<source> or wikitext-valid
    loss: float
    ref: float  # the bigram reference, same unit
    margin: float  # the margin, same unit
    unit: str
    nats: float = 1.0  # nats per token of one unit (bits/byte: ln 2 / the text's tokens per byte)

    @property
    def past(self) -> float:
        """ref - loss: how far the run is past its bigram reference (negative: not yet)."""
        return self.ref - self.loss

    @property
    def short(self) -> float:
        """How far it is from the margin (> 0: short of it)."""
        return self.margin - self.past


def run_pasts(attrs: dict, objective, margin: float) -> list[SlicePast] | None:
    """A finished run's distance to its bigram reference on each slice the objective reads, from the trial's user
    attrs (`val_loss`, `val_ref_bigram`, `wikitext_valid_bpb`, `wikitext_valid_ref_bigram_bpb`, ...); None when the run
    recorded no reference for a slice it reads (computed before references existed, or skipped)."""
    out = []
    for name in reads(objective):
        if name == "wikitext-valid":
            loss, ref = attrs.get("wikitext_valid_bpb"), attrs.get("wikitext_valid_ref_bigram_bpb")
            unit = "bits/byte"
            tpb = attrs.get("wikitext_valid_tokens_per_byte") or 0.25
            m, nats = margin_in(unit, margin, tpb), math.log(2) / tpb
        else:
            source = name.removeprefix("val/")
            loss = (attrs.get("val_loss") or {}).get(source)
            ref = (attrs.get("val_ref_bigram") or {}).get(source)
            unit, m, nats = "nats/token", margin, 1.0
        if loss is None or ref is None:
            return None
        out.append(SlicePast(name, float(loss), float(ref), m, unit, nats))
    return out


# ---------------------------------------------------------------------------------------------
# The learning curve of the base point, and where it crosses


@dataclass
class PowerLaw:
    """y(D) = E + A D^-alpha; alpha = 0: a constant (a curve that does not fall)."""

    E: float
    A: float
    alpha: float
    method: str

    def __call__(self, D) -> np.ndarray:
        D = np.asarray(D, dtype=np.float64)
        return self.E + self.A * D ** (-self.alpha) if self.alpha > 0 else np.full(D.shape, self.E + self.A)


def _loglinear(x: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares z ~ b0 + b1 x row by row (z: [rows, n]); returns (b0, b1)."""
    xm = x.mean()
    zm = z.mean(axis=-1, keepdims=True)
    b1 = ((x - xm) * (z - zm)).sum(axis=-1) / max(float(((x - xm) ** 2).sum()), 1e-300)
    return zm[..., 0] - b1 * xm, b1


def fit_power_law(D, y, *, floor: bool = True, grid: int = 200) -> PowerLaw:
    """Fit y = E + A D^-alpha to points (D, y > 0). With `floor` and at least MIN_FLOOR_POINTS distinct budgets, E is
    chosen from a grid over [0, min y) by the squared error in y, with A and alpha log-log linear for each E; else E =
    0 (a pure power law, log-log linear). A curve that does not fall is a constant (alpha = 0)."""
    D, y = np.asarray(D, dtype=np.float64), np.maximum(np.asarray(y, dtype=np.float64), 1e-9)
    x = np.log(D)
    if floor and len(np.unique(D)) >= MIN_FLOOR_POINTS:
        E = np.linspace(0.0, float(y.min()) * (1 - 1e-3), grid)
        z = np.log(y[None, :] - E[:, None])
        b0, b1 = _loglinear(x, z)
        pred = E[:, None] + np.exp(b0[:, None] + b1[:, None] * x[None, :])
        sse = ((pred - y[None, :]) ** 2).sum(axis=1)
        sse[b1 >= 0] = np.inf
        if np.isfinite(sse).any():
            i = int(np.argmin(sse))
            return PowerLaw(float(E[i]), float(np.exp(b0[i])), float(-b1[i]), "power law with a floor")
        return PowerLaw(float(y.mean()), 0.0, 0.0, "constant (the curve does not fall)")
    method = ("pure power law, log-log linear (fewer than "
              f"{MIN_FLOOR_POINTS} budgets: too few for a floor)" if floor else "pure power law, log-log linear")
    if len(np.unique(D)) < 2:
        return PowerLaw(float(y.mean()), 0.0, 0.0, "constant (one budget)")
    b0, b1 = _loglinear(x, np.log(y)[None, :])
    if b1[0] >= 0:
        return PowerLaw(float(y.mean()), 0.0, 0.0, "constant (the curve does not fall)")
    return PowerLaw(0.0, float(np.exp(b0[0])), float(-b1[0]), method)


@dataclass
class Curve:
    """The base point's held-out losses at its evaluations (and its end), with the bigram reference of a run of each
    of those budgets: `loss[source]`, `ref[source]` aligned with `tokens` (nan where unknown)."""

    tokens: np.ndarray
    loss: dict[str, np.ndarray]
    ref: dict[str, np.ndarray]
    label: str = "the base point"

    def with_mean(self, sources: list[str]) -> Curve:
        """The curve with a "mean" series: the mean over `sources` (for WikiText-2, scored only at the end)."""
        loss = dict(self.loss, mean=np.mean([self.loss[s] for s in sources], axis=0))
        ref = dict(self.ref, mean=np.mean([self.ref[s] for s in sources], axis=0))
        return Curve(self.tokens, loss, ref, self.label)

    def to_dict(self) -> dict:
        return {"tokens": [int(t) for t in self.tokens], "label": self.label,
                "loss": {k: [float(v) for v in a] for k, a in self.loss.items()},
                "ref": {k: [float(v) for v in a] for k, a in self.ref.items()}}


def eval_tokens(index: int, every: int, batch: int) -> int:
    """The tokens trained at evaluation `index` (`study_worker.eval_index`'s inverse): the first whole optimizer step
    at or past (index + 1) x every."""
    return -(-(index + 1) * every // batch) * batch


def base_curve(attrs: dict, sources: list[str], label: str = "the base point") -> Curve | None:
    """The learning curve a trial recorded (its user attrs: `val_loss_by_eval`, `ref_bigram_by_eval`,
    `eval_every_tokens`, `batch_tokens`, and its end: `val_loss`, `val_ref_bigram`, `train_tokens`); None with fewer
    than two points."""
    every, batch = attrs.get("eval_every_tokens"), attrs.get("batch_tokens")
    by_eval = attrs.get("val_loss_by_eval") or {}
    refs = attrs.get("ref_bigram_by_eval") or {}
    final_tokens = attrs.get("train_tokens")
    points: list[tuple[int, dict, dict]] = []
    if every and batch:
        for key in sorted(by_eval, key=int):
            t = eval_tokens(int(key), int(every), int(batch))
            if final_tokens is None or t < final_tokens:
                points.append((t, by_eval[key], refs.get(key) or {}))
    if final_tokens and attrs.get("val_loss"):
        points.append((int(final_tokens), attrs["val_loss"], attrs.get("val_ref_bigram") or {}))
    points = [p for p in points if all(s in p[1] for s in sources)]
    if len(points) < 2:
        return None
    tokens = np.array([p[0] for p in points], dtype=np.float64)
    loss = {s: np.array([float(p[1][s]) for p in points]) for s in sources}
    ref = {s: np.array([float(p[2].get(s, math.nan)) for p in points]) for s in sources}
    return Curve(tokens, loss, ref, label)


@dataclass
class Estimate:
    """Where the base point's curve crosses its reference minus the margin: `tokens` (None: not within EXTRAPOLATE x
    the proxy budget), its interval (`high` inf: the upper end is not within it either)."""

    tokens: float | None
    low: float
    high: float
    proxy_tokens: int
    method: str
    series: str  # which series needs the most tokens (a source, or "mean")
    fits: dict[str, dict] = field(default_factory=dict)  # series -> {"loss": PowerLaw, "ref": PowerLaw} as dicts

    def text(self) -> str:
        if self.tokens is None:
            return f"not within {EXTRAPOLATE}x this budget ({fmt_tokens(EXTRAPOLATE * self.proxy_tokens)} tokens)"
        high = fmt_tokens(self.high) if math.isfinite(self.high) else f"more than {fmt_tokens(EXTRAPOLATE * self.proxy_tokens)}"
        return f"about {fmt_tokens(self.tokens)} tokens ({fmt_tokens(self.low)}..{high})"


def _fit_ref(D: np.ndarray, r: np.ndarray) -> PowerLaw:
    """The reference's own curve; where only the final budget's is known, held constant there."""
    known = np.isfinite(r)
    if known.sum() < 2:
        return PowerLaw(float(r[known][-1]) if known.any() else math.nan, 0.0, 0.0,
                        "held at the proxy budget's (no reference measured along the way)")
    return fit_power_law(D[known], r[known])


def _inflated(res: np.ndarray, fit: PowerLaw) -> np.ndarray:
    """Residuals scaled by sqrt(n / (n - p)) (p: the fit's parameters): a fit's residuals are smaller than its
    errors, and with eight points and three parameters a bootstrap of the raw ones makes the interval too narrow."""
    p = 3 if fit.E > 0 else 2 if fit.alpha > 0 else 1
    n = len(res)
    return res * math.sqrt(n / (n - p)) if n > p else res


def _crossing_of(fits: dict[str, tuple[PowerLaw, PowerLaw]], gains: dict[str, float], grid: np.ndarray) -> float:
    """The first budget on `grid` (which starts at the curve's last budget) where every series' fitted ref - loss has
    grown by its gain over the fit's own value there (inf: none on the grid). Gains, not levels: the runs were measured
    short by so much at the curve's end, and the fit's value there may differ a little from the measurement."""
    worst = grid[0]
    for name, (lf, rf) in fits.items():
        gap = rf(grid) - lf(grid)
        ok = np.flatnonzero(gap - gap[0] >= gains[name])
        if not len(ok):
            return math.inf
        worst = max(worst, grid[ok[0]])
    return float(worst)


def crossing(curve: Curve, targets: dict[str, float], proxy_tokens: int, *, boot: int = BOOTSTRAP,
             seed: int = 0) -> Estimate:
    """Where `curve`'s series (keys of `targets`) are all past their reference by their target (nats/token), from
    power-law fits of loss and reference in tokens, followed from the curve's last budget up to EXTRAPOLATE x
    `proxy_tokens`; the interval is the central INTERVAL of a residual bootstrap of every fit."""
    D = curve.tokens
    # From the curve's end on: the runs were measured short there, and before it a bigram table of a few tokens is so
    # poor that reference minus loss can be large (the fitted gap is not monotone at tiny budgets).
    lo_d = float(D.max())
    grid = np.geomspace(lo_d, max(EXTRAPOLATE * proxy_tokens, lo_d * 1.01), 4000)
    fits = {}
    for name in targets:
        fits[name] = (fit_power_law(D, curve.loss[name]), _fit_ref(D, curve.ref[name]))
    end = int(np.argmax(D))
    # What each series must gain over what was measured at the curve's end (<= 0: it is there already).
    gains = {k: t - float(curve.ref[k][end] - curve.loss[k][end]) for k, t in targets.items()}
    n = _crossing_of(fits, gains, grid)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(boot):  # each draw measures its own curve, end included, and estimates as above
        bf, bgains = {}, {}
        for name, (lf, rf) in fits.items():
            y = curve.loss[name]
            res = _inflated(y - lf(D), lf)
            yb = lf(D) + res[rng.integers(0, len(D), len(D))]
            r = curve.ref[name]
            rb = r.copy()
            known = np.isfinite(r)
            if known.sum() >= 2:
                rres = _inflated(r[known] - rf(D[known]), rf)
                rb[known] = rf(D[known]) + rres[rng.integers(0, known.sum(), known.sum())]
                rfb = _fit_ref(D, rb)
            else:
                rfb = rf
            bf[name] = (fit_power_law(D, yb), rfb)
            bgains[name] = targets[name] - float(rb[end] - yb[end])
        draws.append(_crossing_of(bf, bgains, grid))
    s = np.sort(np.array(draws))
    tail = (1 - INTERVAL) / 2
    low = float(s[int(math.floor(tail * (len(s) - 1)))]) if len(s) else math.nan
    high = float(s[int(math.ceil((1 - tail) * (len(s) - 1)))]) if len(s) else math.nan
    series = max(fits, key=lambda k: _crossing_of({k: fits[k]}, gains, grid))
    lf, rf = fits[series]
    method = f"loss: {lf.method}; reference: {rf.method}"
    return Estimate(None if not math.isfinite(n) else n, low, high, proxy_tokens, method, series,
                    {k: {"loss": asdict(v[0]), "ref": asdict(v[1])} for k, v in fits.items()})


# ---------------------------------------------------------------------------------------------
# The verdict


@dataclass
class RunCheck:
    label: str
    base: bool
    pasts: list[SlicePast] | None


@dataclass
class Verdict:
    """What the study's finished runs say about its proxies (see the module docstring). `enforced`: False under
    --no-adequacy (the verdict is stated, the conclusions are drawn anyway)."""

    objective: Any
    margin: float
    proxy_tokens: int
    runs: list[RunCheck]
    enforced: bool = True
    noun: str = "points"
    curve: Curve | None = None
    estimate: Estimate | None = None
    curve_note: str = ""
    unjudged: list[RunCheck] = field(default_factory=list)  # runs listed, not judged (a sweep's other trials)
    unjudged_text: str = ""

    @property
    def checked(self) -> list[RunCheck]:
        return [r for r in self.runs if r.pasts is not None]

    @property
    def short(self) -> list[tuple[RunCheck, SlicePast]]:
        """(run, slice) pairs short of the margin, the furthest first."""
        pairs = [(r, p) for r in self.checked for p in r.pasts if p.short > 0]
        return sorted(pairs, key=lambda rp: -rp[1].short)

    @property
    def adequate(self) -> bool | None:
        """True / False; None when no run recorded the references (not judged)."""
        if not self.checked:
            return None
        return not self.short

    @property
    def blocks(self) -> bool:
        """Whether the study must conclude nothing (no effect sentences, no fit)."""
        return self.enforced and self.adequate is False

    @property
    def base(self) -> RunCheck | None:
        return next((r for r in self.checked if r.base), None)

    def _unit_margin(self, p: SlicePast) -> str:
        return f"{p.margin:.3f} {p.unit}" if p.unit == "bits/byte" else f"{p.margin:g} {p.unit}"

    def gap_text(self) -> str:
        short = self.short
        base = self.base
        n, k = len(self.checked), len({id(r) for r, _ in short})
        if base is not None:
            worst = min(base.pasts, key=lambda p: p.past - p.margin)
            if worst.past < 0:
                unit = "nats" if worst.unit == "nats/token" else worst.unit
                text = f"by {-worst.past:.3f} {unit} at the base point, on {worst.slice}"
            elif worst.short > 0:
                text = (f"by the margin of {self._unit_margin(worst)}: the base point is past it by only "
                        f"{worst.past:.3f} on {worst.slice}")
            else:
                r, p = short[0]
                text = (f"by the margin of {self._unit_margin(p)} at every point: the base point is past it by "
                        f"{worst.past:.3f} on {worst.slice}, but {r.label} only by {p.past:+.3f} on {p.slice}")
        else:
            r, p = short[0]
            text = f"the furthest, {r.label}, is {p.past:+.3f} {p.unit} past it on {p.slice}"
        return text + f"; {k} of {n} runs short of the {self._unit_margin(short[0][1])} margin"

    def advice(self) -> str:
        if self.estimate is not None:
            if self.estimate.tokens is None:
                return (f"the base point's learning curve, at the rate it falls now, does not reach it within "
                        f"{EXTRAPOLATE}x this budget ({fmt_tokens(EXTRAPOLATE * self.proxy_tokens)} tokens): use a "
                        f"larger model, or raise --proxy-tokens far more (--proxy-tokens auto measures how far)")
            if self.estimate.tokens <= self.proxy_tokens:
                return (f"raise --proxy-tokens above {self.proxy_tokens:,} (the fit of the base point's curve puts the "
                        f"crossing at {self.estimate.text()}, within this budget, which its last points contradict) "
                        f"or use a larger model")
            return f"raise --proxy-tokens to {self.estimate.text()} or use a larger model"
        return ("raise --proxy-tokens (no learning curve of the base point was recorded to say how far: "
                "--proxy-tokens auto measures it) or use a larger model")

    def headline(self) -> str:
        """One sentence: the verdict."""
        if self.adequate is None:
            return ("Adequacy not judged: no finished run recorded its count-table references (runs from before they "
                    "existed); rerun them, or read the table knowing the proxies were not checked against a bigram "
                    "table.")
        if self.adequate:
            worst = min(((r, p) for r in self.checked for p in r.pasts), key=lambda rp: rp[1].past - rp[1].margin)
            return (f"Every run{' judged' if self.unjudged else ''} is past its bigram reference by at least the margin ({self._unit_margin(worst[1])}) on "
                    f"{reads_text(self.objective)}: the smallest, {worst[0].label}, by {worst[1].past:.3f} on "
                    f"{worst[1].slice}" + (f" ({len(self.runs) - len(self.checked)} runs without references not "
                                           f"checked)" if len(self.checked) < len(self.runs) else "") + ".")
        text = (f"The proxies have not learned past a bigram table ({self.gap_text()}); differences between "
                f"{self.noun} reflect optimization, not data; {self.advice()}.")
        if not self.enforced:
            text = ("Adequacy not enforced (--no-adequacy): " + text[0].lower() + text[1:]
                    + " The sentences and fit below describe early optimization, not data.")
        return text

    def details(self) -> list[str]:
        """The README's lines under the verdict: what was read, the margin, the base point's figures, the curve."""
        lines = [f"Read: {reads_text(self.objective)}, over "
                 + (f"the {len(self.checked)} judged" if self.unjudged else f"all {len(self.checked)} finished")
                 + " runs with references "
                 f"(each against the bigram table of its own training tokens, `sparknet.references`); margin "
                 f"{self.margin:g} nats/token" + (" (in bits per byte: that / ln 2 x each run's WikiText-2 tokens per "
                                                  "byte)" if "wikitext-valid" in reads(self.objective) else "")
                 + ". `past bigram` in the table: reference minus loss (negative: not yet)."]
        if self.base is not None:
            lines.append("The base point, " + self.base.label + ": " + "; ".join(
                f"{p.slice} {p.loss:.4f} against bigram {p.ref:.4f} {p.unit} (past by {p.past:+.3f})"
                for p in self.base.pasts) + ".")
        if self.estimate is not None and self.adequate is False:
            e = self.estimate
            lines.append(f"How far: the base point's held-out {'loss' if e.series != 'mean' else 'mean loss'} at "
                         f"{len(self.curve.tokens)} budgets and the bigram reference of a run of each, both fitted in "
                         f"tokens ({e.method}); where the reference minus the loss reaches what every run needs"
                         f" (the margin, plus how much further the worst run is from it than the base point): "
                         f"{e.text()}; interval: the central {INTERVAL:.0%} of {BOOTSTRAP} residual-bootstrap refits"
                         + (f", on the {e.series} series" if e.series != "mean" else "") + "." + self.curve_note)
        elif self.curve is None and self.adequate is False:
            lines.append("No learning curve of the base point was recorded (its run evaluated only at its end).")
        short = [(r, p) for r in self.unjudged if r.pasts for p in r.pasts if p.short > 0]
        if self.unjudged:
            lines.append(f"Not judged: {self.unjudged_text}. " + (
                "Of them, short of the margin: " + "; ".join(f"{r.label} {p.past:+.3f} on {p.slice}" for r, p in short)
                + "." if short else "All of them are past it by the margin too."))
        return lines

    def to_dict(self) -> dict:
        return {"adequate": self.adequate, "enforced": self.enforced, "margin": self.margin,
                "reads": reads(self.objective), "headline": self.headline(),
                "short": [{"run": r.label, "slice": p.slice, "past": p.past, "margin": p.margin} for r, p in self.short],
                "estimate": None if self.estimate is None else {"tokens": self.estimate.tokens,
                                                                "low": self.estimate.low, "high": self.estimate.high,
                                                                "method": self.estimate.method}}


def judge(runs: list[RunCheck], objective, margin: float, proxy_tokens: int, *, curve: Curve | None = None,
          enforced: bool = True, noun: str = "points") -> Verdict:
    """The verdict over `runs`, and when it fails, N from the base point's `curve`: every series it reads must gain
    the margin plus how much further the worst run is from it than the base point (the runs' gaps assumed to move
    together; WikiText-2, scored only at the end, moves as the held-out slices' mean gap, nats for nats)."""
    v = Verdict(objective, margin, proxy_tokens, runs, enforced, noun, curve)
    if v.adequate is not False or curve is None or v.base is None:
        return v
    base = {p.slice: p for p in v.base.pasts}
    sources = probe_reads(objective)
    targets: dict[str, float] = {}
    if "wikitext-valid" in base:
        c = curve.with_mean(list(objective.sources))
        need = 0.0
        for r in v.checked:
            p = next(q for q in r.pasts if q.slice == "wikitext-valid")
            need = max(need, p.short * p.nats)  # bits/byte -> nats/token
        targets["mean"] = float(c.ref["mean"][-1] - c.loss["mean"][-1]) + need
        v.curve = c
        v.curve_note = (" WikiText-2 is scored only at the end, so its gap is assumed to move as the mean gap of the "
                        "held-out slices does (the mean series).")
    else:
        for s in sources:
            worst = max(p.short for r in v.checked for p in r.pasts if p.slice == f"val/{s}")
            final_past = float(curve.ref[s][-1] - curve.loss[s][-1])
            targets[s] = final_past + max(worst, base[f"val/{s}"].short)
    if any(not math.isfinite(t) for t in targets.values()):
        return v
    v.estimate = crossing(v.curve, targets, proxy_tokens)
    return v


def probe_curve(auto: dict[str, Any] | None) -> Curve | None:
    """The learning curve the --proxy-tokens auto probe recorded (`auto["curve"]`); None with fewer than two points."""
    points = (auto or {}).get("curve") or []
    if len(points) < 2:
        return None
    names = sorted(set.intersection(*(set(p["loss"]) & set(p["ref"]) for p in points)))
    return Curve(np.array([p["tokens"] for p in points], dtype=np.float64),
                 {s: np.array([p["loss"][s] for p in points]) for s in names},
                 {s: np.array([p["ref"][s] for p in points]) for s in names}, "the probe")


def plot_curve(v: Verdict, path: Path, title: str, auto: dict[str, Any] | None = None) -> Path | None:
    """The base point's learning curve, per series the verdict reads: loss and reference at each budget, their fits
    (extrapolated), the reference minus the margin, and N with its interval. Without one (the base point evaluated
    only at its end), the curve of the --proxy-tokens auto probe (`auto`), with where it crossed."""
    crossed = None
    if v.curve is None:
        probe = probe_curve(auto)
        if probe is None:
            return None
        from dataclasses import replace

        v = replace(v, curve=probe, estimate=None)
        crossed = auto.get("crossed_at") if auto.get("crossed") else None
        title = f"{title} (auto probe, constant LR)"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from sparknet.study_files import save_figure

    c = v.curve
    names = ["mean"] if "mean" in c.loss and "wikitext-valid" in reads(v.objective) else probe_reads(v.objective)
    fig, axes = plt.subplots(1, len(names), figsize=(4.4 * len(names), 3.6), dpi=110, squeeze=False)
    e = v.estimate
    right = max(float(c.tokens.max()) * 1.5, (e.high if e and math.isfinite(e.high) else 0) * 1.3,
                (e.tokens or 0) * 1.3 if e else 0,
                EXTRAPOLATE * v.proxy_tokens if e is not None and e.tokens is None else 0)
    grid = np.geomspace(float(c.tokens.min()), right, 200)
    for ax, name in zip(axes[0], names):
        ax.plot(c.tokens, c.loss[name], "o", color="tab:blue", label="held-out loss")
        ax.plot(c.tokens, c.ref[name], "s", color="tab:orange", label="bigram reference (of a run of that budget)")
        if e is not None and name in e.fits:
            lf, rf = PowerLaw(**e.fits[name]["loss"]), PowerLaw(**e.fits[name]["ref"])
            ax.plot(grid, lf(grid), "-", color="tab:blue", alpha=0.6, label="fit")
            ax.plot(grid, rf(grid), "-", color="tab:orange", alpha=0.6)
            ax.plot(grid, rf(grid) - v.margin, "--", color="tab:red", alpha=0.8, label=f"reference - {v.margin:g}")
            if e.tokens is not None:
                ax.axvline(e.tokens, color="k", lw=0.8)
                if math.isfinite(e.high):
                    ax.axvspan(e.low, e.high, color="k", alpha=0.08, label=f"N {e.text()}")
        else:
            known = np.isfinite(c.ref[name])
            ax.plot(c.tokens[known], c.ref[name][known] - v.margin, "--", color="tab:red",
                    label=f"reference - {v.margin:g}")
        if crossed:
            ax.axvline(crossed, color="k", lw=0.8, label=f"crossed at {fmt_tokens(crossed)}")
        ax.axvline(v.proxy_tokens, color="tab:green", lw=0.8, ls=":", label="proxy budget")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: fmt_tokens(x)))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("training tokens")
        ax.set_ylabel(f"{'mean held-out' if name == 'mean' else 'val/' + name} (nats/token)")
        ax.set_title(f"{title}: {name}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def study_verdict(kind, trials: list, base_of, label_of, *, noun: str, judged=None, judged_text: str = "") -> Verdict:
    """The verdict of a study of kind `kind` (its objective, margin, budget, --no-adequacy) over its completed
    `trials`; `base_of(trial)`: whether it is the base point; `label_of(trial)`: how the text names it; `judged(trial)`:
    whether the verdict reads it (default: every completed trial; the others are listed, `judged_text` says why)."""
    done = [t for t in trials if t.state.name == "COMPLETE"]
    checks = [(t, RunCheck(label_of(t), bool(base_of(t)),
                           run_pasts(t.user_attrs, kind.objective, kind.adequacy_margin))) for t in done]
    runs = [c for t, c in checks if judged is None or judged(t)]
    base = next((t for t in done if base_of(t)), None)
    curve = base_curve(base.user_attrs, probe_reads(kind.objective), label_of(base)) if base is not None else None
    v = judge(runs, kind.objective, kind.adequacy_margin, kind.proxy_tokens, curve=curve,
              enforced=kind.adequacy_enforced, noun=noun)
    v.unjudged = [c for t, c in checks if judged is not None and not judged(t)]
    v.unjudged_text = judged_text
    return v


# ---------------------------------------------------------------------------------------------
# References along the way


def _budget_plan(cfg, tokens: int):
    from dataclasses import replace

    from sparknet.mixture import build_plan

    return build_plan(replace(cfg.mixture, total_tokens=int(tokens)), cfg.train.seq_len)


def references_at(cfg, prepared, tokens: int, sources: list[str] | None = None) -> dict[str, float]:
    """{source: bigram reference (nats/token)} of a run of `cfg` at a budget of `tokens` (its plan's tokens, counted
    from the prepared stores, as `sparknet.references` counts a run's own), on each held-out slice as runs score it."""
    from sparknet.references import held_out_references, plan_counts

    plan = _budget_plan(cfg, tokens)
    counts = plan_counts(plan, prepared.stores, prepared.tokenizer.vocab_size)
    names = sources or list(plan.source_names)
    held = held_out_references(counts, prepared.stores, names, cfg.train.seq_len, cfg.eval.val_tokens)
    return {k: v["bigram"] for k, v in held.items()}


def reference_curve(cfg, budgets: dict[str, int]) -> dict[str, dict[str, float]]:
    """{eval index: {source: bigram reference}} for each evaluation's budget (`budgets`: index -> tokens), from the
    lab's stores (prepared already: the run trained on them)."""
    from sparknet.locks import prepare_lock
    from sparknet.prepare import prepare

    with prepare_lock(cfg.lab_path):  # complete already: read, not written, but never beside a worker extending them
        prepared = prepare(cfg, progress=False, write_report=False)
    return {k: references_at(cfg, prepared, t) for k, t in budgets.items()}


# ---------------------------------------------------------------------------------------------
# The README section (with how --proxy-tokens auto, `sparknet.proxy_auto`, chose the budget)


def auto_text(auto: dict[str, Any] | None) -> str:
    """How --proxy-tokens auto chose the study's budget, in a sentence ("" when it did not)."""
    if not auto or "seconds" not in auto:
        return ""
    reads_ = ", ".join(f"val/{s}" for s in auto.get("reads", []))
    if auto.get("crossed"):
        how = (f"got past its bigram reference by {auto['margin']:g} nats/token on {reads_} at about "
               f"{auto.get('crossed_at', auto['chosen']):,} tokens (it stopped at its evaluation at "
               f"{auto['stopped_at']:,}); a run of {auto['chosen']:,} tokens sums as much learning rate on its own "
               f"schedule (`sparknet.proxy_auto.area_budget`)")
    elif auto.get("time_cap_s") and auto["stopped_at"] < auto["cap"]:
        how = (f"did not get past its bigram reference by {auto['margin']:g} nats/token on {reads_} before the time "
               f"cap (--auto-time, {auto['time_cap_s']:.0f} s) stopped it at {auto['stopped_at']:,} tokens, so that is "
               f"the budget")
    else:
        how = (f"did not get past its bigram reference by {auto['margin']:g} nats/token on {reads_} before it stopped "
               f"at {auto['stopped_at']:,} tokens (the cap), so the cap is the budget")
    return (f"The budget was chosen by `--proxy-tokens auto` (a probe of {auto['seconds']:.0f} s): the base point, "
            f"trained once at a constant learning rate up to {auto['cap']:,} tokens and evaluated every "
            f"{auto['every']:,}, {how}; every run trains {auto['chosen']:,} tokens (whole optimizer steps).")


def adequacy_section(v: Verdict, curve_png: Path | None, auto: dict[str, Any] | None = None) -> str:
    """The README's section on the verdict: the sentence, what was read, the base point's figures, how far (N), how
    auto chose the budget, and the learning curve."""
    lines = ["## Adequacy: past a bigram table?", "", v.headline(), "", *[f"- {d}" for d in v.details()]]
    if auto_text(auto):
        lines += ["", auto_text(auto)]
    if curve_png is not None:
        whose = "the base point" if v.curve is not None else "the --proxy-tokens auto probe"
        lines += ["", f"![learning curve of {whose}]({curve_png.name})"]
    return "\n".join(lines) + "\n"
