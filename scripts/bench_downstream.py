"""Our downstream scorer against lm-evaluation-harness, side by side in one run: the same checkpoint, the same items,
items per second of each and their ratio, and the largest difference in any log-likelihood (a speed figure of a
scorer that disagrees would mean nothing).

    python scripts/bench_downstream.py                           # cpu-small proxy, 100 report items per task
    python scripts/bench_downstream.py --preset gpt2-70m --items 50 --full-estimate
    python scripts/bench_downstream.py --preset gpt2-70m --items all --device cuda     # the full default set on a GPU

The harness runs with its default batch size (1) and with `--harness-batch` (default 32), so the ratio is shown
against both. Weights are random (the time does not depend on them); the tokenizer is GPT-2's (offline).
`work`: the multiply-adds lm-eval spends over those we spend on the same requests (it runs every distinct input whole,
with the output layer at every position; we run a shared prefix once and the output layer at the answers only);
`ceiling`: lm-eval's over the least any exact scorer spends (ours, with each token attending to its ancestors only):
what an exact scorer can gain on the same kernels, beyond what lm-eval loses to its own overhead.
`--full-estimate`: the default task set at full size, from the exact token count of every report item's inputs
(after our scorer's de-duplication) at the tokens per second measured here; `--items all` measures it instead.
Data: --data DIR, else $SPARKNET_DOWNSTREAM, else ../shared/data/downstream, else generated items.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # downstream_data: generated items when no copy is here

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _data(arg: str | None) -> tuple[Path, str]:
    for cand in (arg, os.environ.get("SPARKNET_DOWNSTREAM"), str(ROOT.parent / "shared" / "data" / "downstream")):
        if cand and Path(cand).is_dir():
            return Path(cand), cand
    from downstream_data import write_downstream

    return write_downstream(Path(tempfile.mkdtemp()) / "ds", n=200), "generated (200 items a task)"


def _gpt(ckpt: Path, preset: str | None):
    """Our GPT and tokenizer for an exported checkpoint: what a run's own scoring uses (its model code, its tokenizer:
    tiktoken for GPT-2's BPE, else the checkpoint's tokenizer.json)."""
    import json

    from sparknet.config import ModelConfig, load_config
    from sparknet.model import load_exported
    from sparknet.tokenizer import HFTokenizer, TokenizerSpec, from_spec

    run_cfg = ckpt.parent / "config.yaml"
    if run_cfg.is_file():  # a run's final/: its own model config
        model_cfg = load_config(run_cfg).model
    else:
        hf = json.loads((ckpt / "config.json").read_text())
        model_cfg = ModelConfig(preset=preset or "cpu-small", n_positions=hf["n_positions"])
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    tok = from_spec(TokenizerSpec("gpt2")) if vocab == 50257 else HFTokenizer(str(ckpt))
    return load_exported(ckpt, model_cfg).eval(), tok


def _checkpoint(preset: str, out: Path) -> Path:
    import torch

    from sparknet.config import ModelConfig
    from sparknet.model import build_model, export_hf
    from sparknet.tokenizer import TokenizerSpec, from_spec

    tok = from_spec(TokenizerSpec("gpt2"))
    torch.manual_seed(0)
    export_hf(build_model(ModelConfig(preset=preset), tok.vocab_size, seed=0), out, tok.to_hf(),
              eos_token_id=tok.eot_id)
    return out


def work(requests, rows, n_layer: int, d: int, vocab: int) -> tuple[int, int, int]:
    """Multiply-adds on `requests` of lm-eval's HFLM, of our scorer, and of the least any exact scorer can do.
    lm-eval runs every distinct input (its logits cache merges identical ones) through the model, with the output layer
    at every position; we run each row's tokens once (a shared prefix once), attending over the whole row where it is
    branched (a dense mask), and the output layer only at the continuations' positions; the least is ours with every
    token attending to its ancestors only (a shared prefix's keys cached, causal kernels)."""
    body = 12 * n_layer * d * d  # attention projections (4 d^2) and the MLP (8 d^2), per token, over the layers

    def attn(n_keys: int) -> int:  # q.k and the weighted sum of v, over the layers
        return 2 * n_layer * d * n_keys

    theirs = sum(len(inp) * (body + d * vocab) + sum(attn(p + 1) for p in range(len(inp)))
                 for inp in {inp for inp, _ in requests})
    head = sum(len(cont) for _, cont in requests) * d * vocab
    least = head + sum(len(r.tokens) * body + sum(attn(p + 1) for p in r.positions) for r in rows)
    ours = head + sum(len(r.tokens) * (body + attn(len(r.tokens))) if r.branched
                      else len(r.tokens) * body + sum(attn(p + 1) for p in r.positions) for r in rows)
    return theirs, ours, least


def main() -> int:
    from sparknet.config.schema import DEFAULT_DOWNSTREAM

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--checkpoint", default=None, help="a saved run's final/ (or any checkpoint) instead of a "
                                                        "random model of --preset, e.g. the quickstart's (BPE 4,096)")
    ap.add_argument("--items", default="100", help="items per task, or all")
    ap.add_argument("--tasks", default=",".join(DEFAULT_DOWNSTREAM))
    ap.add_argument("--data", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--harness-batch", type=int, default=32)
    ap.add_argument("--scorer", choices=("gpt", "hf"), default="gpt",
                    help="gpt: our scorer on sparknet's own model and tokenizer, as a run and a study score (the "
                         "default); hf: our scorer on the transformers model lm-eval also loads")
    ap.add_argument("--no-harness", action="store_true", help="time our scorer only (e.g. the full set)")
    ap.add_argument("--full-estimate", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: this process's CPU seconds instead of wall seconds, for a machine other work shares "
                         "(the same threads on both sides, so the ratio stays fair)")
    args = ap.parse_args()

    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from sparknet.downstream.evaluation import fitting_items, load_task_items
    from sparknet.downstream.score import _inputs, encode_pairs, gpt_scoring_model, hf_scoring_model, score_pairs
    from sparknet.hf_models import load_hf_model

    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    root, where = _data(args.data)
    n = None if args.items == "all" else int(args.items)
    tasks = [t for t in args.tasks.split(",") if t]
    tmp = Path(tempfile.mkdtemp())
    ckpt = Path(args.checkpoint) if args.checkpoint else _checkpoint(args.preset, tmp / "model")
    model, tokenizer = load_hf_model(str(ckpt), device=args.device, dtype=torch.float32)
    if args.scorer == "gpt":
        gpt, tok = _gpt(ckpt, args.preset)
        ours = gpt_scoring_model(gpt.to(args.device), tok, args.device)
    else:
        ours = hf_scoring_model(model, tokenizer, args.device)
    loaded = load_task_items(tasks, role="report", n_items=n, root=root)
    for t in loaded:  # an answer longer than the context is scored by neither (runs leave such items out too)
        kept, _ = fitting_items(ours, t.items)
        if len(kept) < len(t.items):
            print(f"{t.name}: {len(t.items) - len(kept)} of {len(t.items)} items left out (an answer longer than "
                  f"the model's {ours.n_positions}-token context)")
            t.items = kept
    print(f"checkpoint {args.checkpoint or args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, context "
          f"{ours.n_positions}), ours on the {args.scorer} model, {args.device}, {torch.get_num_threads()} threads, {args.clock} seconds; data {where}; "
          f"{'all' if n is None else n} report items per task")
    harness = {}
    if not args.no_harness:
        harness = {bs: HFLM(pretrained=str(ckpt), dtype="float32", batch_size=bs, device=args.device)
                   for bs in (1, args.harness_batch)}
    from sparknet.downstream.score import MAX_ROW_TOKENS, _rows

    shape = gpt.shape if args.scorer == "gpt" else None

    macs = [0, 0, 0]  # lm-eval's, ours and the least, over every task

    def ceiling(pairs) -> str:  # lm-eval's work over ours, for our own model's shape
        if shape is None:
            return f"{'':>18}"
        requests = _inputs(encode_pairs(pairs, ours.encode, ours.prefix_token_id), ours.n_positions)
        rows = _rows(requests, max(ours.n_positions, MAX_ROW_TOKENS), ours.tree_mask)
        theirs, mine, least = work(requests, rows, shape.n_layer, shape.n_embd, shape.vocab_size)
        for i, v in enumerate((theirs, mine, least)):
            macs[i] += v
        return f"{theirs / mine:>9.1f}{theirs / least:>9.1f}"

    header = f"{'task':<16}{'items':>6}{'pairs':>7}{'ours s':>9}{'items/s':>9}{'work':>9}{'ceiling':>9}"
    for bs in harness:
        header += f"{f'lm-eval bs{bs} s':>17}{'ratio':>7}"
    print(header + f"{'max |dLL|':>11}")
    totals = {"ours": 0.0} | {bs: 0.0 for bs in harness}
    n_items = 0
    for t in loaded:
        pairs = [p for it in t.items for p in it.pairs]
        start = clock()
        mine = score_pairs(ours, pairs)
        s_ours = clock() - start
        totals["ours"] += s_ours
        n_items += len(t.items)
        line = f"{t.name:<16}{len(t.items):>6}{len(pairs):>7}{s_ours:>9.2f}{len(t.items) / s_ours:>9.1f}{ceiling(pairs)}"
        worst = 0.0
        for bs, lm in harness.items():
            start = clock()
            theirs = lm.loglikelihood([Instance("loglikelihood", {}, p, 0) for p in pairs], disable_tqdm=True)
            s = clock() - start
            totals[bs] += s
            worst = max(worst, max(abs(a[0] - b[0]) for a, b in zip(mine, theirs)))
            line += f"{s:>17.2f}{s / s_ours:>7.1f}"
        print(line + (f"{worst:>11.1e}" if harness else ""), flush=True)
    line = f"{'all':<16}{n_items:>6}{'':>7}{totals['ours']:>9.2f}{n_items / totals['ours']:>9.1f}"
    line += f"{macs[0] / macs[1]:>9.1f}{macs[0] / macs[2]:>9.1f}" if macs[1] else f"{'':>18}"
    for bs in harness:
        line += f"{totals[bs]:>17.2f}{totals[bs] / totals['ours']:>7.1f}"
    print(line)

    if args.full_estimate:
        def row_tokens(pairs):  # the tokens our scorer runs: inputs as tries per row, common prefixes once
            requests = _inputs(encode_pairs(pairs, ours.encode, ours.prefix_token_id), ours.n_positions)
            rows = _rows(requests, max(ours.n_positions, MAX_ROW_TOKENS), ours.tree_mask)
            return len(rows), sum(len(r.tokens) for r in rows)

        sample_tokens = sum(row_tokens([p for it in t.items for p in it.pairs])[1] for t in loaded)
        rate = sample_tokens / totals["ours"]
        print(f"\nfull default set (every item, role full): our scorer ran {rate:,.0f} row tokens/s here")
        total_s = 0.0
        for t in load_task_items(tasks, role="full", n_items=None, root=root):
            n_rows, tokens = row_tokens([p for it in t.items for p in it.pairs])
            total_s += tokens / rate
            print(f"  {t.name:<16}{len(t.items):>7,} items {n_rows:>8,} rows {tokens:>12,} tokens  "
                  f"~{tokens / rate / 60:,.1f} min")
        print(f"  estimated total ~{total_s / 60:,.1f} min ({total_s / 3600:.2f} h) on this machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
