"""An ablation's answer is trainable at the full budget: a mixture that runs a small source past its max_repeats is
found from the token stores, named, and replaced by a feasible one that `sparknet.run --dry-run` plans."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from tinylab import two_local_sources

from sparknet.config import config_from_dict, to_dict
from sparknet.full_budget import source_limits
from sparknet.prepare import prepare

FULL = 100_000


def docs_for(prefix: str, n: int) -> list[str]:
    return [f"{prefix} item {i}: " + " ".join(f"{prefix}{j}" for j in range(i % 13 + 5)) for i in range(n)]


@pytest.fixture
def lab(tmp_path, write_jsonl):
    """Source a has ~40k training tokens of which the 20k-token proxy reads only part (its size is unknown); b is
    small (read whole: ~2.7k tokens, max_repeats 5, so at most ~13k tokens at any budget)."""
    write_jsonl("a/a.jsonl", docs_for("alpha", 3000))
    write_jsonl("b/b.jsonl", docs_for("beta", 200))
    raw = two_local_sources(tmp_path)
    raw["prepare"]["workers"] = 1
    proxy = config_from_dict(raw)
    prepare(proxy, workers=1, progress=False)

    def full_config(weights):
        d = to_dict(proxy)
        d["mixture"]["total_tokens"] = FULL
        for s, w in zip(d["mixture"]["sources"], weights):
            s["weight"] = float(w)
        return config_from_dict(d)

    return proxy, full_config


def test_limits_name_the_source_that_runs_out_and_cap_it(lab):
    proxy, full_config = lab
    limits = source_limits(proxy, ("a", "b"), full_config)
    assert limits is not None and limits.unknown == ["a"]  # a's store stopped where the proxy's plan stopped
    b = limits.sources[1]
    assert b.whole and b.max_repeats == 5
    cap_share = b.max_sequences(64) * 64 / FULL  # b's largest share at the full budget
    assert 0.1 < cap_share < 0.3
    mask = limits.feasible(np.array([[0.7, 0.3], [0.95, 0.05], [1 - cap_share * 0.9, cap_share * 0.9]]))
    assert mask.tolist() == [False, True, True]
    short = limits.shortfall((0.7, 0.3))
    assert short.startswith("b runs out at the full budget (100,000 tokens)") and "max_repeats 5" in short
    assert limits.shortfall((0.95, 0.05)) is None
    capped = limits.nearest_feasible((0.7, 0.3))
    assert capped[1] < 0.3 and capped[1] == pytest.approx(cap_share, rel=0.05) and sum(capped) == pytest.approx(1)
    assert limits.shortfall(capped) is None


def test_an_infeasible_best_gives_way_to_a_feasible_one_that_run_dry_run_plans(lab, tmp_path, capsys):
    from types import SimpleNamespace

    import sparknet.run
    from sparknet.ablate_report import choose_best
    from sparknet.mixfit import Fit

    proxy, full_config = lab
    limits = source_limits(proxy, ("a", "b"), full_config)
    abl = SimpleNamespace(names=("a", "b"), objective=SimpleNamespace(metric="val/loss", unit="nats/token"),
                          design="file d.yaml", seeds=[1], study_name="s")
    pts = pd.DataFrame({"mixture": ["b-heavy", "a-heavy"], "weight.a": [0.5, 0.95], "weight.b": [0.5, 0.05],
                        "val/loss": [3.0, 3.2], "sd": [np.nan, np.nan], "seeds": [1, 1], "failed": [0, 0]})
    weights, why = choose_best(abl, pts, Fit("none", 2, float("nan")), limits)
    assert weights == (0.95, 0.05)
    assert "the best measured point that is trainable at the full budget, a-heavy" in why
    assert "b-heavy, which cannot be trained as measured: b runs out" in why
    # Only infeasible points measured: the best one with b capped at what its data allow.
    weights, why = choose_best(abl, pts.iloc[:1], Fit("none", 1, float("nan")), limits)
    assert limits.shortfall(weights) is None and weights[1] < 0.5
    assert "capped at the share their data allow" in why
    best = tmp_path / "best.yaml"
    best.write_text(yaml.safe_dump(to_dict(full_config(weights)), sort_keys=False))
    assert sparknet.run.main([str(best), "--dry-run"]) == 0
    assert f"budget {FULL:,} tokens" in capsys.readouterr().out
