"""The fitted model of an ablation's objective: nested cross-validation over model families, a permutation test and the
seed noise decide whether it is trusted; its proposal stays inside the measured region. Synthetic objectives, so the
truth is known."""

from __future__ import annotations

import numpy as np
import pytest

from sparknet.designs import design_points
from sparknet.mixfit import NOISE_FACTOR, SIGNIFICANCE, design_supports_fit, fit_objective

NAMES = ("pdfs", "dclm", "edu")
BASE = (0.5, 0.3, 0.2)


def random_points(n: int, seed: int) -> np.ndarray:
    return np.array([p.weights for p in design_points(f"random:{n}", NAMES, BASE, seed=seed)])


def test_a_fit_to_noise_is_trusted_at_most_at_the_test_level():
    # 100 studies whose objective has no relation to the weights; the seed spread given is the true noise. A valid
    # permutation test at 5% trusts about 5 (binomial: 0 to 9 in 95% of suites); the held-out error is at the noise
    # here (about 1x the seed spread), so significance alone decides.
    trusted, pvals = 0, []
    for study in range(100):
        rng = np.random.default_rng([7, study])
        n = int(rng.integers(16, 25))
        w = rng.dirichlet(np.ones(3), size=n)
        y = 3.0 + rng.normal(0, 0.01, n)
        fit = fit_objective(w, y, NAMES, seed_sd=0.01, seed=study, num_candidates=2_000)
        trusted += fit.trusted
        pvals.append(fit.p_value)
        if not fit.trusted:
            assert "the answer is the best measured mixture" in fit.verdict
        assert fit.noise_ratio == pytest.approx(fit.cv_rmse / 0.01)
    assert trusted <= 5
    # The p-values are those of a valid test: not piled up near 0 (about 10% below 0.1; 20% would be 3 sd above).
    assert np.mean(np.array(pvals) < 0.1) <= 0.2


def test_a_smooth_objective_is_found_and_its_interval_covers_the_truth():
    optimum = np.array([0.5, 0.3, 0.2])

    def truth(w):
        return 3.0 + ((w - optimum) ** 2 * [1.0, 2.0, 3.0]).sum(axis=1)

    w = random_points(24, seed=3)
    y = truth(w) + np.random.default_rng(0).normal(0, 0.002, len(w))
    fit = fit_objective(w, y, NAMES, seed_sd=0.002)
    assert fit.model == "scheffe-quadratic" and fit.trusted and "fits:" in fit.verdict
    assert fit.p_value == pytest.approx(1 / 200) and fit.num_permutations == 199 and fit.cv_spearman > 0.9
    assert fit.cv_rmse < NOISE_FACTOR * 0.002 and fit.noise_ratio == pytest.approx(fit.cv_rmse / 0.002)
    best = np.array(fit.predicted_best)
    assert np.abs(best - optimum).sum() < 0.05 and best.sum() == pytest.approx(1.0)
    true_value = float(truth(best[None])[0])
    assert fit.interval_lo <= true_value <= fit.interval_hi
    assert fit.interval_lo < fit.predicted_value < fit.interval_hi and fit.interval_hi - fit.interval_lo < 0.02
    assert fit.top_k == round(20_024 * 128 / 100_000) and fit.num_feasible == fit.num_candidates == 20_024
    assert set(fit.candidates) == set(fit.inner_rmse) == {"linear", "log-linear", "scheffe-quadratic"}
    assert fit.candidates["scheffe-quadratic"] > fit.candidates["linear"]  # an interior optimum is not linear


def test_a_log_linear_truth_is_recovered_and_chosen_over_the_quadratic():
    t = np.array([2.5, -1.0, -1.5])  # sum zero: how the fit reports t (a common shift is k's)
    w = random_points(24, seed=5)
    y = 3.0 + 0.05 * np.exp(w @ t) + np.random.default_rng(1).normal(0, 0.002, len(w))
    fit = fit_objective(w, y, NAMES, seed_sd=0.002)
    assert fit.model == "log-linear" and fit.trusted
    assert fit.inner_rmse["log-linear"] < fit.inner_rmse["scheffe-quadratic"]
    assert fit.outer_choices["log-linear"] > fit.outer_choices["scheffe-quadratic"]
    fitted_t = np.array([fit.params[f"t.{n}"] for n in NAMES])
    assert np.abs(fitted_t - t).max() < 0.3
    assert fit.params["c"] == pytest.approx(3.0, abs=0.01) and fit.params["k"] == pytest.approx(0.05, rel=0.2)


@pytest.mark.parametrize("design", ["leave-one-out", "single-source"])
def test_designs_without_held_out_points_fit_nothing(design):
    pts = design_points(design, NAMES, BASE)
    w = np.array([p.weights for p in pts])
    y = np.linspace(3.0, 3.2, len(w))
    assert not design_supports_fit(design)
    fit = fit_objective(w, y, NAMES, seed_sd=0.01, supports_fit=design_supports_fit(design), design=design)
    assert fit.model == "none" and not fit.trusted and fit.predicted_best is None and fit.predicted_value is None
    assert fit.verdict == (f"a {design} design supports no fitted model (nothing is left to hold out): the answer is "
                           f"the best measured mixture")
    few = fit_objective(random_points(6, seed=1), np.linspace(3.0, 3.1, 6), NAMES, seed_sd=0.01)  # too few points
    assert few.model == "none" and few.predicted_best is None and "at least 8" in few.verdict


