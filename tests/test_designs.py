"""Mixture designs produce the right points, are counted before they are built, and fail cleanly."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from sparknet.designs import design_points
from sparknet.errors import SparknetError

NAMES = ("pdfs", "dclm", "edu")
BASE = (0.5, 0.3, 0.2)


def test_leave_one_out_is_the_base_then_each_source_removed_and_renormalized():
    pts = design_points("leave-one-out", NAMES, BASE)
    assert [p.name for p in pts] == ["base", "without pdfs", "without dclm", "without edu"]
    assert pts[0].weights == pytest.approx(BASE)
    assert pts[1].weights == pytest.approx((0, 0.6, 0.4)) and pts[3].weights == pytest.approx((0.625, 0.375, 0))
    # a source the base does not use has nothing to remove
    assert len(design_points("leave-one-out", NAMES, (0.5, 0.5, 0.0))) == 3


def test_single_source_and_grid_points():
    assert [p.weights for p in design_points("single-source", NAMES, BASE)] == [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
    for step, count in (("0.5", 6), ("0.25", 15), ("0.1", 66), ("1", 3), ("1/3", 10), ("1/4", 15)):
        pts = design_points(f"grid:{step}", NAMES, BASE)
        step = str(float(Fraction(step)))
        assert len(pts) == count == math.comb(round(1 / float(step)) + 2, 2)
        w = np.array([p.weights for p in pts])
        assert np.allclose(w.sum(axis=1), 1) and (w >= 0).all()
        assert len({p.weights for p in pts}) == count  # no duplicates
        assert np.allclose(np.round(w / float(step)), w / float(step))  # on the lattice


def test_random_points_are_seeded_dirichlet_draws_on_the_simplex():
    a = design_points("random:40", NAMES, BASE, seed=7)
    b = design_points("random:40", NAMES, BASE, seed=7)
    c = design_points("random:40", NAMES, BASE, seed=8)
    assert len(a) == 40 and a == b and a != c
    w = np.array([p.weights for p in a])
    assert np.allclose(w.sum(axis=1), 1) and ((w == 0) | (w >= 0.01)).all()  # a share under 1% is dropped
    assert np.all(np.abs(w.mean(axis=0) - 1 / 3) < 0.1)  # Dirichlet(1): uniform over the simplex


def test_a_design_file_lists_weight_vectors(tmp_path):
    f = tmp_path / "d.yaml"
    f.write_text("points:\n  - {name: mostly pdfs, weights: {pdfs: 0.8, edu: 0.2}}\n  - {weights: {dclm: 1}}\n")
    pts = design_points(str(f), NAMES, BASE)
    assert [(p.name, p.weights) for p in pts] == [("mostly pdfs", (0.8, 0.0, 0.2)), ("dclm100", (0.0, 1.0, 0.0))]


@pytest.mark.parametrize("design, message", [
    ("grid:0.3", "the step 0.3 does not divide 1"),
    ("grid:0", "the step must be in (0, 1]"),
    ("grid:abc", "the step is not a number"),
    ("random:0", "expected random:N with N >= 1"),
    ("leave-two-out", "unknown design 'leave-two-out'"),
])
def test_bad_designs_are_one_line_errors(design, message):
    with pytest.raises(SparknetError) as exc:
        design_points(design, NAMES, BASE)
    assert message in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("text, message", [
    ("points:\n  - {weights: {pdfs: 0.5, web: 0.5}}\n", "points[0].weights.web: no source named 'web'"),
    ("points:\n  - {weights: {pdfs: 0.5, dclm: 0.4}}\n", "points[0].weights: sum to 0.9, not 1"),
    ("points: []\n", "points: expected a non-empty list"),
    ("points:\n  - {weights: {pdfs: -1, dclm: 2}}\n", "must be a number >= 0"),
])
def test_bad_design_files_are_one_line_errors(tmp_path, text, message):
    f = tmp_path / "d.yaml"
    f.write_text(text)
    with pytest.raises(SparknetError, match=message.replace("[", r"\[").replace("]", r"\]")):
        design_points(str(f), NAMES, BASE)


def test_one_source_cannot_be_ablated():
    with pytest.raises(SparknetError, match="needs at least two"):
        design_points("leave-one-out", ("a",), (1.0,))


def test_prior_draws_centre_on_the_base_and_concentrate_with_c():
    base = np.array(BASE)
    loose = np.array([p.weights for p in design_points("prior:400", NAMES, BASE, seed=1)])
    tight = np.array([p.weights for p in design_points("prior:400:20", NAMES, BASE, seed=1)])
    assert np.abs(loose.mean(axis=0) - base).max() < 0.05 and np.abs(tight.mean(axis=0) - base).max() < 0.02
    assert np.abs(tight - base).sum(axis=1).mean() < 0.5 * np.abs(loose - base).sum(axis=1).mean()
    # A source the base leaves out stays out; every weight is 0 or at least the minimum share.
    pts = design_points("prior:50:2", NAMES, (0.7, 0.3, 0.0), seed=2)
    w = np.array([p.weights for p in pts])
    assert (w[:, 2] == 0).all() and ((w == 0) | (w >= 0.01)).all() and np.allclose(w.sum(axis=1), 1)
    assert design_points("prior:30", NAMES, BASE, seed=3)[0].name == "prior 0"


def test_random_draws_drop_shares_below_the_minimum():
    w = np.array([p.weights for p in design_points("random:300", ("a", "b", "c", "d", "e", "f"), (1 / 6,) * 6, seed=4)])
    assert ((w == 0) | (w >= 0.01)).all() and np.allclose(w.sum(axis=1), 1)
    assert (w == 0).any()  # with six sources some draws have a share under 1%: dropped, not kept as noise


def test_a_ten_source_fine_grid_is_counted_and_refused_at_once():
    import time

    names = tuple(f"s{i}" for i in range(10))
    start = time.perf_counter()
    with pytest.raises(SparknetError, match="92,378 points over 10 sources"):
        design_points("grid:0.1", names, (0.1,) * 10)
    assert time.perf_counter() - start < 1.0
    with pytest.raises(SparknetError, match="more than 10,000 points"):
        design_points("prior:10001", NAMES, BASE)
    with pytest.raises(SparknetError, match="below the minimum share 0.01"):
        design_points("grid:0.005", NAMES[:2], BASE[:2])


@pytest.mark.parametrize("design, message", [
    ("prior:8:0", "the concentration must be a number > 0"),
    ("prior:8:x", "the concentration must be a number > 0"),
    ("random:8:2", "expected random:N with N >= 1"),
    ("prior:", "expected prior:N with N >= 1 and an optional concentration"),
])
def test_bad_prior_designs_are_one_line_errors(design, message):
    with pytest.raises(SparknetError, match=message):
        design_points(design, NAMES, BASE)


def test_a_design_file_rejects_a_share_below_the_minimum(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text("points:\n  - {name: tiny, weights: {pdfs: 0.995, dclm: 0.005}}\n")
    with pytest.raises(SparknetError, match=r"points\[0\].weights.dclm: 0.005 is below the minimum share 0.01"):
        design_points(str(path), NAMES, BASE)
