#!/usr/bin/env bash
# GPU benchmarks on a CUDA machine, ready to run from anywhere:
#   1. training throughput of gpt2-70m (seq 1024, micro-batch 24 or the largest that fits, accum 1, bf16,
#      GPT-2's 50,257 vocab): sparknet's trainer and the bare loop, torch.compile off and on; tokens/s and
#      MFU (tokens/s x GPTShape.flops_per_token / sparknet.train.peak_flops). Target on an H100: >= 800k
#      tokens/s. The HF Trainer contender is skipped unless --with-hf.
#   2. scripts/bench_eval.py --preset gpt2-70m --device cuda (WikiText-2 hf-strided evaluation; target <= 5 s
#      per stride on an H100).
#   4. scripts/bench_downstream.py --preset gpt2-70m --device cuda: our downstream scorer beside lm-eval on the same
#      200 items a task, then every item of the default task set with our scorer (the time a run's end takes).
#   3. the peak memory of a gpt2-70m training step at micro-batch 24 x 1024 (bf16, accumulation 2, AdamW), eager
#      (the fused loss) and compiled: torch.cuda.max_memory_allocated beside sparknet.device.estimate_memory, the
#      estimate that --dry-run prints and that an out-of-memory error and train.micro_batch_size=auto go by.
#
#   bash scripts/bench_gpu.sh [--data DIR] [--micro N] [--steps N] [--warmup N] [--out DIR] [--with-hf]
#
# --data: real text as in ../shared/data (web_edu/, academic/, web_general/ jsonl and wikitext-2-raw/);
#         default ../shared/data relative to the repository. The machine needs no network if .venv
#         already holds a CUDA build of torch that suits the GPU (scripts/bootstrap.sh keeps it; otherwise it
#         installs one: PyPI's on x86_64, PyTorch's cu130 index on a DGX Spark, which needs network access).
# Results: <out>/train-compile-{off,on}.{log,json}, <out>/eval.{log,json}, <out>/memory-{eager,compiled}.json,
# <out>/downstream-{200,full}.log,
# and a summary at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=../shared/data
MICRO=24
STEPS=100   # timed optimizer steps: ~2.5M tokens, a few seconds at the target speed
WARMUP=10   # untimed: compilation, cuBLAS autotuning, the allocator's growth
OUT=lab/bench-gpu   # lab/ is git-ignored
WITH_HF=0
while [ $# -gt 0 ]; do
  case "$1" in
    --data) DATA=$2; shift 2 ;;
    --micro) MICRO=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --with-hf) WITH_HF=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "bench_gpu: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "bench_gpu: nvidia-smi not found: this script is for a CUDA machine (on a CPU: scripts/bench_train.py)" >&2
  exit 2
fi
for need in web_edu/fineweb_edu_sample.jsonl academic/openstax_textbooks.jsonl web_general wikitext-2-raw; do
  if [ ! -e "$DATA/$need" ]; then
    echo "bench_gpu: $DATA/$need is absent (fix: --data DIR pointing at a copy of shared/data with" \
         "web_edu/, academic/, web_general/ and wikitext-2-raw/)" >&2
    exit 2
  fi
done

bash scripts/bootstrap.sh   # .venv with sparknet; keeps a CUDA torch that is already installed
PY=.venv/bin/python
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "bench_gpu: .venv's torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)') sees no" \
       "GPU (fix: a CUDA build of torch that suits the GPU: bash scripts/bootstrap.sh --plan says what it installs)" >&2
  exit 2
fi
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}')" | tee -a "$OUT/gpu.txt"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
LAB="$OUT/lab"   # token stores shared by the runs: tokenized once

# The largest micro-batch that fits: start at --micro and step down on CUDA out-of-memory.
candidates=("$MICRO")
for m in 16 12 8 4; do [ "$m" -lt "$MICRO" ] && candidates+=("$m"); done
hf_flag=--skip-hf
[ "$WITH_HF" = 1 ] && hf_flag=--hf-bare   # the HF Trainer, and GPT2LMHeadModel in the bare loop
for compile in off on; do
  for micro in "${candidates[@]}"; do
    log="$OUT/train-compile-$compile.log"
    echo "== train gpt2-70m, seq 1024, micro $micro, accum 1, bf16, compile $compile"
    set +e
    "$PY" scripts/bench_train.py --device cuda --preset gpt2-70m --vocab gpt2 --seq-len 1024 \
      --micro-batch "$micro" --accum 1 --compile "$compile" $hf_flag --steps "$STEPS" \
      --warmup-steps "$WARMUP" --data "$DATA" --lab "$LAB" --json "$OUT/train-compile-$compile.json" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    if [ "$rc" = 0 ]; then break; fi
    if grep -qi "out of memory" "$log"; then
      echo "bench_gpu: micro-batch $micro does not fit; trying a smaller one"
      continue
    fi
    echo "bench_gpu: bench_train.py failed (exit $rc); see $log" >&2
    exit "$rc"
  done
