"""Per-trial overhead of `sparknet.sweep` on the CPU, and trials per hour at a tiny proxy budget.

    .venv/bin/python scripts/bench_sweep.py [--trials 6] [--proxy-tokens 16384] [--data ../shared/data]

Runs a real sweep (SQLite storage, MLflow store, a tiny model on real text) in a temporary lab. For each
trial, overhead = the trial's wall time (ask to tell: config, data plan, model build, MLflow run with
params/tags/artifacts, final export, teardown) minus its training time (steps, evaluations, checkpoints),
as the trials record them. Target: overhead <= 5 s per trial.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MIXTURE = """
mixture:
  total_tokens: 1M
  val_tokens: 4096
  sources:
    - {{name: edu, kind: local, path: {edu}, weight: 0.6, max_repeats: 20}}
    - {{name: textbooks, kind: local, path: {books}, weight: 0.4, max_repeats: 20}}
tokenizer: {{name: bpe, vocab_size: 512, train_bytes_per_source: 400000}}
model: {{preset: cpu-tiny, n_positions: 64}}
train: {{seq_len: 64, micro_batch_size: 8, grad_accum_steps: 1, lr: 3e-3, min_lr: 3e-4, checkpoint_minutes: 0}}
eval: {{val_tokens: 2048, sample_tokens: 4, sample_prompts: ["The"], wikitext: []}}
prepare: {{workers: 1}}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--proxy-tokens", default="16384")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = ap.parse_args()
    data = Path(args.data)
    edu, books = data / "web_edu" / "fineweb_edu_sample.jsonl", data / "academic" / "openstax_textbooks.jsonl"
    if not edu.exists() or not books.exists():
        print(f"error: real text not found under {data} (fix: --data DIR holding web_edu/ and academic/)")
        return 2
    import optuna

    from sparknet.sweep import main as sweep_main

    with tempfile.TemporaryDirectory(prefix="sparknet-bench-sweep-") as tmp:
        lab = Path(tmp)
        (lab / "tiny.yaml").write_text(MIXTURE.format(edu=edu, books=books))
        os.chdir(lab)
        # Warm the token store and the BPE once, as an overnight sweep's first trial would.
        from sparknet.config import load_config
        from sparknet.prepare import prepare
        prepare(load_config(lab / "tiny.yaml", [f"lab_dir={lab}", f"mixture.total_tokens={args.proxy_tokens}"]),
                progress=False)
        t0 = time.perf_counter()
        code = sweep_main(["--mixture", str(lab / "tiny.yaml"), "--trials", str(args.trials), "--proxy-tokens",
                           args.proxy_tokens, "--study", "bench", f"lab_dir={lab}"])
        total = time.perf_counter() - t0
        if code:
            return code
        trials = optuna.load_study(study_name="bench", storage=f"sqlite:///{lab / 'optuna.db'}").trials
        done = [t for t in trials if "wall_seconds" in t.user_attrs]
        over = [t.user_attrs["wall_seconds"] - t.user_attrs["seconds"] for t in done]
        train = [t.user_attrs["seconds"] for t in done]
        print(f"\n{len(trials)} trials ({len(done)} completed) at {int(args.proxy_tokens):,} tokens in {total:.1f} s "
              f"(whole sweep, incl. start-up, summary and plots)")
        print(f"per completed trial: training {statistics.median(train):.2f} s, overhead "
              f"{statistics.median(over):.2f} s median (max {max(over):.2f} s)  target <= 5 s: "
              f"{'PASS' if statistics.median(over) <= 5 else 'MISS'}")
        print(f"trials per hour at this proxy budget: {3600 * len(trials) / total:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
