"""The fitted model of an ablation's objective finds a known optimum and says so when a fit is too weak to trust."""

from __future__ import annotations

import numpy as np
import pytest

from sparknet.designs import design_points
from sparknet.mixfit import fit_objective

NAMES = ("pdfs", "dclm", "edu")
BASE = (0.5, 0.3, 0.2)


def test_the_fit_recovers_the_optimum_of_a_known_objective():
    optimum = np.array([0.5, 0.3, 0.2])
    pts = design_points("grid:0.1", NAMES, BASE)
    w = np.array([p.weights for p in pts])
    rng = np.random.default_rng(0)
    y = 3.0 + ((w - optimum) ** 2 * [1.0, 2.0, 3.0]).sum(axis=1) + rng.normal(0, 0.002, len(w))
    fit = fit_objective(w, y, NAMES)
    assert fit.trusted and fit.cv_spearman > 0.9 and "fits well" in fit.verdict
    assert np.abs(np.array(fit.predicted_best) - optimum).max() < 0.05
    assert fit.predicted_value == pytest.approx(3.0, abs=0.01)
    assert set(fit.candidates) == {"scheffe-quadratic", "gradient-boosting"}  # 66 points: both are tried


def test_a_fit_to_noise_is_reported_as_weak():
    pts = design_points("random:24", NAMES, BASE, seed=3)
    w = np.array([p.weights for p in pts])
    y = np.random.default_rng(1).normal(3.0, 0.1, len(w))  # no relation to the weights
    fit = fit_objective(w, y, NAMES)
    assert not fit.trusted and "too weak to trust" in fit.verdict and "best measured" in fit.verdict


def test_too_few_points_fit_nothing():
    pts = design_points("leave-one-out", NAMES, BASE)
    fit = fit_objective(np.array([p.weights for p in pts]), np.array([3.0, 3.2, 3.1, 3.05]), NAMES)
    assert fit.model == "none" and not fit.trusted and "best measured mixture" in fit.verdict
