"""A fitted model of an ablation's objective against the mixture weights (the designs are `sparknet.designs`).

    fit_objective(weights, values, names, *, seed_sd=None, supports_fit=True, design=None, feasible=None, seed=0,
                  num_candidates=20_000, num_permutations=None) -> Fit

`weights` (n points x m sources, rows summing to 1), `values` (the objective, lower is better; non-finite values are
dropped), `seed_sd` the noise of one entry of `values`: the standard deviation between seeds of one mixture (divided
by sqrt(K) when each value is a mean over K seeds); None, nan or 0 when unmeasured, and then no fit is trusted.
`supports_fit=False` (see `design_supports_fit`: leave-one-out and single-source designs) fits nothing. `feasible`,
when given, maps an (N, m) array of candidate mixtures to a boolean mask of those trainable at the full budget.

Model families (each predicts the objective from the weights; the weights sum to 1, so no family has a separate
intercept beyond what that constraint absorbs):
- `linear`: sum_i b_i w_i, ridge-regularized towards the constant model (alpha by exact leave-one-out on the training
  points), closed form;
- `log-linear`: the data mixing law of Ye et al. (2024), Olmix's default, L(w) = c + k exp(sum_i t_i w_i) with k > 0.
  The weights sum to 1, so a common shift of t moves into k: t is reported centred (sum t_i = 0). Fitted by
  Levenberg-Marquardt least squares on the values themselves (not on log(L - c)), batched in numpy over folds and
  permutations, started from the law's log-linear form (c one standard deviation below the smallest training value,
  then log k and t by linear regression of log(L - c) on w). Bounds keep it finite (|t| <= LOGLINEAR_T_MAX in sum-zero
  coordinates, k <= e^5 standard deviations); it stops at LOGLINEAR_ITERATIONS or when an undamped step gains under
  LOGLINEAR_TOLERANCE of the squared error; a problem left non-finite predicts its training mean, so the family loses
  the comparison instead of crashing;
- `scheffe-quadratic`: sum b_i w_i + sum b_ij w_i w_j (Scheffé's mixture model), ridge as `linear`;
- `lightgbm`: gradient-boosted trees (RegMix's regressor), from TREE_MIN_POINTS points on only.

Choosing and scoring (nested cross-validation): the points are split into OUTER_FOLDS folds; on each outer training
set an inner INNER_FOLDS-fold cross-validation picks the family with the smallest held-out squared error (with a dozen
points squared error is a steadier criterion than a rank correlation, which moves by whole ranks with one point), and
that family, refitted on the outer training set, predicts the outer fold. The reported `cv_spearman` and `cv_rmse` are
those outer predictions' rank correlation and error: no outer point took part in choosing the family that predicted
it. The final model is the same procedure on all points (inner cross-validation on all of them picks the family, which
is refitted on all of them). `candidates` holds each family's own outer-fold rank correlation, for reading only (a
maximum over them would be optimistic).

Significance (permutation test of the whole procedure): the values are permuted over the fixed weight vectors (the
folds stay the same) and the entire nested procedure (inner choice of family, ridge alphas, log-linear fits, trees)
is rerun, giving the null distribution of the held-out rank correlation. p = (1 + #{null >= observed}) / (1 + B),
one-sided (only predictions that rank like the truth count), with Besag and Clifford's (1991) sequential stopping: the
permutations stop once STOP_AFTER_EXCEEDANCES of them reach the observed value (then p = h / l after l permutations,
>= 0.05, still a valid p-value): a fit to noise costs a few dozen permutations, a real one the full B. B =
NUM_PERMUTATIONS (199) when the closed-form and batched families compete, NUM_PERMUTATIONS_TREES (39, still able to
reach p = 0.025) when LightGBM takes part, since each permutation then costs OUTER_FOLDS * (INNER_FOLDS + 1) tree fits.

Trust: only when the held-out rank correlation beats the permutations (p < SIGNIFICANCE) and reaches TRUSTED_SPEARMAN,
and the held-out error is below NOISE_FACTOR times the seed spread; an unmeasured seed spread is never trusted, nor is
a fit without a permutation test (`num_permutations=0`, for a quick look), nor one without a trainable proposal.
Otherwise the answer is the best measured mixture, and the verdict says which test failed.

The proposal: candidates are random convex combinations of the measured points (each of m randomly chosen points with
Dirichlet(1) coefficients, so inside their convex hull by construction) plus the points themselves; infeasible ones
are dropped when `feasible` is given. The proposed mixture is the mean of the top k predicted candidates, k =
TOP_FRACTION of the candidates (RegMix averages the top 128 of 100,000; 26 of the default 20,000), which steadies the
argmin of a noisy surface; if that mean is itself infeasible the single best feasible candidate is proposed. Its 95%
prediction interval comes from the nested procedure's held-out residuals (split-conformal style): the
ceil(0.95 (n + 1))-th smallest absolute residual, or, below 19 points where that rank does not exist, the Gaussian
t(0.975, n - 1) times the held-out RMSE. Each held-out value is itself a noisy measurement, so the seed noise is inside
those residuals already and is not added twice: the interval is for a measured value of the proposal (same seeds as
the design points). The predicted value at an argmin is optimistic (winner's curse); a confirmation run measures it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

FAMILIES = ("linear", "log-linear", "scheffe-quadratic", "lightgbm")  # in order of preference on a tie
NO_FIT_DESIGNS = ("leave-one-out", "single-source")
# Fewer points than this leave an inner training set of about 5 after two splits: no family can be chosen honestly.
MIN_POINTS = 8
TREE_MIN_POINTS = 30  # trees need dozens of points to split at all (RegMix fits hundreds of small runs)
OUTER_FOLDS = 5
INNER_FOLDS = 4
NUM_PERMUTATIONS = 199
NUM_PERMUTATIONS_TREES = 39
STOP_AFTER_EXCEEDANCES = 10  # Besag-Clifford h
PERMUTATION_CHUNK = 20  # permutations per batch (a fit to noise usually stops within the first)
SIGNIFICANCE = 0.05
# Significance says the held-out ranking is not chance; this floor says it is good enough to act on. At a rank
# correlation of 0.5 about two pairs of mixtures in three are ordered right (Kendall's tau ~0.35); below it the
# argmin of the fit is not a mixture to train on. It also matters for noise: a valid 5% test alone trusts more than 5
# of 100 pure-noise studies about 40% of the time (binomial; measured here: 7, 7 and 5 of 100 in three suites), its
# false positives sitting at held-out rank correlations of 0.30 to 0.53; with the floor, about 1 in 100.
TRUSTED_SPEARMAN = 0.5
# The held-out error of a perfect model is the noise of one measured value (seed_sd) inflated by its own estimation
# error: sqrt(1 + p / n), 1.2 to 1.4 for a quadratic from 16 to 24 points, and an RMSE over 16 points itself varies by
# about 1 / sqrt(2 n) = 18%. Twice the seed spread leaves room for both, and still rejects a fit whose own error (beyond
# the noise) exceeds sqrt(2^2 - 1) = 1.7 seed spreads: its ranking differences would drown in it.
NOISE_FACTOR = 2.0
TOP_FRACTION = 128 / 100_000  # RegMix: the mean of the top 128 of 100,000 candidates
INTERVAL_LEVEL = 0.95
RIDGE_ALPHAS = np.logspace(-4, 2, 13)  # times the number of training points (features standardized)
# c starts this many standard deviations below the smallest training value (more starts, more cost: one converged on
# every synthetic law tried, the best of several is kept)
LOGLINEAR_STARTS = (1.0,)
LOGLINEAR_T_MAX = 10.0  # bound on t's sum-zero coordinates (exp(10 * w) spans 22,000x over the simplex)
LOGLINEAR_RIDGE = 1e-3  # a whisper of L2 on t (standardized units) keeps flat directions from wandering
LOGLINEAR_ITERATIONS = 25  # a law with signal converges in about 12
LOGLINEAR_TOLERANCE = 1e-3
# log k <= 5 in standard deviations of the values: beyond it the law is its own linear limit (k -> inf, t -> 0) to
# within 1% of curvature, and fits to noise drift there for ever
LOGLINEAR_LOG_K_MAX = 5.0


def spearman(a, b) -> float:
    """Spearman's rank correlation of `a` and `b` (scipy's), nan when it says nothing: fewer than 3 values, or one
    side constant. The one place studies compute it (the fit's held-out check, the ablation's findings)."""
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def design_supports_fit(design: str) -> bool:
    """Whether a design's points support a fitted model: leave-one-out (m + 1 points on the simplex's faces) and
    single-source (its m corners) leave nothing to hold out, so their answer is the best measured mixture."""
    return design not in NO_FIT_DESIGNS


@dataclass
class Fit:
    model: str  # the family the procedure chose on all points: linear | log-linear | scheffe-quadratic | lightgbm | none
    n_points: int
    cv_spearman: float  # nested: rank correlation of the outer-fold predictions with the values (nan: not computed)
    candidates: dict[str, float] = field(default_factory=dict)  # family -> its own outer-fold rank correlation
    predicted_best: tuple[float, ...] | None = None  # the proposed mixture (inside the measured region, feasible)
    predicted_value: float | None = None  # the final model's prediction there
    trusted: bool = False  # p_value < SIGNIFICANCE, cv_spearman >= TRUSTED_SPEARMAN, cv_rmse < NOISE_FACTOR * seed_sd
    verdict: str = ""
    p_value: float = float("nan")  # permutation p-value of cv_spearman (one-sided)
    num_permutations: int = 0  # permutations run (sequential stopping: fewer than B for a fit to noise)
    cv_rmse: float = float("nan")  # RMSE of the outer-fold predictions, in the objective's unit
    seed_sd: float | None = None
    noise_ratio: float = float("nan")  # cv_rmse / seed_sd
    inner_rmse: dict[str, float] = field(default_factory=dict)  # family -> inner-CV RMSE on all points (chose `model`)
    outer_choices: dict[str, int] = field(default_factory=dict)  # family -> outer folds whose inner CV chose it
    params: dict[str, float] = field(default_factory=dict)  # the final model's parameters (b.<source>, t.<source>, ...)
    interval_lo: float = float("nan")  # 95% prediction interval of the objective at predicted_best
    interval_hi: float = float("nan")
    top_k: int = 0  # candidates averaged into predicted_best
    num_candidates: int = 0  # candidates inside the measured region (before the feasibility mask)
    num_feasible: int = 0  # of which trainable (all of them without `feasible`)


def fit_objective(weights: np.ndarray, values: np.ndarray, names: tuple[str, ...], *, seed_sd: float | None = None,
                  supports_fit: bool = True, design: str | None = None,
                  feasible: Callable[[np.ndarray], np.ndarray] | None = None, seed: int = 0,
                  num_candidates: int = 20_000, num_permutations: int | None = None) -> Fit:
    """Fit objective ~ weights (lower is better) by nested cross-validation over the model families, test it against
    permutations and the seed noise, and propose the best mixture inside the measured region (module docstring)."""
    from threadpoolctl import threadpool_limits

    # One thread: the fits are tiny (tens of points), and OpenMP's and BLAS's thread pools made them ~10x slower on a
    # busy 2-core machine (28 s against 3 s for 10 folds of boosted trees on 66 points) than running them on one core.
    with threadpool_limits(1):
        return _fit_objective(np.asarray(weights, dtype=np.float64), np.asarray(values, dtype=np.float64),
                              tuple(names), seed_sd=seed_sd, supports_fit=supports_fit, design=design,
                              feasible=feasible, seed=seed, num_candidates=num_candidates,
                              num_permutations=num_permutations)


# ---- the families: each fits every training set (masks, S x n) for every value vector (Y, B x n) at once and returns
# predictions at the n design points (S x B x n); with keep_model, also a predictor and parameters for set 0, row 0.

@dataclass
class _Model:
    predict: Callable[[np.ndarray], np.ndarray]
    params: dict[str, float]


def _scheffe_features(w: np.ndarray) -> np.ndarray:
    pairs = [w[:, i] * w[:, j] for i, j in itertools.combinations(range(w.shape[1]), 2)]
    return np.column_stack([w, *pairs]) if pairs else w


def _feature_names(names: tuple[str, ...], quadratic: bool) -> list[str]:
    pairs = [f"{a}*{b}" for a, b in itertools.combinations(names, 2)] if quadratic else []
    return [*names, *pairs]


def _ridge(features: Callable[[np.ndarray], np.ndarray], quadratic: bool):
    """Ridge with an unpenalized intercept on standardized features: it shrinks towards the constant model. Alpha is
    chosen per training set and per value vector by exact leave-one-out error (the hat matrix's diagonal), from one
    eigendecomposition per training set: all sets, alphas and value vectors are one batch of matrix products."""

    def fit(W, Y, masks, names, keep_model=False):
        X = features(W)
        mk = masks.astype(np.float64)  # S x n
        ns = mk.sum(1)  # S
        mu = mk @ X / ns[:, None]  # S x p
        sd = np.sqrt(np.clip(mk @ X ** 2 / ns[:, None] - mu ** 2, 0, None))
        sd = np.where(sd > 1e-9, sd, 1.0)
        Xs = (X[None] - mu[:, None]) / sd[:, None]  # S x n x p, every point
        Xc = Xs * mk[..., None]  # training points only
        e, V = np.linalg.eigh(Xc.transpose(0, 2, 1) @ Xc)
        XV = Xc @ V  # S x n x p
        inv = 1.0 / (np.clip(e, 0, None)[:, None, :] + ns[:, None, None] * RIDGE_ALPHAS[None, :, None])  # S x A x p
        ym = mk @ Y.T / ns[:, None]  # S x B
        Yc = (Y[None] - ym[..., None]) * mk[:, None, :]  # S x B x n
        coef = inv[:, :, None, :] * (Yc @ XV)[:, None]  # S x A x B x p, in V's basis
        fitted = coef @ XV[:, None].transpose(0, 1, 3, 2)  # S x A x B x n
        hdiag = 1.0 / ns[:, None, None] + (XV[:, None] ** 2 * inv[:, :, None, :]).sum(-1)  # S x A x n
        loo = (Yc[:, None] - fitted) / (1.0 - hdiag[:, :, None, :]) * mk[:, None, None, :]
        press = (loo ** 2).sum(-1)
        best = np.argmin(np.where(np.isfinite(press), press, np.inf), axis=1)  # S x B (a leverage of 1: not chosen)
        cb = np.take_along_axis(coef, best[:, None, :, None], axis=1)[:, 0]  # S x B x p
        out = ym[..., None] + cb @ (Xs @ V).transpose(0, 2, 1)  # S x B x n
        model = None
        if keep_model:
            b = V[0] @ cb[0, 0] / sd[0]  # per raw feature
            intercept = float(ym[0, 0] - mu[0] @ b)
            m = W.shape[1]

            def predict(w_new):
                return intercept + features(np.asarray(w_new, dtype=np.float64)) @ b

            # The weights sum to 1: the intercept belongs to the linear terms, b_i is source i's predicted value.
            coefs = np.concatenate([b[:m] + intercept, b[m:]])
            model = _Model(predict, {f"b.{k}": float(v) for k, v in zip(_feature_names(names, quadratic), coefs)}
                           | {"alpha": float(RIDGE_ALPHAS[best[0, 0]])})
        return out, model

    return fit


def _sum_zero_basis(m: int) -> np.ndarray:
    """An orthonormal basis (m x (m - 1)) of the vectors summing to zero: t = Q u, t . w = u . (Q^T w)."""
    q, _ = np.linalg.qr(np.eye(m) - 1.0 / m)
    return q[:, : m - 1]


def _solve(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A batch of small linear systems; a singular one (in any problem of the batch) falls back to pseudo-inverses."""
    try:
        return np.linalg.solve(A, b[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return (np.linalg.pinv(A) @ b[..., None])[..., 0]


def _loglinear(W, Y, masks, names, keep_model=False):
    """L = c + k exp(t . w) for every (training set, value vector, start), as one batch of Levenberg-Marquardt
    problems in standardized units, on the sum-zero coordinates u of t (so k and a shift of t are not both free).
    Parameters per problem: c, a = log k, u."""
    n, m = W.shape
    d = m - 1
    Q = _sum_zero_basis(m)
    Z = W @ Q  # n x d
    ZZ = (Z[:, :, None] * Z[:, None, :]).reshape(n, d * d)
    S, B, R = len(masks), len(Y), len(LOGLINEAR_STARTS)  # R starts
    M = np.broadcast_to(masks[:, None, None, :], (S, B, R, n)).reshape(-1, n).astype(np.float64)
    Yp = np.broadcast_to(Y[None, :, None, :], (S, B, R, n)).reshape(-1, n)
    cnt = M.sum(1)
    mu = (M * Yp).sum(1) / cnt
    sd = np.sqrt((M * (Yp - mu[:, None]) ** 2).sum(1) / cnt)
    sd = np.where(sd > 0, sd, 1.0)
    ys = (Yp - mu[:, None]) / sd[:, None]
    # Start: c below the smallest training value, then the log-linear form log(L - c) = log k + t . w by least squares.
    c0 = np.where(M > 0, ys, np.inf).min(1) - np.tile(LOGLINEAR_STARTS, S * B)
    logv = np.log(np.where(M > 0, ys - c0[:, None], 1.0))
    X1 = np.column_stack([np.ones(n), Z])
    A = (M[:, None, :] * X1.T[None]) @ X1 + 1e-8 * np.eye(m)
    theta = np.column_stack([c0, _solve(A, (M * logv) @ X1)])
    theta[:, 1] = np.clip(theta[:, 1], -30.0, LOGLINEAR_LOG_K_MAX)
    theta[:, 2:] = np.clip(theta[:, 2:], -LOGLINEAR_T_MAX, LOGLINEAR_T_MAX)
    q = m + 1
    ridge = np.zeros(q)
    ridge[2:] = LOGLINEAR_RIDGE

    def evaluate(th, M, ys):
        e = np.exp(np.clip(th[:, 1:2] + th[:, 2:] @ Z.T, -50.0, 50.0))
        r = M * (th[:, 0:1] + e - ys)
        sse = (r ** 2).sum(1) + (ridge * th ** 2).sum(1)
        return r, e, np.where(np.isfinite(sse), sse, np.inf)

    r, e, sse = evaluate(theta, M, ys)
    lam = np.full(len(theta), 1e-2)
    active = np.ones(len(theta), bool)
    # Converged: a Gauss-Newton-like step (small damping) that gains less than LOGLINEAR_TOLERANCE of the squared
    # error. Fits to noise creep towards the linear limit (k -> infinity, t -> 0) by ~0.1% a step; this stops them.
    for _ in range(LOGLINEAR_ITERATIONS):
        idx = np.flatnonzero(active)
        if not len(idx):
            break
        # J's columns: M (c), E = M e (a), E z_j (u_j); J^T J and J^T r as products with the shared Z.
        Mi, ri, E = M[idx], r[idx], M[idx] * e[idx]
        E2, Er = E * e[idx], E * ri
        JtJ = np.empty((len(idx), q, q))
        JtJ[:, 0, 0] = Mi.sum(1)
        JtJ[:, 0, 1] = JtJ[:, 1, 0] = E.sum(1)
        JtJ[:, 0, 2:] = E @ Z
        JtJ[:, 1, 1] = E2.sum(1)
        JtJ[:, 1, 2:] = E2 @ Z
        JtJ[:, 2:, 0], JtJ[:, 2:, 1] = JtJ[:, 0, 2:], JtJ[:, 1, 2:]
        JtJ[:, 2:, 2:] = (E2 @ ZZ).reshape(-1, d, d)
        JtJ += np.diag(ridge)
        grad = np.column_stack([ri.sum(1), Er.sum(1), Er @ Z]) + ridge * theta[idx]
        D = np.einsum("pii->pi", JtJ) + 1e-9
        step = -_solve(JtJ + lam[idx, None, None] * (D[:, :, None] * np.eye(q)), grad)
        new = theta[idx] + step
        new[:, 1] = np.clip(new[:, 1], -30.0, LOGLINEAR_LOG_K_MAX)
        new[:, 2:] = np.clip(new[:, 2:], -LOGLINEAR_T_MAX, LOGLINEAR_T_MAX)
        r2, e2, sse2 = evaluate(new, Mi, ys[idx])
        ok = sse2 < sse[idx]
        gain = np.where(ok, (sse[idx] - sse2) / np.maximum(sse[idx], 1e-300), 0.0)
        theta[idx[ok]], r[idx[ok]], e[idx[ok]], sse[idx[ok]] = new[ok], r2[ok], e2[ok], sse2[ok]
        done = (ok & (gain < LOGLINEAR_TOLERANCE) & (lam[idx] <= 1e-2)) | (lam[idx] >= 1e8)
        lam[idx] = np.clip(np.where(ok, lam[idx] * 0.3, lam[idx] * 4.0), 1e-9, 1e9)
        active[idx] = ~(done | (np.abs(step).max(1) < 1e-10))
    sse = sse.reshape(S, B, R)
    pick = np.argmin(sse, axis=-1)
    th = theta.reshape(S, B, R, q)[np.arange(S)[:, None], np.arange(B)[None, :], pick]  # S x B x q
    mu = mu.reshape(S, B, R)[..., 0]
    sd = sd.reshape(S, B, R)[..., 0]
    failed = ~np.isfinite(sse.min(-1))

    def predict_std(th, z):
        return th[..., 0:1] + np.exp(np.clip(th[..., 1:2] + th[..., 2:] @ z.T, -50.0, 50.0))

    out = mu[..., None] + sd[..., None] * predict_std(th, Z)
    out[failed] = mu[failed][:, None]  # every start failed: the training mean (this family then loses the choice)
    model = None
    if keep_model:
        th0, mu0, sd0, failed0 = th[0, 0], float(mu[0, 0]), float(sd[0, 0]), bool(failed[0, 0])

        def predict(w_new):
            z = np.asarray(w_new, dtype=np.float64) @ Q
            return np.full(len(z), mu0) if failed0 else mu0 + sd0 * predict_std(th0, z)

        t = Q @ th0[2:]
        model = _Model(predict, {"c": mu0 + sd0 * float(th0[0]), "k": sd0 * math.exp(float(th0[1]))}
                       | {f"t.{k}": float(v) for k, v in zip(names, t)})
    return out, model


def _lightgbm(W, Y, masks, names, keep_model=False):
    """Gradient-boosted trees, one LightGBM fit per training set and value vector (no batching: the expensive family,
    used from TREE_MIN_POINTS points on). Leaves of a tenth of the points at least 2, at most 8 leaves, 50 rounds at
    learning rate 0.2: dozens of points support no more, and each round costs 0.1 to 0.3 ms."""
    import lightgbm as lgb

    S, B, n = len(masks), len(Y), len(W)
    out = np.empty((S, B, n))
    model = None
    for s, mask in enumerate(masks):
        ns = int(mask.sum())
        params = dict(objective="regression", learning_rate=0.2, num_leaves=8, min_data_in_leaf=max(2, ns // 10),
                      min_data_in_bin=1, max_bin=63, verbose=-1, num_threads=1, deterministic=True,
                      force_col_wise=True, seed=0)
        for b in range(B):
            data = lgb.Dataset(W[mask], Y[b, mask], params={"min_data_in_bin": 1, "max_bin": 63, "verbose": -1})
            # keep_training_booster: no round trip of the model through a string (~8 ms a fit)
            booster = lgb.train(params, data, num_boost_round=50, keep_training_booster=True)
            out[s, b] = booster.predict(W, num_threads=1)
            if keep_model and s == 0 and b == 0:
                def predict(w_new, booster=booster):
                    return booster.predict(np.asarray(w_new, dtype=np.float64), num_threads=1)

                model = _Model(predict, {"num_trees": float(booster.num_trees())})
    return out, model


_FITS = {"linear": _ridge(lambda w: w, quadratic=False), "log-linear": _loglinear,
         "scheffe-quadratic": _ridge(_scheffe_features, quadratic=True), "lightgbm": _lightgbm}


# ---- the nested procedure, batched over value vectors (the measured one and its permutations)

def _spearman_rows(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    rp, ry = rankdata(p, axis=-1), rankdata(y, axis=-1)
    rp -= rp.mean(-1, keepdims=True)
    ry -= ry.mean(-1, keepdims=True)
    den = np.sqrt((rp ** 2).sum(-1) * (ry ** 2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rp * ry).sum(-1) / den, np.nan)


@dataclass
class _Plan:
    masks: np.ndarray  # S x n training sets
    outer: list[tuple[int, np.ndarray, list[tuple[int, np.ndarray]]]]  # (set, test points, [(inner set, inner test)])


def _split(idx: np.ndarray, k: int, rng) -> list[np.ndarray]:
    return [np.sort(part) for part in np.array_split(rng.permutation(idx), min(k, len(idx)))]


def _inner(n: int, train: np.ndarray, rng, masks: list) -> list[tuple[int, np.ndarray]]:
    out = []
    for test in _split(train, INNER_FOLDS, rng):
        mask = np.zeros(n, bool)
        mask[np.setdiff1d(train, test)] = True
        masks.append(mask)
        out.append((len(masks) - 1, test))
    return out


def _nested_plan(n: int, seed: int) -> _Plan:
    rng = np.random.default_rng([seed, 0x6E6573])  # "nes"
    masks, outer = [], []
    for test in _split(np.arange(n), OUTER_FOLDS, rng):
        train = np.setdiff1d(np.arange(n), test)
        mask = np.zeros(n, bool)
        mask[train] = True
        masks.append(mask)
        s = len(masks) - 1
        outer.append((s, test, _inner(n, train, rng, masks)))
    return _Plan(np.array(masks), outer)


def _inner_sse(preds: dict, Y: np.ndarray, inner: list[tuple[int, np.ndarray]], families) -> np.ndarray:
    """families x B: squared error of each family's inner held-out predictions."""
    sse = np.zeros((len(families), len(Y)))
    for si, test in inner:
        for fi, fam in enumerate(families):
            sse[fi] += ((preds[fam][si][:, test] - Y[:, test]) ** 2).sum(1)
    return np.where(np.isfinite(sse), sse, np.inf)


def _nested(W, Y, names, families, plan: _Plan):
    """The outer-fold predictions (B x n) of the procedure, each family's own outer predictions (F x B x n) and the
    outer folds' choices (folds x B)."""
    preds = {fam: _FITS[fam](W, Y, plan.masks, names)[0] for fam in families}
    B, n = Y.shape
    outer_pred = np.empty((B, n))
    own = np.empty((len(families), B, n))
    choices = []
    for so, test, inner in plan.outer:
        choice = np.argmin(_inner_sse(preds, Y, inner, families), axis=0)  # B; ties go to the earlier family
        for fi, fam in enumerate(families):
            own[fi][:, test] = preds[fam][so][:, test]
        outer_pred[:, test] = own[choice, np.arange(B)][:, test]
        choices.append(choice)
    return outer_pred, own, np.array(choices)


def _permutation_p(W, y, names, families, plan, observed: float, budget: int, seed: int) -> tuple[float, int]:
    """Besag-Clifford sequential Monte Carlo p-value of the observed held-out rank correlation (module docstring)."""
    if budget <= 0:
        return float("nan"), 0
    if not math.isfinite(observed):
        return 1.0, 0
    rng = np.random.default_rng([seed, 0x7065726D])  # "perm"
    exceed, done = 0, 0
    while done < budget:
        size = min(PERMUTATION_CHUNK, budget - done)
        Yp = np.stack([rng.permutation(y) for _ in range(size)])
        stats = _spearman_rows(_nested(W, Yp, names, families, plan)[0], Yp)
        hits = ~(stats < observed - 1e-12)  # a nan (constant predictions) counts as reaching it: conservative
        for i, hit in enumerate(hits):
            exceed += bool(hit)
            if exceed >= STOP_AFTER_EXCEEDANCES:
                return STOP_AFTER_EXCEEDANCES / (done + i + 1), done + i + 1
        done += size
    return (exceed + 1) / (budget + 1), budget


# ---- the proposal

def _hull_candidates(w: np.ndarray, count: int, rng) -> np.ndarray:
    """`count` random convex combinations of the measured points (m of them drawn at a time, Dirichlet(1)
    coefficients; any point of the hull is a combination of m points) and the points themselves."""
    n, m = w.shape
    pick = rng.integers(0, n, size=(count, m))
    lam = rng.dirichlet(np.ones(m), size=count)
    cand = np.einsum("ck,ckm->cm", lam, w[pick])
    return np.vstack([cand, w])


def _mixture_text(names, w) -> str:
    return " ".join(f"{n} {x:.3f}" for n, x in zip(names, w))


def _fit_objective(w, y, names, *, seed_sd, supports_fit, design, feasible, seed, num_candidates,
                   num_permutations) -> Fit:
    from scipy.stats import t as student_t

    if w.ndim != 2 or w.shape[1] != len(names) or len(y) != len(w):
        raise ValueError(f"weights {w.shape}, values {y.shape} and {len(names)} names do not match")
    keep = np.isfinite(y) & np.isfinite(w).all(axis=1)
    w, y = w[keep], y[keep]
    n, m = w.shape
    sd_ok = seed_sd is not None and math.isfinite(seed_sd) and seed_sd > 0
    sd = float(seed_sd) if sd_ok else None
    if not supports_fit:
        return Fit("none", n, float("nan"), seed_sd=sd, verdict=(
            f"{'a ' + design if design else 'the'} design supports no fitted model (nothing is left to hold out): the "
            f"answer is the best measured mixture"))
    need = max(MIN_POINTS, m + 3)
    if n < need or np.ptp(y) == 0:
        return Fit("none", n, float("nan"), seed_sd=sd, verdict=(
            f"no model fitted: {n} measured point(s) (nested cross-validation needs at least {need} with differing "
            f"objectives): the answer is the best measured mixture"))

    plan = _nested_plan(n, seed)
    smallest_inner = min(int(plan.masks[si].sum()) for _, _, inner in plan.outer for si, _ in inner)
    families = [f for f in FAMILIES if (f != "log-linear" or smallest_inner >= m + 3)
                and (f != "lightgbm" or n >= TREE_MIN_POINTS)]
    outer_pred, own, choices = _nested(w, y[None], names, families, plan)
    rho = float(_spearman_rows(outer_pred, y[None])[0])
    resid = y - outer_pred[0]
    rmse = float(np.sqrt(np.mean(resid ** 2)))
    per_family = {f: spearman(own[i, 0], y) for i, f in enumerate(families)}
    outer_choices = {f: int((choices[:, 0] == i).sum()) for i, f in enumerate(families)}
    budget = num_permutations if num_permutations is not None else (
        NUM_PERMUTATIONS_TREES if "lightgbm" in families else NUM_PERMUTATIONS)
    p, used = _permutation_p(w, y, names, families, plan, rho, budget, seed)

    # The final model: the same inner choice on all points, refitted on all of them.
    rng = np.random.default_rng([seed, 0x66696E])  # "fin"
    masks = [np.ones(n, bool)]
    inner = _inner(n, np.arange(n), rng, masks)
    masks = np.array(masks)
    preds = {f: _FITS[f](w, y[None], masks, names)[0] for f in families}
    inner_sse = _inner_sse(preds, y[None], inner, families)[:, 0]
    chosen = families[int(np.argmin(inner_sse))]
    model = _FITS[chosen](w, y[None], masks[:1], names, keep_model=True)[1]

    # The proposal, inside the measured region, among the trainable candidates.
    cand = _hull_candidates(w, num_candidates, np.random.default_rng([seed, 0x666974]))
    total = len(cand)
    if feasible is not None:
        mask = np.asarray(feasible(cand), dtype=bool).reshape(-1)
        if mask.shape != (total,):
            raise ValueError(f"feasible() returned {mask.shape[0]} values for {total} candidates")
        cand = cand[mask]
    fit = Fit(chosen, n, rho, per_family, p_value=p, num_permutations=used, cv_rmse=rmse, seed_sd=sd,
              noise_ratio=rmse / sd if sd else float("nan"),
              inner_rmse={f: float(np.sqrt(s / n)) for f, s in zip(families, inner_sse)},
              outer_choices=outer_choices, params=model.params, num_candidates=total, num_feasible=len(cand))
    where = ""
    if len(cand):
        pred = model.predict(cand)
        k = max(1, round(TOP_FRACTION * len(cand)))
        top = np.argsort(pred, kind="stable")[:k]
        best = cand[top].mean(axis=0)
        best = best / best.sum()
        where = f"the mean of the top {k} of {len(cand):,} candidates inside the measured region" + (
            " that are trainable" if feasible is not None else "")
        if feasible is not None and not bool(np.asarray(feasible(best[None]), dtype=bool).reshape(-1)[0]):
            where = (f"the best single trainable candidate of {len(cand):,} inside the measured region (the mean of "
                     f"the top {k} is not trainable)")
            best, k = cand[top[0]], 1
        value = float(model.predict(best[None])[0])
        rank = math.ceil(INTERVAL_LEVEL * (n + 1))
        half = (float(np.sort(np.abs(resid))[rank - 1]) if rank <= n
                else float(student_t.ppf(0.5 + INTERVAL_LEVEL / 2, n - 1)) * rmse)
        fit.predicted_best, fit.predicted_value = tuple(float(x) for x in best), value
        fit.interval_lo, fit.interval_hi, fit.top_k = value - half, value + half, k

    test = f"permutation p = {p:.3g}, {used} permutations" if budget > 0 else "no permutation test"
    stats = (f"held-out rank correlation {rho:.2f} ({test}) over {n} points, held-out error {rmse:.4g}"
             + (f" ({rmse / sd:.1f}x the seed spread {sd:.4g})" if sd else ""))
    reasons = []
    if budget <= 0:
        reasons.append("no permutation test was run (num_permutations=0)")
    elif not p < SIGNIFICANCE:
        reasons.append(f"the held-out rank correlation does not beat permutations (p = {p:.3g}, not < {SIGNIFICANCE})")
    if not rho >= TRUSTED_SPEARMAN:
        reasons.append(f"the held-out rank correlation is below {TRUSTED_SPEARMAN} (too weak to pick a mixture by)")
    if not sd:
        reasons.append("the seed spread is unmeasured, so the held-out error cannot be compared with seed noise "
                       "(train some point with two or more seeds)")
    elif not rmse < NOISE_FACTOR * sd:
        reasons.append(f"the held-out error is {rmse / sd:.1f}x the seed spread (trusted below {NOISE_FACTOR:g}x)")
    fit.trusted = not reasons and fit.predicted_best is not None
    proposal = (f"predicted best {_mixture_text(names, fit.predicted_best)} at {fit.predicted_value:.4f} (95% PI "
                f"{fit.interval_lo:.4f}..{fit.interval_hi:.4f}), {where}" if fit.predicted_best is not None else
                f"no candidate inside the measured region is trainable at the full budget ({total:,} tried)")
    if not reasons and fit.predicted_best is None:
        fit.verdict = f"{chosen} fits ({stats}), but {proposal}: the answer is the best measured mixture"
    elif not reasons:
        fit.verdict = f"{chosen} fits: {stats}; {proposal}: a next run to confirm, not a measured result"
    else:
        fit.verdict = (f"the fit is not trusted ({'; '.join(reasons)}): {chosen} chosen by nested cross-validation, "
                       f"{stats}; the answer is the best measured mixture")
    return fit
