"""One comparison, start to end: read the runs from MLflow (after replaying what a downed server missed), choose the
protocols, build the rows from the row sources, write compare.md / compare.csv / perplexity.png and log them as a
run in the `sparknet-compare` experiment."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparknet.compare.options import CompareOptions
from sparknet.compare.render import comparison_frame, markdown_report, write_files
from sparknet.compare.rows import RowContext, build_rows
from sparknet.compare.runs import RUN_TAG, TRIALS_BEST, select_trials
from sparknet.compare.table import Row, sort_protocols
from sparknet.errors import SparknetError
from sparknet.evaluate import DEFAULT_PROTOCOLS, parse_protocols

if TYPE_CHECKING:
    import pandas as pd

COMPARE_EXPERIMENT = "sparknet-compare"


@dataclass
class Comparison:
    frame: pd.DataFrame
    rows: list[Row]
    protocols: list[str]
    out_dir: Path
    files: dict[str, Path]
    uri: str
    mlflow_run_id: str | None = None
    trials_left_out: dict[str, int] = field(default_factory=dict)  # study -> trials not in the table


def _describe_filters(opts: CompareOptions, uri: str) -> str:
    parts = [f"experiments {', '.join(opts.experiments)}" if opts.experiments
             else f"all experiments but {COMPARE_EXPERIMENT}"]
    if opts.tags:
        parts.append("tags " + ", ".join(f"{k}={v}" for k, v in opts.tags.items()))
    if opts.run_ids:
        parts.append(f"run ids {', '.join(opts.run_ids)}")
    return f"{'; '.join(parts)} at {uri}"


def describe_trials(left_out: dict[str, int], mode: str) -> str:
    """One line on the trials not in the table ("" when none were left out)."""
    if not left_out:
        return ""
    n = sum(left_out.values())
    studies = ", ".join(f"{s} ({k})" for s, k in sorted(left_out.items()))
    more = "--include-trials shows every trial" + ("" if mode == TRIALS_BEST else ", --best-trials one per study")
    what = "other trials" if mode == TRIALS_BEST else "sweep/ablation trials"
    return f"{n} {what} left out, of studies {studies} ({more})"


def _out_dir(opts: CompareOptions) -> Path:
    if opts.out is not None:
        out = Path(opts.out)
        if out.exists() and not out.is_dir():
            raise SparknetError(f"--out {out}: is a file, not a folder (fix: name a new or existing folder; the "
                                f"comparison writes compare.md, compare.csv and perplexity.png into it)")
        return out
    base = opts.lab / "compare" / time.strftime("%Y%m%d-%H%M%S")
    out, n = base, 1
    while out.exists():  # two compares in the same second keep both
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def compare(opts: CompareOptions, log: Any = print) -> Comparison:
    """Read the runs, build every row, write compare.md / compare.csv / perplexity.png and log them."""
    from sparknet import tracking

    uri = tracking.resolve_uri(opts.tracking_uri, opts.lab)
    tracking.check_store(uri)
    if opts.protocols:
        parse_protocols(opts.protocols)  # unknown names fail here, before any work
    out_dir = _out_dir(opts)  # a bad --out fails before any work too
    # Runs that ended while this store's server was down: their backlog and final status first.
    tracking.replay_lab(opts.lab, uri, timeout_s=opts.timeout_s, log=log)
    records, skipped = tracking.find_runs(
        uri, list(opts.experiments) or None, list(opts.run_ids), opts.tags, require_tag=RUN_TAG,
        exclude_experiments=(COMPARE_EXPERIMENT,), timeout_s=opts.timeout_s)
    records, trials_left, trial_notes = select_trials(records, opts.trials, opts.run_ids)
    if not records:
        left = [f"{n} {s.lower()}" for s, n in skipped.items()]
        if trials_left:
            left.append(f"{sum(trials_left.values())} sweep/ablation trials")
        why = f" ({', '.join(left)} left out: only finished runs that are not trials count unless named with " \
              f"--run-id, or --include-trials / --best-trials)" if left else ""
        raise SparknetError(f"no finished training runs match {_describe_filters(opts, uri)}{why} (fix: check the "
                            f"filters, or train one: python -m sparknet.run mixtures/quickstart.yaml)")

    found = {m.group(1) for r in records for k in r.metrics
             if (m := re.fullmatch(r"wikitext/(sparknet-blog|hf-strided-[1-9]\d*)/ppl", k))}
    protocols = sort_protocols(opts.protocols or (*DEFAULT_PROTOCOLS, *found))
    rows = build_rows(RowContext(opts, uri, protocols, records, trial_notes, log))
    frame = comparison_frame(rows, protocols)

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SparknetError(f"--out {out_dir}: cannot create it ({exc.strerror or exc}) (fix: name a folder in a "
                            f"writable place)") from None
    files = write_files(frame, protocols, out_dir, markdown_report(
        frame, runs=_describe_filters(opts, uri), baselines=opts.baselines,
        trials_line=describe_trials(trials_left, opts.trials), cache=opts.lab / "baselines"))
    result = Comparison(frame, rows, protocols, out_dir, files, uri, trials_left_out=trials_left)
    if opts.log:
        ids = [r.run_id for r in rows if r.run_id]
        result.mlflow_run_id = tracking.log_comparison(
            uri, COMPARE_EXPERIMENT, out_dir.name,
            params={"run_ids": ",".join(ids), "baselines": ",".join(opts.baselines), "protocols": ",".join(protocols),
                    "filters": _describe_filters(opts, uri),
                    "evaluate": (opts.evaluate_only or "all") if opts.evaluate else "no", "trials": opts.trials},
            tags={"sparknet.compare.num_runs": str(len(ids))}, files=list(files.values()), timeout_s=opts.timeout_s)
    return result