def test_an_unmeasured_seed_spread_is_never_trusted():
    w = random_points(16, seed=2)
    y = 3.0 + 0.2 * w[:, 0] + np.random.default_rng(2).normal(0, 0.002, len(w))  # a strong, plain signal
    fit = fit_objective(w, y, NAMES, seed_sd=None)
    assert fit.p_value < SIGNIFICANCE and not fit.trusted and "seed spread is unmeasured" in fit.verdict
    loud = fit_objective(w, y, NAMES, seed_sd=0.0005)  # held-out error far above a tiny seed spread
    assert not loud.trusted and "x the seed spread (trusted below 2x)" in loud.verdict


def test_the_proposal_respects_the_feasibility_mask():
    optimum = np.array([0.5, 0.3, 0.2])
    w = random_points(20, seed=4)
    y = 3.0 + ((w - optimum) ** 2).sum(axis=1) * 2 + np.random.default_rng(3).normal(0, 0.002, len(w))
    seen = []

    def feasible(cand):
        seen.append(len(cand))
        return cand[:, 0] <= 0.35  # pdfs is scarce at the full budget: the optimum's 0.5 is not trainable

    fit = fit_objective(w, y, NAMES, seed_sd=0.002, feasible=feasible, num_candidates=5_000)
    assert fit.trusted and fit.predicted_best[0] <= 0.35
    assert abs(fit.predicted_best[0] - 0.35) < 0.03  # the constrained optimum sits on the boundary
    assert 0 < fit.num_feasible < fit.num_candidates == 5_020 == seen[0]
    assert "that are trainable" in fit.verdict
    # A trainable region with a hole around the optimum: the mean of the top candidates falls in the hole, so the
    # single best trainable candidate is proposed instead.
    ring = fit_objective(w, y, NAMES, seed_sd=0.002, feasible=lambda c: np.abs(c - optimum).sum(axis=1) > 0.1,
                         num_candidates=5_000)
    assert ring.top_k == 1 and np.abs(np.array(ring.predicted_best) - optimum).sum() > 0.1
    assert "the best single trainable candidate" in ring.verdict
    none = fit_objective(w, y, NAMES, seed_sd=0.002, feasible=lambda c: c[:, 0] > 2.0, num_candidates=1_000)
    assert none.num_feasible == 0 and none.predicted_best is None and not none.trusted
    assert "no candidate inside the measured region is trainable" in none.verdict


def test_the_proposal_stays_inside_the_measured_region():
    # Points with pdfs <= 0.4 only, an objective falling with pdfs: the answer stays at the measured edge, no further.
    rng = np.random.default_rng(6)
    w = rng.dirichlet(np.ones(3), size=200)
    w = w[w[:, 0] <= 0.4][:18]
    y = 3.0 - 0.3 * w[:, 0] + rng.normal(0, 0.002, len(w))
    fit = fit_objective(w, y, NAMES, seed_sd=0.002, num_candidates=5_000)
    assert fit.model == "linear" and fit.trusted
    assert fit.predicted_best[0] <= w[:, 0].max() + 1e-9 and fit.predicted_best[0] > w[:, 0].max() - 0.03
    assert fit.params["b.pdfs"] == pytest.approx(2.7, abs=0.05)  # source alone: 3.0 - 0.3


def test_trees_compete_from_thirty_points():
    # A step in dclm: no smooth family fits it, boosted trees do. No permutations (each costs 25 tree fits): a quick
    # look, which is therefore not trusted.
    w = random_points(48, seed=10)
    y = 3.0 + 0.1 * (w[:, 1] > 0.4) + np.random.default_rng(4).normal(0, 0.002, len(w))
    fit = fit_objective(w, y, NAMES, seed_sd=0.002, num_candidates=2_000, num_permutations=0)
    assert fit.model == "lightgbm" and set(fit.candidates) == {"linear", "log-linear", "scheffe-quadratic", "lightgbm"}
    assert fit.inner_rmse["lightgbm"] < 0.25 * min(fit.inner_rmse["linear"], fit.inner_rmse["scheffe-quadratic"])
    assert fit.cv_rmse < 2 * 0.002 * 2 and fit.predicted_best[1] < 0.4  # the low side of the step
    assert np.isnan(fit.p_value) and not fit.trusted and "no permutation test was run" in fit.verdict
    small = fit_objective(w[:29], y[:29], NAMES, seed_sd=0.002, num_candidates=500, num_permutations=0)
    assert "lightgbm" not in small.candidates  # 29 points: trees need TREE_MIN_POINTS
