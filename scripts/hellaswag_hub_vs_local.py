"""How far the preprocessed local HellaSwag copy moves the score against the hub version (needs the hub).

The local copy (shared/data/downstream/hellaswag, see its SOURCES.md) was extracted with the brackets already
stripped and `ctx_b` not capitalized, so its prompts can differ from the harness's hub prompts. This scores one model
on the same validation items from both (they are in the same order: item i is item i), and prints how many prompts
differ and acc, acc_norm and bpb on each, with the difference.

    python scripts/hellaswag_hub_vs_local.py --model gpt2 --items 2000
    python scripts/hellaswag_hub_vs_local.py --model lab/runs/<run>/final --data ../shared/data/downstream

Offline it stops at once with one line (the hub version cannot be read): the figure is not measured on this project's
machine, which has no hub access, and every output that shows HellaSwag from the local copy says so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    from sparknet.downstream.metrics import score_items
    from sparknet.downstream.score import hf_scoring_model, score_pairs
    from sparknet.downstream.tasks import TASKS, data_dir, hub_rows, read_rows, subset
    from sparknet.errors import SparknetError
    from sparknet.hf_models import load_hf_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--data", default=None, help="the local copy (default $SPARKNET_DOWNSTREAM)")
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    spec = TASKS["hellaswag"]
    try:
        root = data_dir(args.data, field="--data")
        if root is None:
            raise SparknetError("--data: no local copy given (fix: --data DIR or SPARKNET_DOWNSTREAM=DIR)")
        local = read_rows(root / spec.folder / spec.files["halves"])
        hub = hub_rows(spec, "halves")
    except SparknetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if len(hub) != len(local):
        print(f"error: the hub has {len(hub)} items, the local copy {len(local)}: not the same split", file=sys.stderr)
        return 2
    items = {name: [spec.build(r, i, []) for i, r in enumerate(rows)] for name, rows in (("local", local), ("hub", hub))}
    chosen = {it.index for it in subset(items["local"], args.items)}
    items = {k: [it for it in v if it.index in chosen] for k, v in items.items()}
    differ = sum(a.pairs != b.pairs for a, b in zip(items["local"], items["hub"]))
    print(f"{len(chosen)} items; prompts differ on {differ} ({differ / len(chosen):.1%})")
    model = hf_scoring_model(*load_hf_model(args.model, device=args.device), device=args.device)
    figures = {}
    for name, its in items.items():
        scores = score_items("hellaswag", spec.kind, its, score_pairs(model, [p for it in its for p in it.pairs]))
        figures[name] = scores.metrics
        print(f"{name:<6} " + "  ".join(f"{m} {v:.4f}" for m, v in sorted(scores.metrics.items())))
    print("local - hub: " + "  ".join(f"{m} {figures['local'][m] - figures['hub'][m]:+.4f}" for m in sorted(figures["hub"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
