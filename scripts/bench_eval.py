"""Time the hf-strided WikiText-2 evaluation (`sparknet.evaluate.eval_hf_strided`) on the test split.

What runs: a randomly initialised `transformers.GPT2LMHeadModel` of the preset's shape (vocab 50,257, SDPA
attention, eval mode; bf16 autocast on cuda) is scored with the hf-strided protocol over
`"\\n\\n".join(test rows)` (287,644 GPT-2 tokens), at each stride of `--strides`. The weights are random, so the
perplexity printed (about the vocab size) only shows the run is sane; the time is the point.

- cpu-small: 4 layers, 4 heads, d 128, context 256 (strides above 256 run at 256: see `stride_clamped`).
- gpt2-70m:  12 layers, 8 heads, d 512, context 1024 (CodeLion's shape). Target: <= 5 s per stride on an H100.

Timed separately: building the tokenizer (tiktoken GPT-2, offline), tokenizing the joined text, and each
stride's evaluation (forward passes + loss, ending with a device sync). On cuda one small warm-up evaluation
runs first, so kernel selection and the allocator's first growth are not timed.

Run (from the repository root):

    .venv/bin/python scripts/bench_eval.py --preset cpu-small --device cpu
    .venv/bin/python scripts/bench_eval.py --preset gpt2-70m --device cuda --batch-size 16

Exit code: 0 (PASS / ABOVE TARGET is printed for gpt2-70m on cuda), 2 if the WikiText-2 copy is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from sparknet.errors import SparknetError, cli_main  # noqa: E402

DEFAULT_WIKITEXT = REPO_ROOT.parent / "shared" / "data" / "wikitext-2-raw"
PRESETS = {
    "cpu-small": {"n_layer": 4, "n_head": 4, "n_embd": 128, "n_positions": 256},
    "gpt2-70m": {"n_layer": 12, "n_head": 8, "n_embd": 512, "n_positions": 1024},
}
VOCAB = 50257
TARGET_SECONDS_H100 = 5.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--wikitext", default=os.environ.get("SPARKNET_WIKITEXT") or str(DEFAULT_WIKITEXT),
                   help="local WikiText-2 copy (folder or file); default $SPARKNET_WIKITEXT or %(default)s")
    p.add_argument("--strides", default="512,1024", help="comma-separated strides (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows per forward pass (default 16 on cuda, 8 on cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens (a quick smoke run)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    return p.parse_args(argv)


def build_model(preset: str, device: str):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, attn_implementation="sdpa", **PRESETS[preset])
    model = GPT2LMHeadModel(config).eval().to(device)
    if device == "cuda":
        def logits_fn(ids):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model(input_ids=ids, use_cache=False).logits
    else:
        def logits_fn(ids):
            return model(input_ids=ids, use_cache=False).logits
    params = sum(p.numel() for p in model.parameters())
    return logits_fn, config.n_positions, params


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    from sparknet import evaluate as ev
    from sparknet.tokenizer import TokenizerSpec, from_spec

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SparknetError("--device cuda: no CUDA GPU is visible to torch (fix: --device cpu)")
    batch_size = args.batch_size or (16 if args.device == "cuda" else 8)
    strides = [int(s) for s in args.strides.split(",") if s.strip()]

    rows, source = ev.load_wikitext_with_source("test", args.wikitext)
    text = "\n\n".join(rows)
    started = time.perf_counter()
    tokenizer = from_spec(TokenizerSpec("gpt2", "", "main"))
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    ids = tokenizer.encode_batch([text])[0]
    tokenize_s = time.perf_counter() - started
    tokenized = len(ids)
    text_bytes = len(text.encode("utf-8"))
    if args.max_tokens:
        ids = ids[:args.max_tokens]
        text_bytes = len(tokenizer.decode(ids).encode("utf-8"))

    logits_fn, n_positions, params = build_model(args.preset, args.device)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"preset {args.preset}: {params / 1e6:.1f}M parameters, context {n_positions}, device {device_name}, "
          f"batch {batch_size} windows")
    print(f"data {source}: {len(rows)} rows, {text_bytes:,} bytes, canonical "
          f"{ev.rows_sha256(rows) == ev.WIKITEXT_SHA256['test']}")
    print(f"tokenizer build {build_s:.2f} s; tokenize {tokenized:,} tokens in {tokenize_s:.2f} s "
          f"({tokenized / tokenize_s / 1e6:.2f} M tokens/s)" + (f"; scoring the first {len(ids):,}" if args.max_tokens
                                                              else ""))

    if args.device == "cuda":  # warm-up: kernels, cuBLAS handles, allocator growth
        ev.eval_hf_strided(logits_fn, ids[:n_positions * batch_size + 1], VOCAB, n_positions, n_positions,
                           device=args.device, batch_size=batch_size)

    results = []
    print(f"{'protocol':<17} {'stride':>6} {'windows':>7} {'scored tok':>10} {'fwd tok':>9} {'seconds':>8} "
          f"{'scored tok/s':>12} {'fwd tok/s':>10} {'ppl':>9} {'bpb':>6}")
    for stride in strides:
        r = ev.eval_hf_strided(logits_fn, ids, VOCAB, n_positions, stride, device=args.device,
                               batch_size=batch_size, text_bytes=text_bytes)
        # Positions that went through the model: overlapping windows (stride < context) recompute context.
        forward_tokens = sum(end - begin for begin, end, _ in
                             ev.strided_windows(len(ids), n_positions, r.details["stride_tokens"]))
        print(f"{r.protocol:<17} {r.details['stride_tokens']:>6} {r.details['windows']:>7} {r.tokens:>10,} "
              f"{forward_tokens:>9,} {r.seconds:>8.2f} {r.tokens / r.seconds:>12,.0f} "
              f"{forward_tokens / r.seconds:>10,.0f} {r.perplexity:>9.1f} {r.bits_per_byte:>6.3f}")
        results.append({**r.to_dict(), "forward_tokens": forward_tokens, "preset": args.preset,
                        "device": device_name, "batch_size": batch_size, "tokenize_seconds": tokenize_s})
        if args.preset == "gpt2-70m" and args.device == "cuda":
            verdict = "PASS" if r.seconds <= TARGET_SECONDS_H100 else "ABOVE TARGET"
            print(f"  {verdict}: {r.seconds:.2f} s vs target {TARGET_SECONDS_H100:.0f} s (target set for an H100)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
