"""Downstream columns of the table: each measured run's task figures (from its MLflow metrics
`downstream/<task>/<metric>`), and the downstream figures others published, as rows of their own.

Columns per task, bpb first: `<task> bpb`, `<task> acc_norm`, `<task> acc` (where the task has them), each followed
by its standard error (`... ±`). Published figures go in `<task> reported %` columns of reported rows only, never in
a measured cell: a card's "HellaSwag 27.03" does not say whether it is acc or acc_norm, or on which items.
The reported rows appear when at least one measured row has downstream figures (otherwise there is nothing to
set them beside).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sparknet.compare.table import KIND_REPORTED, KIND_RUN, Row

METRICS = ("bpb", "acc_norm", "acc")
TUNED_NOTE = "downstream figures on report items (disjoint from the items studies select by)"


@dataclass(frozen=True)
class ReportedDownstream:
    model: str
    who: str
    figures: tuple[tuple[str, float], ...]  # (task, accuracy in percent, as published)
    approximate: bool = False
    note: str = ""


# DESIGN.md, "Reference facts": accuracies in percent, 0-shot unless the note says otherwise.
REPORTED_DOWNSTREAM: tuple[ReportedDownstream, ...] = (
    ReportedDownstream("CodeLion gpt-2-70m", "model card",
                       (("mmlu", 24.11), ("hellaswag", 27.03), ("arc_challenge", 21.67), ("piqa", 57.29),
                        ("winogrande", 51.46), ("truthfulqa_mc2", 47.31)),
                       note="codelion/gpt-2-70m card: MMLU 5-shot, the rest 0-shot; full sets; acc or acc_norm "
                            "not stated"),
    ReportedDownstream("GPT-2 (openai-community/gpt2)", "CodeLion's model card",
                       (("mmlu", 26.0), ("hellaswag", 30.0), ("arc_challenge", 24.0), ("piqa", 63.0),
                        ("winogrande", 51.0)), approximate=True,
                       note="the GPT-2 column of codelion/gpt-2-70m's card, rounded to whole percent"),
    ReportedDownstream("GPT-2 124M", "lm-evaluation-harness (published)",
                       (("piqa", 62.89), ("winogrande", 51.61), ("lambada_openai", 32.56)),
                       note="lm-eval figures published for GPT-2 124M; LAMBADA (OpenAI) perplexity 40.06"),
    ReportedDownstream("Pythia-70M", "lm-evaluation-harness (published)",
                       (("piqa", 59.85), ("winogrande", 51.22), ("lambada_openai", 21.40)),
                       note="lm-eval figures published for Pythia-70M; LAMBADA (OpenAI) perplexity 140.81"),
)


def downstream_of(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """task -> {metric: value} from MLflow metrics named downstream/<task>/<metric>."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "downstream":
            out.setdefault(parts[1], {})[parts[2]] = value
    return out


def add_columns(row: Row, figures: dict[str, dict[str, float]]) -> None:
    for task in sorted(figures):
        got = figures[task]
        for m in METRICS:
            if m in got:
                row.columns[f"{task} {m}"] = got[m]
                row.columns[f"{task} {m} ±"] = got.get(f"{m}_stderr", math.nan)


class DownstreamRows:
    """Downstream columns for the measured runs; the published downstream rows beside them."""

    def add(self, rows: list[Row], ctx) -> None:
        by_id = {r.run_id: r for r in ctx.records}
        measured = False
        for row in rows:
            if row.kind != KIND_RUN or row.run_id not in by_id:
                continue
            figures = downstream_of(by_id[row.run_id].metrics)
            if figures:
                measured = True
                add_columns(row, figures)
                tags = by_id[row.run_id].tags
                items = tags.get("sparknet.downstream_items", "")
                if items and items != "all":
                    row.notes.append(f"downstream: seeded {items}-item subsets of each task's report items")
                if "hellaswag" in figures and tags.get("sparknet.downstream_source", "hub") != "hub":
                    row.notes.append("HellaSwag: the local preprocessed copy (brackets stripped, ctx_b not "
                                     "capitalized; see sparknet.downstream.tasks)")
        if measured and ctx.opts.reported:
            rows += reported_downstream_rows()


def reported_downstream_rows() -> list[Row]:
    out = []
    for rep in REPORTED_DOWNSTREAM:
        row = Row(KIND_REPORTED, f"reported ({rep.who})", rep.model, approximate=rep.approximate,
                  notes=[rep.note] if rep.note else [])
        for task, pct in rep.figures:
            row.columns[f"{task} reported %"] = pct
        out.append(row)
    return out


def downstream_text(frame, width: int = 120) -> str:
    """The terminal's downstream block under the compact table: each row with downstream figures (numbered as the
    table above numbers it), per task the correct-answer bpb with acc_norm (acc where the task has no acc_norm) in
    brackets; then the published percentages, apart. '' when no row has any."""
    import pandas as pd

    tasks = list(dict.fromkeys(c[: -len(" bpb")] for c in frame.columns
                               if c.endswith(" bpb") and not c.startswith(("hf-strided-", "sparknet-blog"))))
    published = [c for c in frame.columns if c.endswith(" reported %")]
    if not tasks:
        return ""
    lines = ["", "downstream tasks, report items: correct-answer bits per byte (lower is better), acc_norm or acc "
                 "in brackets"]
    head = ["#", "model"] + tasks
    body = []
    for i in range(len(frame)):
        cells = []
        for t in tasks:
            bpb = frame[f"{t} bpb"].iat[i]
            acc = next((frame[f"{t} {m}"].iat[i] for m in ("acc_norm", "acc")
                        if f"{t} {m}" in frame and not pd.isna(frame[f"{t} {m}"].iat[i])), None)
            cells.append("—" if pd.isna(bpb) else f"{bpb:.3f}" + (f" ({acc:.2f})" if acc is not None else ""))
        if any(c != "—" for c in cells):
            body.append([str(i + 1), str(frame["model"].iat[i])[:30], *cells])
    widths = [max(len(r[j]) for r in [head, *body]) for j in range(len(head))]
    lines += ["  ".join(v.rjust(w) if j > 1 else v.ljust(w) for j, (v, w) in enumerate(zip(r, widths))).rstrip()
              for r in [head, *body]]
    for i in range(len(frame)):
        figures = [f"{c[: -len(' reported %')]} {frame[c].iat[i]:g}" for c in published if not pd.isna(frame[c].iat[i])]
        if figures:
            lines.append(f"{i + 1}. reported, accuracy %: {frame['model'].iat[i]}: {', '.join(figures)}")
    return "\n".join(lines)
