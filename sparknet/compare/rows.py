"""The table's rows, gathered from a list of row sources: measured runs, measured baselines, reported figures.

A row source is one kind of thing the table holds. Each adds to the table being built, in the order of
`ROW_SOURCES`: rows of its own (the three here), or, for a source of further numbers (downstream tasks, say),
values in `Row.columns` of the rows already there. A new kind plugs in as one more entry of `ROW_SOURCES`; the
frame, the renderings and the CLI need no change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

from sparknet.compare.baselines import WikitextShas, baseline_row
from sparknet.compare.downstream import DownstreamRows
from sparknet.compare.options import CompareOptions
from sparknet.compare.reported import reported_rows
from sparknet.compare.runs import TRIALS_BEST, objective_value, run_row
from sparknet.compare.table import WIKITEXT_VALIDATION, Row, bpb_protocols


@dataclass
class RowContext:
    """What a row source may read: what was asked, the MLflow store, the table's protocols, the runs selected (and
    the notes of the trials among them), and where progress lines go."""

    opts: CompareOptions
    uri: str
    protocols: list[str]
    records: list[Any] = field(default_factory=list)  # sparknet.tracking's run records, trials already selected
    trial_notes: dict[str, str] = field(default_factory=dict)  # run id -> the note of a kept trial
    log: Any = print


class RowSource(Protocol):
    def add(self, rows: list[Row], ctx: RowContext) -> None:
        """Append this source's rows to `rows`, or add its values to the rows already there."""


class RunRows:
    """The measured runs (scored with --evaluate unless it is `--evaluate baselines`), best first by the comparable
    number (bits per byte at the longest stride), then by the first protocol's perplexity; stable, so ties keep the
    order MLflow gave."""

    def add(self, rows: list[Row], ctx: RowContext) -> None:
        opts, protocols = ctx.opts, ctx.protocols
        built = []
        for r in ctx.records:
            row = run_row(r, protocols, uri=ctx.uri, evaluate=opts.evaluate and opts.evaluate_only != "baselines",
                          wikitext=opts.wikitext, device=opts.device,
                          batch_size=opts.batch_size, log=ctx.log, asked=bool(opts.protocols))
            if r.run_id in ctx.trial_notes:
                row.notes.insert(0, ctx.trial_notes[r.run_id])
                if opts.trials == TRIALS_BEST and objective_value(r)[0] == "wikitext-valid/bpb":
                    row.tuned_on = WIKITEXT_VALIDATION  # the best of its study on WikiText-2 validation: selected on it
            built.append(row)
        bpb_p = (bpb_protocols(protocols) or [None])[-1]
        built.sort(key=lambda r: (r.wikitext.get(bpb_p, {}).get("bpb", math.inf) if bpb_p else math.inf,
                                  r.wikitext.get(protocols[0], {}).get("ppl", math.inf)))
        rows += built


class BaselineRows:
    """The measured baselines, in the order asked (scored with --evaluate unless it is `--evaluate runs`)."""

    def add(self, rows: list[Row], ctx: RowContext) -> None:
        opts = ctx.opts
        shas = WikitextShas(opts.wikitext)
        rows += [baseline_row(b, ctx.protocols, lab=opts.lab, evaluate=opts.evaluate and opts.evaluate_only != "runs",
                              wikitext=opts.wikitext, shas=shas,
                              device=opts.device, batch_size=opts.batch_size, log=ctx.log) for b in opts.baselines]


class ReportedRows:
    """The published figures under the table's protocols, unless --no-reported."""

    def add(self, rows: list[Row], ctx: RowContext) -> None:
        if ctx.opts.reported:
            rows += reported_rows(ctx.protocols)


ROW_SOURCES: tuple[RowSource, ...] = (RunRows(), BaselineRows(), ReportedRows(), DownstreamRows())


def build_rows(ctx: RowContext, sources: tuple[RowSource, ...] = ROW_SOURCES) -> list[Row]:
    """Every row of the table: each source in turn adds to what the ones before it built."""
    rows: list[Row] = []
    for source in sources:
        source.add(rows, ctx)
    return rows
