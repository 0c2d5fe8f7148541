"""A fitted model of an ablation's objective against the mixture weights (the designs are `sparknet.designs`).

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

import numpy as np

# A fit is trusted when held-out rank correlation reaches this, over at least MIN_POINTS points.
TRUSTED_SPEARMAN = 0.7
MIN_POINTS = 5


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
