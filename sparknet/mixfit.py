"""Mixture designs (which weight vectors to train) and a fitted model of the objective against the weights.

Designs over a mixture's sources, each a list of labelled weight vectors on the simplex:
- `leave-one-out`: the base mixture, then each source removed and the others renormalized;
- `single-source`: each source alone;
- `grid:STEP`: every vector of the simplex lattice with that step (0.25 over 3 sources: 15 points);
- `random:N`: N seeded Dirichlet(1) draws, uniform over the simplex, as RegMix samples its small runs;
- a YAML file: `points: [{name: ..., weights: {source: w, ...}}, ...]` (weights summing to 1).

The fitted model. Two well-kept regressors from scikit-learn, chosen per study by cross-validated rank
correlation on held-out design points (what matters is ranking mixtures, not the absolute loss):
- the Scheffé quadratic mixture model (sum b_i w_i + sum b_ij w_i w_j, no intercept, ridge-regularized): the
  classical model of mixture experiments, smooth, and usable from about as many points as it has terms;
- gradient-boosted trees (HistGradientBoostingRegressor, the algorithm of LightGBM that RegMix fits on many
  small runs), which catch interactions the quadratic cannot, but need dozens of points.
The predicted best mixture is searched inside the box of weights the design covered (no extrapolation), and the
verdict says plainly when the fit is too weak to trust: then the best measured mixture is the answer.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from sparknet.errors import SparknetError

# A fit is trusted when held-out rank correlation reaches this, over at least MIN_POINTS points.
TRUSTED_SPEARMAN = 0.7
MIN_POINTS = 5


@dataclass(frozen=True)
class Point:
    name: str
    weights: tuple[float, ...]  # per source, in the mixture's source order; sums to 1


def _normalized(w: np.ndarray) -> tuple[float, ...]:
    return tuple(float(x) for x in w / w.sum())


def _label(names: tuple[str, ...], w: tuple[float, ...]) -> str:
    return " ".join(f"{n}{round(x * 100)}" for n, x in zip(names, w) if x > 0)


MAX_POINTS = 10_000  # a design's points are training runs: more is a typo, not a study


def design_points(design: str, names: tuple[str, ...], base: tuple[float, ...], *, seed: int = 0,
                  where: str = "--design") -> list[Point]:
    """The points of `design` over sources `names` with base weights `base`; SparknetError for a bad design."""
    n = len(names)
    b = np.asarray(base, dtype=np.float64)
    if n < 2:
        raise SparknetError(f"{where}: the mixture has one source; a mixture ablation needs at least two "
                            f"(fix: add sources to the mixture)")
    if design == "leave-one-out":
        pts = [Point("base", _normalized(b))]
        for i, name in enumerate(names):
            if b[i] <= 0:
                continue  # removing a source the base does not use changes nothing
            w = b.copy()
            w[i] = 0.0
            if w.sum() <= 0:
                raise SparknetError(f"{where}: leave-one-out: removing {name} leaves no source with weight "
                                    f"(fix: give at least two sources a weight)")
            pts.append(Point(f"without {name}", _normalized(w)))
        return pts
    if design == "single-source":
        return [Point(f"only {name}", tuple(float(i == j) for j in range(n))) for i, name in enumerate(names)]
    if design.startswith("grid:"):
        text = design.split(":", 1)[1]
        try:
            step = Fraction(text).limit_denominator(10_000)
        except (ValueError, ZeroDivisionError):
            raise SparknetError(f"{where}: {design!r}: the step is not a number (fix: e.g. grid:0.25)") from None
        if not 0 < step <= 1:
            raise SparknetError(f"{where}: {design!r}: the step must be in (0, 1], got {text} (fix: e.g. grid:0.25)")
        k = 1 / step
        if k.denominator != 1 or abs(float(step) - float(Fraction(text))) > 1e-9:
            raise SparknetError(f"{where}: {design!r}: the step {text} does not divide 1 (fix: a step such as 0.5, "
                                f"0.25, 0.2 or 0.1)")
        k = int(k)
        count = math.comb(k + n - 1, n - 1)
        if count > MAX_POINTS:
            raise SparknetError(f"{where}: {design!r}: {count:,} points over {n} sources (fix: a coarser step)")
        pts = [Point(_label(names, w), w) for w in (tuple(c / k for c in combo) for combo in _compositions(k, n))]
        return sorted(pts, key=lambda p: tuple(-x for x in p.weights))
    if design.startswith("random:"):
        text = design.split(":", 1)[1]
        if not text.isdigit() or int(text) < 1:
            raise SparknetError(f"{where}: {design!r}: expected random:N with N >= 1 (fix: e.g. random:32)")
        if int(text) > MAX_POINTS:
            raise SparknetError(f"{where}: {design!r}: more than {MAX_POINTS:,} points, each a training run (fix: "
                                f"random:32 to random:256 is a night's study)")
        rng = np.random.default_rng([seed, 0x6D6978])  # "mix": the design's own stream
        draws = rng.dirichlet(np.ones(n), size=int(text))
        return [Point(f"random {i}", _normalized(w)) for i, w in enumerate(draws)]
    path = Path(design)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return _points_from_file(path, names)
    raise SparknetError(f"{where}: unknown design {design!r} (fix: leave-one-out, single-source, grid:STEP, "
                        f"random:N, or a YAML file of weight vectors)")


def _compositions(total: int, parts: int):
    """Every way to write `total` as `parts` non-negative integers, in lexicographic order: only the grid's points
    are visited (a walk over every (total + 1) ** parts tuple takes minutes for 10 sources)."""
    if parts == 1:
        yield (total,)
        return
    for first in range(total + 1):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)


def _points_from_file(path: Path, names: tuple[str, ...]) -> list[Point]:
    from sparknet.config import read_yaml

    if not path.is_file():
        raise SparknetError(f"{path}: design file not found (fix: pass an existing YAML file)")
    raw = read_yaml(path)
    items = raw.get("points") if isinstance(raw, dict) else raw
    if not isinstance(items, list) or not items:
        raise SparknetError(f"{path}: points: expected a non-empty list of {{name, weights}} (fix: see "
                            f"experiments/README.md)")
    pts = []
    for i, item in enumerate(items):
        at = f"{path}: points[{i}]"
        weights = item.get("weights") if isinstance(item, dict) and "weights" in item else item
        if isinstance(item, dict) and "name" in item and "weights" not in item:
            weights = None  # {name: ...} alone: the short form {source: weight} has no `name`
        if not isinstance(weights, dict) or not weights:
            raise SparknetError(f"{at}: has no weights (fix: give it weights: {{source: weight, ...}} over "
                                f"{', '.join(names)})")
        for key, v in weights.items():
            if key not in names:
                raise SparknetError(f"{at}.weights.{key}: no source named {key!r} (fix: use one of "
                                    f"{', '.join(names)})")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise SparknetError(f"{at}.weights.{key}: must be a number >= 0, got {v!r} (fix: e.g. 0.25)")
        w = np.array([float(weights.get(n, 0.0)) for n in names])
        if abs(w.sum() - 1.0) > 1e-6:
            raise SparknetError(f"{at}.weights: sum to {w.sum():g}, not 1 (fix: make them sum to 1; sources not "
                                f"listed count as 0)")
        name = str(item.get("name")) if isinstance(item, dict) and item.get("name") else _label(names, tuple(w))
        point = Point(name, _normalized(w))
        twin = next((j for j, p in enumerate(pts) if np.allclose(p.weights, point.weights, atol=1e-9)), None)
        if twin is not None:  # the same mixture twice would count as two points of the fit; seeds repeat a point
            raise SparknetError(f"{at}.weights: the same mixture as points[{twin}] (fix: list each mixture once; "
                                f"--seeds K repeats every point with K model seeds)")
        if any(p.name == name for p in pts):
            raise SparknetError(f"{at}.name: {name!r} is used twice (fix: give each point its own name)")
        pts.append(point)
    return pts


# ---------------------------------------------------------------------------------------------
# The fitted model


def spearman(a, b) -> float:
    """Spearman's rank correlation of `a` and `b` (scipy's), nan when it says nothing: fewer than 3 values, or one
    side constant. The one place studies compute it (the fit's held-out check, the ablation's findings)."""
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _scheffe_features(w: np.ndarray) -> np.ndarray:
    n = w.shape[1]
    pairs = [w[:, i] * w[:, j] for i, j in itertools.combinations(range(n), 2)]
    return np.column_stack([w, *pairs]) if pairs else w


def _make(kind: str, n_points: int):
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    if kind == "scheffe-quadratic":
        return make_pipeline(FunctionTransformer(_scheffe_features),
                             RidgeCV(alphas=np.logspace(-6, 1, 15), fit_intercept=False))
    # Small leaves: the default of 20 samples a leaf would leave a few dozen points without a single split. At most 8
    # leaves and 100 rounds: a few dozen points support no more, and it halves the time of 10-fold cross-validation.
    return HistGradientBoostingRegressor(max_iter=100, learning_rate=0.1, max_leaf_nodes=8,
                                         min_samples_leaf=max(2, n_points // 10), random_state=0)


@dataclass
class Fit:
    model: str  # scheffe-quadratic | gradient-boosting | none
    n_points: int
    cv_spearman: float  # rank correlation of held-out predictions with measured values (nan: not computable)
    candidates: dict[str, float] = field(default_factory=dict)  # model -> its cv_spearman
    predicted_best: tuple[float, ...] | None = None
    predicted_value: float | None = None
    trusted: bool = False
    verdict: str = ""


def fit_objective(weights: np.ndarray, values: np.ndarray, names: tuple[str, ...], *, seed: int = 0,
                  num_candidates: int = 20_000) -> Fit:
    """Fit objective ~ weights (lower is better), cross-validated; the predicted best inside the design's box."""
    import sklearn.ensemble  # noqa: F401  (loads the OpenMP runtime, which threadpool_limits can only limit once loaded)
    from threadpoolctl import threadpool_limits

    # One thread: the fits are tiny (tens of points), and OpenMP's thread pool made the boosted trees ~10x slower on
    # a busy 2-core machine (28 s against 3 s for 10 folds of 66 points) than running them on one core.
    with threadpool_limits(1):
        return _fit_objective(weights, values, names, seed=seed, num_candidates=num_candidates)


