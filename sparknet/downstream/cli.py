"""`python -m sparknet.evaluate downstream RUN_OR_CHECKPOINT [--tasks ...]`: any saved run, exported checkpoint or
Hugging Face model id (gpt2, codelion/gpt-2-70m when the hub is reachable) on the downstream tasks.

Everything a user can get wrong (an unknown task, a missing or malformed task file, a checkpoint without a
tokenizer, more shots than the pool holds, an items count that is not a number) is one line with the fix, exit 2,
before any model is loaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sparknet import atomic
from sparknet.errors import ArgumentParser, SparknetError, at_least, cli_main

ENGINES = ("sparknet", "lm-eval")


def _items(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise SparknetError(f"--items: {text!r} is not a number (fix: a positive whole number such as 500, or all)")
    return int(text)


def _tasks(text: str) -> list[str]:
    from sparknet.downstream.tasks import task_spec

    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise SparknetError("--tasks: no task named (fix: a comma-separated list such as arc_easy,piqa)")
    for name in names:
        task_spec(name, field="--tasks")
    return names


def resolve_model(target: str) -> tuple[str, str]:
    """(what to load, what it is): a run folder's final model, a checkpoint folder, or a hub id. A local folder
    must hold a model and its tokenizer; checked before anything is loaded."""
    path = Path(target)
    if path.exists():
        if not path.is_dir():
            raise SparknetError(f"{target}: not a folder (fix: a run folder, its final/ checkpoint, or a hub id)")
        if (path / "final").is_dir():
            path = path / "final"
        if not (path / "config.json").is_file():
            raise SparknetError(f"{path}: no config.json, so not a checkpoint (fix: a finished run's folder, its "
                                f"final/ folder, or a hub id such as gpt2)")
        if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer.model")):
            raise SparknetError(f"{path}: the checkpoint has no tokenizer (tokenizer.json) (fix: export it with its "
                                f"tokenizer, e.g. save_pretrained of the tokenizer it was trained with, into it)")
        return str(path), "checkpoint"
    if target.count("/") > 1 or target.startswith((".", "/", "~")):
        raise SparknetError(f"{target}: no such folder (fix: a run folder, a checkpoint folder, or a hub id such "
                            f"as gpt2)")
    return target, "hub"


def parser() -> ArgumentParser:
    from sparknet.config.schema import DEFAULT_DOWNSTREAM, DOWNSTREAM_TASKS

    ap = ArgumentParser(prog="python -m sparknet.evaluate downstream",
                        description="A saved run, checkpoint or hub model on downstream tasks, scored as "
                                    "lm-evaluation-harness scores them.")
    ap.add_argument("model", help="a run folder (its final/ model), a checkpoint folder, or a hub id (gpt2)")
    ap.add_argument("--tasks", type=_tasks, default=list(DEFAULT_DOWNSTREAM),
                    help=f"comma-separated, from {', '.join(DOWNSTREAM_TASKS)} (default: {','.join(DEFAULT_DOWNSTREAM)})")
    ap.add_argument("--items", type=_items, default=None, help="items per task: a seeded stratified subset, or all "
                                                               "(the default)")
    ap.add_argument("--split", choices=("report", "select", "full"), default="report",
                    help="report: items never used to choose a model (default); select: the ones studies choose "
                         "by; full: every item, as model cards count them")
    ap.add_argument("--shots", type=at_least(0, 5), default=5, help="few-shot examples for mmlu (default 5)")
    ap.add_argument("--engine", choices=ENGINES, default="sparknet",
                    help="sparknet: our batched scorer (tested equal to the harness); lm-eval: the harness itself")
    ap.add_argument("--data", default=None, help="local task files (default: $SPARKNET_DOWNSTREAM, else the hub)")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when there is one)")
    ap.add_argument("--out", default=None, help="write the results as JSON here (and a markdown table beside it)")
    return ap


@cli_main
def main(argv: list[str] | None = None) -> int:
    from sparknet.downstream.tasks import check_data, resolve_data

    args = parser().parse_args(argv)
    load, kind = resolve_model(args.model)
    root = resolve_data(args.data, field="--data")
    check_data(args.tasks, args.data, args.shots if "mmlu" in args.tasks else 0)
    if args.device:
        from sparknet.device import check_scoring_device

        check_scoring_device(args.device)
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise SparknetError(f"--out {out}: is a folder (fix: a file name such as downstream.json)")

    from sparknet.downstream.evaluation import load_task_items

    loaded = load_task_items(args.tasks, role=args.split, n_items=args.items, shots=args.shots, root=root)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"downstream: {load} ({kind}) on {', '.join(args.tasks)}; {args.split} items, "
          f"{'all' if args.items is None else args.items} per task, engine {args.engine}, {device}", flush=True)
    if args.engine == "lm-eval":
        results = _with_harness(load, args, root, device, loaded)
    else:
        from sparknet.downstream.evaluation import evaluate_tasks
        from sparknet.downstream.score import hf_scoring_model
        from sparknet.hf_models import load_hf_model

        model, tokenizer = load_hf_model(load, device=device, dtype=torch.float32)
        results = evaluate_tasks(hf_scoring_model(model, tokenizer, device), args.tasks, role=args.split, root=root,
                                 echo=print, loaded=loaded)
    from sparknet.downstream.evaluation import table

    text = table(results)
    print()
    print(text)
    if out is not None:
        atomic.write_json(out, {"model": load, "kind": kind, "results": [r.to_dict() for r in results]})
        atomic.write_bytes(out.with_suffix(".md"), (text + "\n").encode())
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def _with_harness(load: str, args, root, device: str, loaded):
    """The same items through lm-eval itself (slower; the reference)."""
    import tempfile
    import time

    from sparknet.downstream import harness
    from sparknet.downstream.evaluation import task_result
    from sparknet.downstream.metrics import score_items
    from sparknet.downstream.tasks import TASKS

    results = []
    with tempfile.TemporaryDirectory(prefix="sparknet-lm-eval-") as tmp:
        items_by_task = {t.name: t.items for t in loaded}
        shots = {t.name: t.shots for t in loaded}
        include = harness.write_task_configs(items_by_task, Path(tmp), root, shots, role=args.split)
        start = time.perf_counter()
        ran = harness.run_harness(load, list(items_by_task), include, device=device, shots=shots)
        seconds = time.perf_counter() - start
        for t in loaded:
            flat = [(ll, g) for s in ran[t.name].samples for ll, g in zip(s.loglikelihoods, s.is_greedy)]
            scores = score_items(t.name, TASKS[t.name].kind, t.items, flat)
            results.append(task_result(t, args.split, scores, seconds / len(loaded), root, engine="lm-eval"))
            print(json.dumps({"task": t.name, "harness": ran[t.name].metrics}), file=sys.stderr)
    return results
