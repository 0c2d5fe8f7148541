"""Per-point overhead of `sparknet.ablate` on the CPU, and points per hour at a tiny proxy budget.

    .venv/bin/python scripts/bench_ablate.py [--design grid:0.5] [--seeds 1] [--proxy-tokens 16384] [--objective val]

Runs a real ablation (SQLite storage, MLflow store, the tests' tiny model on three sources of the installed Python's
text: docstrings, READMEs, code) in a temporary lab. For each run, overhead = its wall time (take the point, build
its config, prepare check, MLflow child run with params/tags/artifacts, final export, objective, record, tell) minus
its training time (steps, evaluation, checkpoints), as the runs record them. Target: overhead <= 5 s per point.
`--objective wikitext-valid` (with SPARKNET_WIKITEXT=DIR) adds scoring WikiText-2 validation to each point's
overhead.
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

# The tests' tiny recipe with three sources (as tests/test_ablate.py), a 1M-token full budget, sources that may repeat
# 20 times, in the default shard size.
SOURCES = [{"name": "docs", "kind": "pydocs", "part": "docstrings", "weight": 0.4, "max_repeats": 20},
           {"name": "readmes", "kind": "pydocs", "part": "readmes", "weight": 0.3, "max_repeats": 20},
           {"name": "code", "kind": "pydocs", "part": "code", "weight": 0.3, "max_repeats": 20}]
MIXTURE = dict(mixture={"total_tokens": "1M", "sources": SOURCES}, prepare={"shard_tokens": DROP})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--design", default="grid:0.5")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--proxy-tokens", default="16384")
    ap.add_argument("--objective", default="val")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # as a worker on a busy 2-core machine (OpenMP's spinning costs tiny runs dearly)
    from sparknet.ablate import main as ablate_main

    code, total, trials, train, over = timed_study("sparknet-bench-ablate-", args.proxy_tokens, lambda lab: ablate_main(
        [str(lab / "tiny.yaml"), "--design", args.design, "--seeds", str(args.seeds), "--proxy-tokens",
         args.proxy_tokens, "--objective", args.objective, "--study", "bench", "--out", str(lab / "summary"),
         f"lab_dir={lab}"]), **MIXTURE)
    if code:
        return code
    print(f"\n{len(trials)} runs ({len(train)} completed; design {args.design} x {args.seeds} seed(s)) at "
          f"{int(args.proxy_tokens):,} tokens in {total:.1f} s (whole study: start-up, store check, summary, fit "
          f"and plots included)")
    print(f"per point: training {statistics.median(train):.2f} s, overhead {statistics.median(over):.2f} s median "
          f"(first {over[0]:.2f} s, max {max(over):.2f} s)  target <= 5 s: "
          f"{'PASS' if statistics.median(over) <= 5 else 'MISS'}")
    print(f"points per hour at this proxy budget: {3600 * len(trials) / total:.0f} (whole study); "
          f"{3600 / statistics.median([a + b for a, b in zip(train, over)]):.0f} (per run, steady state)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