def _fit_objective(weights: np.ndarray, values: np.ndarray, names: tuple[str, ...], *, seed: int,
                   num_candidates: int) -> Fit:
    from sklearn.model_selection import KFold, LeaveOneOut, cross_val_predict

    w = np.asarray(weights, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(y)
    w, y = w[keep], y[keep]
    n = len(y)
    n_terms = w.shape[1] + math.comb(w.shape[1], 2)
    if n < MIN_POINTS or np.ptp(y) == 0:
        return Fit("none", n, float("nan"), verdict=f"no model fitted: {n} measured point(s) (at least {MIN_POINTS} "
                   f"with differing objectives are needed); the answer is the best measured mixture")
    kinds = ["scheffe-quadratic"] + (["gradient-boosting"] if n >= 30 else [])
    cv = LeaveOneOut() if n <= 30 else KFold(n_splits=10, shuffle=True, random_state=seed)
    scores = {}
    for kind in kinds:
        pred = cross_val_predict(_make(kind, n), w, y, cv=cv)
        scores[kind] = spearman(pred, y)
    best_kind = max(kinds, key=lambda k: -1 if math.isnan(scores[k]) else scores[k])
    rho = scores[best_kind]
    model = _make(best_kind, n).fit(w, y)
    # Candidates inside the box the design covered: a model is not asked about mixtures it never saw.
    rng = np.random.default_rng([seed, 0x666974])
    cand = rng.dirichlet(np.ones(w.shape[1]), size=num_candidates)
    lo, hi = w.min(axis=0), w.max(axis=0)
    cand = np.vstack([cand[((cand >= lo - 1e-9) & (cand <= hi + 1e-9)).all(axis=1)], w])
    pred = model.predict(cand)
    i = int(np.argmin(pred))
    trusted = n >= MIN_POINTS and math.isfinite(rho) and rho >= TRUSTED_SPEARMAN
    few = n < n_terms + 2 and best_kind == "scheffe-quadratic"
    if trusted and not few:
        verdict = (f"{best_kind} fits well: held-out rank correlation {rho:.2f} over {n} points; the predicted best "
                   f"mixture is a reasonable next run (confirm it at full budget)")
    else:
        why = (f"held-out rank correlation {rho:.2f} (< {TRUSTED_SPEARMAN})" if not trusted else
               f"{n} points for a model of {n_terms} terms")
        verdict = (f"the fit is too weak to trust ({why}): the answer is the best measured mixture; more design "
                   f"points (random:N or a finer grid) would sharpen it")
        trusted = False
    return Fit(best_kind, n, rho, scores, tuple(float(x) for x in cand[i]), float(pred[i]), trusted, verdict)