done

echo "== peak memory of a training step: gpt2-70m, micro-batch 24 x 1024, bf16 (measured vs estimated)"
for mode in eager compiled; do
  flag=""; [ "$mode" = compiled ] && flag=--compile
  set +e
  "$PY" -m sparknet.memory --preset gpt2-70m --vocab 50257 --seq-len 1024 --micro 24 --device cuda $flag \
    > "$OUT/memory-$mode.json" 2> "$OUT/memory-$mode.log"
  rc=$?
  set -e
  [ "$rc" = 0 ] || { echo "bench_gpu: memory ($mode) failed (exit $rc); see $OUT/memory-$mode.log" >&2; rm -f "$OUT/memory-$mode.json"; }
done

echo "== eval gpt2-70m (bench_eval.py)"
"$PY" scripts/bench_eval.py --preset gpt2-70m --device cuda --wikitext "$DATA/wikitext-2-raw" \
  --json "$OUT/eval.json" 2>&1 | tee "$OUT/eval.log"

echo "== downstream tasks, gpt2-70m: our scorer vs lm-eval on 200 items a task, then the full default set (ours)"
"$PY" scripts/bench_downstream.py --preset gpt2-70m --device cuda --items 200 --data "$DATA/downstream" \
  2>&1 | tee "$OUT/downstream-200.log" || echo "bench_gpu: downstream (200 items) failed; see $OUT/downstream-200.log" >&2
"$PY" scripts/bench_downstream.py --preset gpt2-70m --device cuda --items all --no-harness --data "$DATA/downstream" \
  2>&1 | tee "$OUT/downstream-full.log" || echo "bench_gpu: downstream (full) failed; see $OUT/downstream-full.log" >&2

echo "== summary ($OUT)"
"$PY" - "$OUT" <<'EOF'
import json, math, sys
from pathlib import Path

out = Path(sys.argv[1])
print(open(out / "gpu.txt").read().strip())


def result(name: str, missing: str):
    """The JSON a step wrote, or None (and a line saying so) when the step left none."""
    if not (out / name).exists():
        print(missing)
        return None
    return json.loads((out / name).read_text())


for compile in ("off", "on"):
    r = result(f"train-compile-{compile}.json", f"compile {compile}: no result")
    if r is None:
        continue
    micro = r["args"]["micro_batch"]
    for name, s in r["summary"].items():
        mfu = f", MFU {s['mfu']:.1%}" if math.isfinite(s.get("mfu", math.nan)) else ""
        verdict = ""
        if name == "sparknet":
            verdict = "  PASS (>= 800k, target set for an H100)" if s["tokens_per_s"] >= 800e3 else \
                "  below the 800k H100 target"
        print(f"compile {compile:<3} micro {micro:<3} {name:<10} {s['tokens_per_s']:>12,.0f} tokens/s{mfu}{verdict}")
    for k, v in r["ratios"].items():
        print(f"compile {compile:<3} {k}: {v:+.2%}" if k.startswith("overhead") else f"compile {compile:<3} {k}: {v:.3f}x")
for mode in ("eager", "compiled"):
    m = result(f"memory-{mode}.json", f"memory {mode}: no result (see memory-{mode}.log)")
    if m is None:
        continue
    print(f"memory {mode:<8} gpt2-70m micro {m['micro_batch']} x {m['seq_len']}: max_memory_allocated "
          f"{m['measured_bytes'] / 2**30:.2f} GiB, estimate {m['estimate_bytes'] / 2**30:.2f} GiB "
          f"(measured/estimate {m['ratio']:.2f}{'' if m['compiled'] or mode == 'eager' else '; compile fell back to eager'})")
for name in ("downstream-200.log", "downstream-full.log"):
    if (out / name).exists():
        last = [line for line in (out / name).read_text().splitlines() if line.startswith("all ")]
        print(f"{name[:-4]}: {last[-1] if last else 'no result'}")
for e in json.loads((out / "eval.json").read_text()):
    print(f"eval {e['protocol']} stride {e['details']['stride_tokens']}: {e['seconds']:.2f} s "
          f"(target <= 5 s on an H100), ppl {e['perplexity']:.0f} (random weights)")
EOF
