"""Per-trial overhead of `sparknet.sweep` on the CPU, and trials per hour at a tiny proxy budget.

    .venv/bin/python scripts/bench_sweep.py [--trials 6] [--proxy-tokens 16384]

Runs a real sweep (SQLite storage, MLflow store, a tiny model on the installed Python's text) in a temporary lab. For each
trial, overhead = the trial's wall time (ask to tell: config, data plan, model build, MLflow run with
params/tags/artifacts, final export, teardown) minus its training time (steps, evaluations, checkpoints),
as the trials record them. Target: overhead <= 5 s per trial.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # sparknet, and tests/tinylab.py: the tests' tiny real-text lab
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tinylab import DROP, timed_study  # noqa: E402

# The tests' tiny recipe (8 sequences a step, as in tests/test_sweep.py) with a 1M-token full budget and sources
# that may repeat 20 times, in the default shard size.
MIXTURE = dict(max_repeats=20, mixture={"total_tokens": "1M"}, prepare={"shard_tokens": DROP})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--proxy-tokens", default="16384")
    args = ap.parse_args()
    from sparknet.sweep import main as sweep_main

    code, total, trials, train, over = timed_study("sparknet-bench-sweep-", args.proxy_tokens, lambda lab: sweep_main(
        ["--mixture", str(lab / "tiny.yaml"), "--trials", str(args.trials), "--proxy-tokens", args.proxy_tokens,
         "--study", "bench", "--out", str(lab / "summary"), f"lab_dir={lab}"]), **MIXTURE)
    if code:
        return code
    print(f"\n{len(trials)} trials ({len(train)} completed) at {int(args.proxy_tokens):,} tokens in {total:.1f} s "
          f"(whole sweep, incl. start-up, summary and plots)")
    print(f"per completed trial: training {statistics.median(train):.2f} s, overhead "
          f"{statistics.median(over):.2f} s median (max {max(over):.2f} s)  target <= 5 s: "
          f"{'PASS' if statistics.median(over) <= 5 else 'MISS'}")
    print(f"trials per hour at this proxy budget: {3600 * len(trials) / total:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
