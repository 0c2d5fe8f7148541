"""python -m sparknet.compare: one table of our runs, baseline models and published figures on WikiText-2.

The command line: its flags into a `CompareOptions`, the comparison, then the compact (or --wide) table, the
trials left out, the baselines left unscored and where the files went; `--check-hub` only probes the hub.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from sparknet.compare.baselines import DEFAULT_BASELINES, missing_folder, split_baseline
from sparknet.compare.comparison import COMPARE_EXPERIMENT, compare, describe_trials
from sparknet.compare.options import CompareOptions
from sparknet.compare.render import terminal_width, to_text, to_text_wide
from sparknet.compare.runs import TRIALS_ALL, TRIALS_BEST, TRIALS_NONE
from sparknet.compare.table import KIND_BASELINE
from sparknet.device import check_scoring_device
from sparknet.errors import ArgumentParser, SparknetError, cli_main
from sparknet.evaluate import DEFAULT_PROTOCOLS, EVAL_DTYPE, WIKITEXT_ENV, find_local_file
from sparknet.hub import hub_unreachable

HUB_PROBE_S = 4.0  # the whole probe, name lookup included: offline must be known within 5 s


def parse_tags(items: Sequence[str]) -> dict[str, str]:
    tags = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise SparknetError(f"--tag {item!r}: expected KEY=VALUE (fix: e.g. --tag sparknet.mixture=quickstart)")
        tags[key.strip()] = value
    return tags


def check_evaluate_inputs(opts: CompareOptions, args) -> None:
    """What `--evaluate` will need, checked before any model is loaded: a device that exists here, a local WikiText-2
    copy that holds both splits when one is named, and every extra baseline that is meant as a folder present.
    Without this a typo ends, minutes later, in a table whose every row has a note and exit 0."""
    if opts.device:
        check_scoring_device(opts.device)
    local = opts.wikitext or os.environ.get(WIKITEXT_ENV)
    if local:
        where = "--wikitext" if opts.wikitext else WIKITEXT_ENV
        try:
            for split in ("test", "validation"):
                find_local_file(local, split)
        except SparknetError as exc:
            raise SparknetError(f"{where}: {exc}") from None
    for spec in args.baseline:
        if missing_folder(split_baseline(spec)[0]):
            raise SparknetError(f"--baseline {spec}: no such model folder (fix: the path of a saved model folder, "
                                f"or a hub id such as openai-community/gpt2)")


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m sparknet.compare", description=__doc__.split("\n")[0])
    ap.add_argument("--experiment", action="append", default=[], metavar="NAME",
                    help="MLflow experiment to read runs from (repeatable; default: all but sparknet-compare)")
    ap.add_argument("--run-id", action="append", default=[], metavar="ID",
                    help="a run to include whatever its experiment, tags, status or trial-ness (repeatable)")
    ap.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                    help="keep only runs with this tag value, e.g. sparknet.mixture=quickstart (repeatable)")
    trials = ap.add_mutually_exclusive_group()
    trials.add_argument("--include-trials", action="store_true",
                        help="include every sweep/ablation trial (default: trials are left out, and counted)")
    trials.add_argument("--best-trials", action="store_true",
                        help="include one row per sweep/ablation study: its finished trial with the lowest value "
                             "of the study's objective (tag sparknet.objective; default the mean validation loss)")
    ap.add_argument("--baseline", action="append", default=[], metavar="ID_OR_PATH",
                    help="extra baseline: a hub id (ID@REVISION pins one) or a local model folder (repeatable)")
    ap.add_argument("--no-default-baselines", action="store_true",
                    help=f"leave out {' and '.join(DEFAULT_BASELINES)}")
    ap.add_argument("--no-reported", action="store_true", help="leave out the published reference rows")
    ap.add_argument("--protocols", default="", metavar="P1,P2",
                    help=f"WikiText-2 protocols (default: {','.join(DEFAULT_PROTOCOLS)} plus any the runs have)")
    ap.add_argument("--evaluate", nargs="?", const="all", choices=("all", "runs", "baselines"), default=None,
                    metavar="runs|baselines",
                    help="score what is missing: uncached baselines, and runs without WikiText-2 results (logged "
                         f"back to the run) or with results in another dtype than {EVAL_DTYPE}; `--evaluate runs` "
                         "scores only the runs (GPT-2: tens of minutes on 2 CPU cores, seconds on a GPU)")
    ap.add_argument("--wikitext", default=None, metavar="DIR",
                    help="local WikiText-2 copy (default: $SPARKNET_WIKITEXT, else the hub)")
    ap.add_argument("--tracking-uri", default="", metavar="URI",
                    help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<lab>/mlflow.db)")
    ap.add_argument("--lab", default="lab", metavar="DIR", help="the lab folder (default: lab)")
    ap.add_argument("--name", default=None, help="name of the comparison: output in <lab>/compare/NAME and the "
                    "MLflow run's name (default: the date and time)")
    ap.add_argument("--out", default=None, metavar="DIR", help="output folder (default: <lab>/compare/<name>)")
    ap.add_argument("--no-log", action="store_true", help=f"do not log the comparison to {COMPARE_EXPERIMENT}")
    ap.add_argument("--wide", action="store_true",
                    help="print every column (as in compare.csv and compare.md), not the compact table")
    ap.add_argument("--device", default=None, help="device for --evaluate (default: cuda if available, else cpu)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass for --evaluate")
    ap.add_argument("--check-hub", action="store_true",
                    help=f"only say whether the Hugging Face hub answers (one probe, at most {HUB_PROBE_S:g} s): "
                         f"exit 0 if it does, 1 if not (scripts/quickstart.sh uses it)")
    args = ap.parse_args(argv)
    if args.check_hub:
        down = hub_unreachable(HUB_PROBE_S)
        print(f"the Hugging Face hub is not reachable: {down}" if down else "the Hugging Face hub answers")
        return 1 if down else 0
    if args.batch_size < 1:
        raise SparknetError(f"--batch-size {args.batch_size}: must be >= 1 (fix: --batch-size 8)")
    if args.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", args.name):
        raise SparknetError(f"--name {args.name!r}: not a safe folder name (fix: letters, digits, '.', '_', '-')")
    out = Path(args.out) if args.out else Path(args.lab) / "compare" / args.name if args.name else None
    opts = CompareOptions(
        lab=Path(args.lab), tracking_uri=args.tracking_uri, experiments=tuple(args.experiment),
        run_ids=tuple(args.run_id), tags=parse_tags(args.tag),
        trials=TRIALS_ALL if args.include_trials else TRIALS_BEST if args.best_trials else TRIALS_NONE,
        baselines=tuple(dict.fromkeys(([] if args.no_default_baselines else list(DEFAULT_BASELINES)) + args.baseline)),
        protocols=tuple(p.strip() for p in args.protocols.split(",") if p.strip()), reported=not args.no_reported,
        evaluate=args.evaluate is not None, evaluate_only="" if args.evaluate in (None, "all") else args.evaluate,
        wikitext=args.wikitext, out=out, log=not args.no_log,
        device=args.device, batch_size=args.batch_size)
    if opts.evaluate:
        check_evaluate_inputs(opts, args)
    if opts.evaluate:  # a progress bar per model load is noise next to our one line per evaluation
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    result = compare(opts, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(to_text_wide(result.frame, terminal_width()) if args.wide else to_text(result.frame, result.protocols))
    trials_line = describe_trials(result.trials_left_out, opts.trials)
    if trials_line:
        print(trials_line)
    unscored = [r.model for r in result.rows if r.kind == KIND_BASELINE and len(r.wikitext) < len(result.protocols)
                and not any("no such model folder" in n or "cannot read" in n for n in r.notes)]
    if unscored and opts.evaluate_only == "runs":
        print(f"baselines not scored (--evaluate runs): {', '.join(unscored)}; `python -m sparknet.compare "
              f"--evaluate baselines` scores them once (cached; GPT-2: tens of minutes on 2 CPU cores, seconds on a GPU)")
    print(f"\nwritten: {', '.join(str(p) for p in result.files.values())}")
    if result.mlflow_run_id:
        print(f"logged: run {result.mlflow_run_id} in experiment {COMPARE_EXPERIMENT!r} at {result.uri}")
    return 0

