"""An ablation's claims are noise-aware (`sparknet.ablate_stats`, and the sentences `sparknet.ablate_report.findings`
writes with it): Welch's difference, interval and p-value equal scipy's t-test; Holm's correction equals a hand
computation; on pure noise the sentences claim an effect in at most 5 of 100 simulated studies (leave-one-out and a
15-point grid), a planted effect is claimed with its sign, a point with one finished seed says it has no spread,
failed and diverged seeds are counted and named, best.yaml's "clear winner" follows the same test, and the effects
table carries intervals and Holm marks. Everything is built in memory (no training): a fake ablation and its runs."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest

from sparknet.ablate_stats import fmt_p, holm, noise_note, significant, welch, welch_from_stats

LOO4 = ("web", "code", "books", "math")
GRID3 = ("a", "b", "c")
# A claim in the findings: an effect (raised/lowered, rose/fell), a source that matters most, or a mixture that beats.
CLAIM = re.compile(r"^Removing \S+ (raised|lowered) |its own held-out loss val/\S+ (rose|fell) |needs most is | beats ")


def study(design, names, seeds, value, objective="wikitext-valid", states=None, seed_vary=None):
    """A fake ablation (what findings reads: names, design, seeds, objective) and its results frame (what
    results_frame writes), each run's values from value(point index, point, seed index) -> {source: own held-out
    loss, "obj": objective}; states: {(point index, seed index): "PRUNED" | "FAIL"} (no objective value)."""
    import pandas as pd

    from sparknet.designs import design_points
    from sparknet.objective import Objective

    points = design_points(design, names, tuple([1 / len(names)] * len(names)))
    abl = SimpleNamespace(names=names, design=design, seeds=list(seeds), points=points,
                          objective=Objective.parse(objective, names))
    if seed_vary:
        abl.seed_vary = seed_vary
    metric = abl.objective.metric
    rows = []
    for i, p in enumerate(points):
        for k, s in enumerate(seeds):
            v = value(i, p, k)
            state = (states or {}).get((i, k), "COMPLETE")
            row = {"point": i, "mixture": p.name, "seed": s, "trial": len(rows), "state": state}
            row |= {f"weight.{n}": w for n, w in zip(names, p.weights)}
            row |= {f"tokens.{n}": round(1000 * w) for n, w in zip(names, p.weights)}
            row |= {f"val/loss/{n}": v[n] for n in names}
            row["val/loss"] = float(np.mean([v[n] for n in names]))
            row[metric] = v["obj"] if state == "COMPLETE" else None
            row["note"] = f"diverged at step {3 + k}" if state == "PRUNED" else ""
            rows.append(row)
    return abl, pd.DataFrame(rows)


def noise(rng, names, planted=None):
    """iid standard normal values for every run; planted: {point name: (column, shift)} added on top."""
    def value(i, p, k):
        v = {n: float(rng.standard_normal()) for n in names} | {"obj": float(rng.standard_normal())}
        if planted and p.name in planted:
            col, shift = planted[p.name]
            v[col] += shift
        return v
    return value


def read(abl, runs):
    from sparknet.ablate_report import findings, points_frame

    pts = points_frame(abl, runs)
    return pts, findings(abl, pts.dropna(subset=[abl.objective.metric]))


def test_welch_difference_interval_and_p_equal_scipy_ttest():
    from scipy import stats

    rng = np.random.default_rng(3)
    for n_a, n_b, sd_b in ((3, 3, 1.0), (2, 5, 3.0), (4, 2, 0.2), (6, 3, 1.5)):
        a, b = rng.normal(1.0, 1.0, n_a), rng.normal(0.0, sd_b, n_b)
        d = welch(a, b)
        ref = stats.ttest_ind(a, b, equal_var=False)
        ci = ref.confidence_interval(0.95)
        assert d.estimate == pytest.approx(a.mean() - b.mean(), rel=1e-12)
        assert d.estimate / d.se == pytest.approx(ref.statistic, rel=1e-10)
        assert d.se == pytest.approx(math.sqrt(a.var(ddof=1) / n_a + b.var(ddof=1) / n_b), rel=1e-12)
        assert d.df == pytest.approx(ref.df, rel=1e-10)
        assert d.p == pytest.approx(ref.pvalue, rel=1e-9)
        assert (d.low, d.high) == (pytest.approx(ci.low, rel=1e-9), pytest.approx(ci.high, rel=1e-9))
        assert d.measured and (d.n_a, d.n_b) == (n_a, n_b)
    # A failed seed's NaN is left out, and summary statistics give the same difference.
    d = welch([1.0, 2.0, math.nan, 4.0], [0.0, 1.0])
    ref = stats.ttest_ind([1.0, 2.0, 4.0], [0.0, 1.0], equal_var=False)
    assert d.n_a == 3 and d.p == pytest.approx(ref.pvalue, rel=1e-9)
    s = welch_from_stats(7 / 3, float(np.std([1, 2, 4], ddof=1)), 3, 0.5, float(np.std([0, 1], ddof=1)), 2)
    assert (s.estimate, s.p, s.low) == (pytest.approx(d.estimate), pytest.approx(d.p), pytest.approx(d.low))


def test_one_seed_or_no_spread_gives_the_difference_without_a_test():
    d = welch([1.5], [1.0, 1.2, 1.1])
    assert d.estimate == pytest.approx(0.4) and not d.measured
    assert all(math.isnan(x) for x in (d.se, d.low, d.high, d.p))
    assert noise_note(d, "without web", "base") == "one seed: no spread measured (without web)"
    same = welch([1.0, 1.0], [2.0, 2.0])  # a spread of exactly zero measures no noise
    assert not same.measured and noise_note(same) == "the seeds gave identical values: no spread measured"
    assert not significant(d.p) and fmt_p(d.p) == "n/a"
    assert (fmt_p(0.01234), fmt_p(3e-6), fmt_p(1.0)) == ("= 0.012", "< 0.0001", "= 1")


def test_holm_equals_a_hand_computation():
    # m = 4 finite p-values, sorted 0.005, 0.01, 0.03, 0.04: x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running
    # maximum 0.02, 0.03, 0.06, 0.06; NaN (no spread) stays NaN and is not counted.
    got = holm([0.01, 0.04, 0.03, 0.005, math.nan])
    assert got[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and math.isnan(got[4])
    assert list(holm([0.5, 0.9])) == [1.0, 1.0] and holm([]).shape == (0,)
    assert significant(0.049) and not significant(0.05) and not significant(math.nan)


def test_pure_noise_leave_one_out_claims_an_effect_in_at_most_5_of_100_studies():
    rng = np.random.default_rng(20240611)
    claimed = 0
    for _ in range(100):
        abl, runs = study("leave-one-out", LOO4, [1, 2, 3], noise(rng, LOO4))
        _, facts = read(abl, runs)
        assert sum(f.startswith("Removing ") for f in facts) == 4
        claimed += any(CLAIM.search(f) for f in facts)
    assert claimed <= 5, claimed


def test_pure_noise_on_a_15_point_grid_claims_a_difference_in_at_most_2_of_40_studies():
    rng = np.random.default_rng(7)
    claimed = 0
    for _ in range(40):
        abl, runs = study("grid:0.25", GRID3, [1, 2, 3], noise(rng, GRID3))
        pts, facts = read(abl, runs)
        assert len(pts) == 15 and "over all 105 pairs of points" in " ".join(facts)
        assert not any("x the spread" in f for f in facts)
        claimed += any(CLAIM.search(f) for f in facts)
    assert claimed <= 2, claimed


@pytest.mark.parametrize("shift, verb", [(10.0, "raised"), (-10.0, "lowered")])
def test_a_planted_effect_is_claimed_with_its_sign(shift, verb):
    rng = np.random.default_rng(11)
    abl, runs = study("leave-one-out", LOO4, [1, 2, 3], noise(rng, LOO4, {"without code": ("obj", shift)}))
    _, facts = read(abl, runs)
    code = next(f for f in facts if f.startswith("Removing code"))
    assert code.startswith(f"Removing code {verb} wikitext-valid/bpb by "), code
    assert re.search(r"95% CI \d+\.\d{4}\.\.\d+\.\d{4}, Holm p [=<] ", code)
    for other in ("web", "books", "math"):
        line = next(f for f in facts if f.startswith(f"Removing {other}"))
        assert line.startswith(f"Removing {other}: no effect on wikitext-valid/bpb distinguishable from seed noise")
    most = [f for f in facts if "matter most" in f or "needs most" in f]
    if shift > 0:
        assert most[0].startswith("The source wikitext-valid/bpb needs most is code: removing it costs ")
    else:
        assert most[0].startswith("No single source is shown to matter most: no removal raised")
    assert any(f.startswith("How these are tested:") and "over the 9 comparisons" in f for f in facts)


def test_the_largest_of_two_equal_effects_is_not_said_to_matter_most():
    rng = np.random.default_rng(5)
    planted = {"without code": ("obj", 10.0), "without web": ("obj", 10.0)}
    abl, runs = study("leave-one-out", LOO4, [1, 2, 3], noise(rng, LOO4, planted))
    _, facts = read(abl, runs)
    assert sum(bool(re.match(r"Removing (code|web) raised", f)) for f in facts) == 2
    most = next(f for f in facts if "matter most" in f or "needs most" in f)
    assert most.startswith("No single source is shown to matter most: the two largest effects (removing ")
    assert "within seed noise" in most


def test_a_point_with_one_seed_says_it_has_no_spread_and_failed_seeds_are_named():
    rng = np.random.default_rng(2)
    states = {(1, 1): "PRUNED", (1, 2): "FAIL", (2, 0): "PRUNED"}  # without web: one seed left; without code: two
    abl, runs = study("leave-one-out", LOO4, [1, 2, 3], noise(rng, LOO4), states=states)
    pts, facts = read(abl, runs)
    by = pts.set_index("mixture")
    assert (by.loc["without web", "seeds"], by.loc["without web", "failed"]) == (1, 2)
    assert (by.loc["without code", "seeds"], by.loc["without code", "failed"]) == (2, 1)
    assert (by.loc["base", "seeds"], by.loc["base", "failed"]) == (3, 0) and math.isnan(by.loc["without web", "sd"])
    web = next(f for f in facts if f.startswith("Removing web"))
    assert web.startswith("Removing web changed wikitext-valid/bpb by ")
    assert "one seed: no spread measured (without web), so not tested" in web and "Holm" not in web
    failed = next(f for f in facts if f.startswith("Failed or diverged seeds"))
    assert "without web, 2 of 3 (seed 2 diverged: diverged at step 4; seed 3 failed)" in failed
    assert "without code, 1 of 3 (seed 1 diverged: diverged at step 3)" in failed
    assert "Fewer than two finished seeds, so no spread measured and no test made with: without web (1 seed)." in facts


def test_a_point_none_of_whose_seeds_finished_is_still_reported():
    rng = np.random.default_rng(4)
    states = {(3, k): "PRUNED" for k in range(3)}
    abl, runs = study("leave-one-out", LOO4, [1, 2, 3], noise(rng, LOO4), states=states)
    pts, facts = read(abl, runs)
    gone = pts[pts["mixture"] == "without books"].iloc[0]
    assert (gone["seeds"], gone["failed"]) == (0, 3) and math.isnan(gone["wikitext-valid/bpb"])
    failed = next(f for f in facts if f.startswith("Failed or diverged seeds"))
    assert "without books, 3 of 3, none finished: no result (seed 1 diverged" in failed
    assert not any(f.startswith("Removing books") for f in facts)
    from sparknet.ablate_report import findings

    assert findings(abl, pts) == facts  # the unmeasured point in the frame changes nothing but is still named


def test_the_seed_spread_says_which_seeds_vary_and_one_seed_per_point_tests_nothing():
    rng = np.random.default_rng(6)
    for vary, words in ((None, "model initialization only"), ("data", "the data order only"),
                        ("both", "both model initialization and data order")):
        abl, runs = study("leave-one-out", LOO4, [1, 2], noise(rng, LOO4), seed_vary=vary)
        _, facts = read(abl, runs)
        assert facts[-1].startswith("The spread between seeds is ") and f"the seeds vary {words}" in facts[-1]
    abl, runs = study("leave-one-out", LOO4, [1], noise(rng, LOO4, {"without code": ("obj", 10.0)}))
    _, facts = read(abl, runs)
    assert not any(CLAIM.search(f) for f in facts) and not any(f.startswith("How these") for f in facts)
    assert facts[-1].startswith("One seed per point: the noise between seeds is not measured and no difference")
    assert "one seed: no spread measured (without code and base), so not tested" in facts[1]


def test_grid_sentences_and_the_clear_winner_use_the_same_test():
    from sparknet.ablate_report import choose_best

    rng = np.random.default_rng(8)
    fit = SimpleNamespace(trusted=False, predicted_best=None)
    abl, runs = study("grid:0.25", GRID3, [1, 2, 3], noise(rng, GRID3))
    pts, facts = read(abl, runs)
    best, second = pts.iloc[0]["mixture"], pts.iloc[1]["mixture"]
    assert facts[1].startswith(f"{best} against the runner-up, {second}: no difference in wikitext-valid/bpb "
                               f"distinguishable from seed noise (+")
    _, why = choose_best(abl, pts, fit)
    assert why.endswith("pairs of points): not a clear winner") and f"runner-up {second}" in why
    assert "over 105 pairs of points" in why

    planted = {"a100": ("obj", -20.0)}  # one mixture far better than every other
    abl, runs = study("grid:0.25", GRID3, [1, 2, 3], noise(rng, GRID3, planted))
    pts, facts = read(abl, runs)
    assert pts.iloc[0]["mixture"] == "a100"
    assert facts[1].startswith(f"a100 beats the runner-up, {pts.iloc[1]['mixture']}, by ")
    assert facts[2].startswith(f"a100 beats the worst, {pts.iloc[-1]['mixture']}, by ")
    _, why = choose_best(abl, pts, fit)
    assert "clear winner" not in why and why.startswith("the best measured point, a100")


def test_effects_table_carries_welch_intervals_and_holm_marks():
    from scipy import stats

    from sparknet.ablate_effects import effects_frame, effects_markdown

    rng = np.random.default_rng(9)
    abl, runs = study("leave-one-out", LOO4, [1, 2, 3], noise(rng, LOO4, {"without code": ("code", 10.0)}))
    table = effects_frame(abl, runs)
    cell = table[(table["source"] == "code") & (table["metric"] == "val/code")].iloc[0]
    base = runs[runs["mixture"] == "base"]["val/loss/code"].to_numpy()
    without = runs[runs["mixture"] == "without code"]["val/loss/code"].to_numpy()
    ref = stats.ttest_ind(base, without, equal_var=False)
    assert cell["effect"] == pytest.approx(base.mean() - without.mean()) and cell["effect"] < -5
    assert cell["p"] == pytest.approx(ref.pvalue) and cell["ci_high"] == pytest.approx(ref.confidence_interval().high)
    assert cell["p_holm"] == pytest.approx(min(1.0, ref.pvalue * 16)) and bool(cell["significant"])  # the smallest p
    assert int(table["significant"].sum()) == 1 and list(table["p_holm"]) == pytest.approx(list(holm(table["p"])))
    md = effects_markdown(abl, runs)
    assert md.count(" * |") == 1 and "over the table's 16 cells with a standard error (1 of them)" in md
